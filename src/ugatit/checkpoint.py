"""Our checkpoint files: network weights in safetensors with the config embedded, written atomically.

A model file holds tensors keyed `<network>.<parameter>` (for example `genA2B.FC.0.weight`) and, in its
safetensors metadata, the `Config` as JSON: loading needs nothing but the file. A training checkpoint is a folder
with that file (`model.safetensors`) and the optimizer / data / RNG state beside it (see `train.py`). Every write
goes to a temporary name, is fsynced, then renamed: a process killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .config import Config, ConfigError
from .models import NETWORKS

MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and what is wrong with it."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary path beside `path`, fsync it, and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def flatten(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        f"{net}.{key}": value.detach().to("cpu", torch.float32).contiguous()
        for net, state in states.items()
        for key, value in state.items()
    }


def unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        net, _, key = name.partition(".")
        states.setdefault(net, {})[key] = value
    return states


def save_model(path: str | Path, states: dict[str, dict[str, torch.Tensor]], config: Config, **meta: str) -> None:
    """Write network state_dicts and their config to one safetensors file, atomically."""
    tensors = flatten(states)
    metadata = {"format": "ugatit", "ugatit_version": __version__, "config": config.to_json(), **meta}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def model_file(path: str | Path) -> Path:
    """The weights file of a checkpoint given as the file itself or as a folder holding `model.safetensors`."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    file = model_file(path)
    try:
        with safe_open(file, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a ugatit checkpoint (not a safetensors file: {exc})") from None


def load_model(
    path: str | Path, networks: Iterable[str] | None = None
) -> tuple[Config, dict[str, dict[str, torch.Tensor]]]:
    """Read a model file: its config and the state_dicts of `networks` (all stored ones by default)."""
    file = model_file(path)
    metadata = read_metadata(file)
    if metadata.get("format") != "ugatit" or "config" not in metadata:
        raise CheckpointError(f"{file}: not a ugatit checkpoint (no embedded config)")
    try:
        config = Config.from_dict(json.loads(metadata["config"]))
    except (ConfigError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{file}: its embedded config is unusable ({exc})") from None
    with safe_open(file, framework="pt") as f:
        stored = {key.partition(".")[0] for key in f.keys()}
        wanted = list(networks) if networks is not None else [n for n in NETWORKS if n in stored]
        missing = [n for n in wanted if n not in stored]
        if missing:
            raise CheckpointError(f"{file}: holds no {', '.join(missing)} (it has {', '.join(sorted(stored))})")
        # Read only the networks asked for: a full-mode generator alone is 1 GiB.
        tensors = {key: f.get_tensor(key) for key in f.keys() if key.partition(".")[0] in wanted}
    states = unflatten(tensors)
    return config, {name: states[name] for name in wanted}
