"""The `ugatit` command line: one subcommand per job, each a thin layer over the Python API.

Errors that a user can fix (bad files, bad values) are printed as one line on stderr with exit status 2, never as
a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError
from .data import BadImageError, DataError

USER_ERRORS = (CheckpointError, ConfigError, DataError, BadImageError, FileExistsError, FileNotFoundError)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def cmd_import_official(args: argparse.Namespace) -> None:
    from .official import load_official

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    config, states = load_official(args.file, img_size=args.img_size)
    save_model(out, states, config, source=str(Path(args.file).name))
    mode = "light" if config.light else "full"
    print(f"imported {args.file}: {mode}, ch={config.ch}, n_res={config.n_res}, img_size={config.img_size} -> {out}")


def cmd_export_official(args: argparse.Namespace) -> None:
    from .models import NETWORKS
    from .official import save_official

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    config, states = load_model(args.checkpoint, NETWORKS)
    save_official(states, config, out)
    print(f"wrote official-layout checkpoint {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ugatit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ugatit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("import-official", help="convert a checkpoint of the official PyTorch code to ours")
    p.add_argument("file", help="official checkpoint (.pt) holding genA2B, genB2A, disGA, disGB, disLA, disLB")
    p.add_argument("--out", required=True, help="our checkpoint file to write (.safetensors)")
    p.add_argument("--img-size", type=int, default=None, help="image size of a light model (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_import_official)

    p = sub.add_parser("export-official", help="write our checkpoint in the official PyTorch layout")
    p.add_argument("checkpoint", help="our checkpoint (.safetensors file or checkpoint folder)")
    p.add_argument("--out", required=True, help="official-layout file to write (.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export_official)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args) or 0
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, (FileExistsError, FileNotFoundError)) and exc.args else exc
        print(f"ugatit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ugatit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
