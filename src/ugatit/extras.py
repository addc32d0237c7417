"""Optional packages: each feature that needs one imports it here, and a missing one is a one-line instruction."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or say which ugatit extra installs it (`pip install 'ugatit[EXTRA]'`)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed; install it with: pip install 'ugatit[{extra}]'") from None
