"""The `ugatit` command line: one subcommand per job, each a thin layer over the Python API.

Errors that a user can fix (bad files, bad values) are printed as one line on stderr with exit status 2, never as
a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import CheckpointError, describe_source, is_run_folder, load_model, resolve_model, save_model
from .config import FAST_DTYPES, PRECISIONS, PRESETS, ConfigError, ModelConfig, RunConfig
from .data import BadImageError, DataError, list_images
from .demo import DemoError
from .devices import DEVICE_NAMES, DeviceError
from .export import ExportError
from .extras import require
from .inception import InceptionWeightsError
from .quantize import CALIBRATION_IMAGES, quantize_onnx
from .tf_checkpoint import TFCheckpointError

# ImportError: an optional extra that is not installed (the message names the pip command). OSError: ugatit's own
# refusals of paths (FileExistsError, FileNotFoundError) and the file system's (a path that cannot be made, a full
# disk), for any path a command reads or writes.
USER_ERRORS = (
    InceptionWeightsError, CheckpointError, ConfigError, DataError, BadImageError, ExportError, DeviceError,
    OSError, ImportError, TFCheckpointError, DemoError,
)  # fmt: skip


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def _model_path(path: str) -> str:
    """The model a path names: a run folder's latest checkpoint, said aloud, resolved once so that the checkpoint
    announced is the one used (training may save another meanwhile); any other path as it is."""
    if not is_run_folder(path):
        return path
    file = resolve_model(path)
    print(f"using {describe_source(path, file)}")
    return str(file)


def cmd_import_official(args: argparse.Namespace) -> None:
    from .official import load_official

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    config, states = load_official(args.file, img_size=args.img_size)
    save_model(out, states, config, source=str(Path(args.file).name))
    mode = "light" if config.light else "full"
    print(f"imported {args.file}: {mode}, ch={config.ch}, n_res={config.n_res}, img_size={config.img_size} -> {out}")


def cmd_import_tf(args: argparse.Namespace) -> None:
    from .tf_import import describe_import, import_tf

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    report = import_tf(
        args.path, out, generators_only=args.generators_only, rho_smoothing=args.rho_smoothing,
        img_size=args.img_size, verify=True if args.verify else "auto", progress=not args.no_progress,
    )  # fmt: skip
    print("\n".join(describe_import(report, args.path, out)))


def cmd_export_official(args: argparse.Namespace) -> None:
    from .models import NETWORKS
    from .official import save_official

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    args.checkpoint = _model_path(args.checkpoint)
    config, states = load_model(args.checkpoint, NETWORKS)
    save_official(states, config, out)
    print(f"wrote official-layout checkpoint {out}")


_TYPES = {"int": int, "float": float, "str": str}


_CONFIGS = {"model": ModelConfig, "run": RunConfig}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of both configurations, named after it in kebab-case; unset options stay None (= not
    requested)."""
    for title, cls in _CONFIGS.items():
        group = parser.add_argument_group(f"{title} configuration (defaults are the official ones)")
        defaults = cls()
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            resumable = ", may change on resume" if f.metadata.get("resumable") else ""
            help_text = f"default {getattr(defaults, f.name)!r}{resumable}"
            if f.type in ("bool", "bool | None"):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                kind = _TYPES[str(f.type)]
                group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        values = require("yaml", "yaml").safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: expected a mapping of config fields")
    return {key.replace("-", "_"): value for key, value in values.items()}


def requested_config(args: argparse.Namespace) -> dict[str, Any]:
    """Preset, then config file, then command-line options: the settings the user asked for explicitly."""
    requested: dict[str, Any] = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
        requested.update(PRESETS[args.preset])
    if args.config:
        requested.update(_read_config_file(args.config))
    for cls in _CONFIGS.values():
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name)
            if value is not None:
                requested[f.name] = value
    return requested


def cmd_train(args: argparse.Namespace) -> None:
    from .train import resolve_configs, train

    if args.init_from:
        args.init_from = _model_path(args.init_from)
    model, run = resolve_configs(args.run_dir, requested_config(args), args.overwrite, args.init_from)
    print(
        f"training {args.data} -> {args.run_dir}: {model.describe()}, {run.iterations} iterations, "
        f"batch {run.batch_size}, precision {run.precision}"
    )
    train(
        model, run, args.data, args.run_dir, device=args.device, overwrite=args.overwrite,
        skip_bad_images=args.skip_bad_images, until=args.until, progress=not args.no_progress,
        inception_weights=args.inception_weights, init_from=args.init_from,
    )  # fmt: skip


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data import format_report, scan_dataset

    try:
        reports = scan_dataset(args.data, min_size=args.min_size)
    except DataError as exc:
        if exc.reports:
            print(format_report(exc.reports))
        raise
    print(format_report(reports))
    bad = sum(len(r.bad) for r in reports.values())
    if bad:
        print(f"{bad} unusable file(s): fix or remove them, or train with --skip-bad-images")
        return 1
    print("all images are usable")
    return 0


def cmd_export(args: argparse.Namespace) -> None:
    from .models import GENERATORS, NETWORKS

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    if args.quantize and (args.format != "onnx" or not args.calibration):
        raise ExportError("--quantize needs --format onnx and --calibration FOLDER (the generator's input images)")
    if args.calibration and not args.quantize:
        raise ExportError("--calibration is for --quantize int8; add it, or drop --calibration")
    if args.format == "onnx" and args.direction == "both":
        raise ExportError("an ONNX file holds one generator: --direction A2B or B2A, one file each")
    if args.quantize and not list_images(args.calibration):  # said before the export, which may take a while
        raise ExportError(f"{args.calibration}: no images to calibrate on; point --calibration at a folder of the "
                          "generator's input images (e.g. trainA for A2B)")  # fmt: skip
    args.checkpoint = _model_path(args.checkpoint)
    args.direction = args.direction or ("A2B" if args.format == "onnx" else "both")
    if args.format == "onnx":
        from .export import export_onnx

        if args.quantize is None:
            export_onnx(args.checkpoint, out, args.direction, heatmap=args.heatmap, uint8=args.uint8, opset=args.opset)
            print(f"wrote {args.direction} ONNX model to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
            return
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(
                args.checkpoint, Path(tmp) / "fp32.onnx", args.direction, heatmap=args.heatmap, uint8=args.uint8,
                opset=args.opset,
            )  # fmt: skip
            report = quantize_onnx(fp32, out, args.calibration, args.calibration_images)
        print(f"wrote {args.direction} ONNX model in {args.quantize} to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
        print(report.describe())
        return
    if args.format == "pretrained":
        from .hub import save_pretrained

        save_pretrained(
            args.checkpoint, out, None if args.direction == "both" else args.direction, overwrite=args.overwrite
        )
        print(f"wrote a Hub-style model folder to {out}")
        return
    if args.generator_only:
        names = GENERATORS if args.direction == "both" else (f"gen{args.direction}",)
    else:
        names = NETWORKS
    config, states = load_model(args.checkpoint, names)
    save_model(out, states, config)
    print(f"wrote {', '.join(names)} to {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def cmd_translate(args: argparse.Namespace) -> int:
    from .backends import load_translator
    from .inference import translate_files

    if args.faces is None and (args.paste_back or args.face_scale != 1.0):
        raise ConfigError("--paste-back and --face-scale work on faces: add --faces")
    if args.faces is not None and args.original_size:
        raise ConfigError("--original-size does not apply to --faces: use --paste-back for results at the photo's size")
    args.checkpoint = _model_path(args.checkpoint)
    translator = load_translator(
        args.checkpoint, args.direction, backend=args.backend, device=args.device,
        precision=args.precision, fast_dtype=args.fast_dtype,
    )  # fmt: skip
    if args.heatmap and not translator.has_heatmap:  # said before any image is read
        raise ExportError(f"{args.checkpoint} has no heatmap output: export it again with --heatmap, or drop --heatmap")
    if args.faces is not None:
        from .faces import translate_faces

        report = translate_faces(
            translator, args.inputs, args.out, which=args.faces, paste=args.paste_back, face_scale=args.face_scale,
            heatmap=args.heatmap, overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
        return _faces_done(report, f"translated faces {translator.direction} into {args.out}")
    outputs = translate_files(
        translator, args.inputs, args.out, batch_size=args.batch_size, heatmap=args.heatmap,
        original_size=args.original_size, overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    print(f"translated {len(outputs)} image(s) {translator.direction} into {args.out}")
    return 0


def _faces_done(report: Any, what: str) -> int:
    """Say what a faces run wrote; no face in any input is a failure (exit status 1)."""
    if not report.outputs:
        print("ugatit: error: no face found in any input; nothing written", file=sys.stderr)
        return 1
    print(f"{what}: {len(report.outputs)} file(s)")
    return 0


def cmd_align_faces(args: argparse.Namespace) -> int:
    from .faces import align_faces

    report = align_faces(
        args.src, args.dst, size=args.size, which=args.faces, face_scale=args.face_scale, overwrite=args.overwrite,
        progress=not args.no_progress,
    )  # fmt: skip
    return _faces_done(report, f"aligned faces from {args.src} into {args.dst}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoModel, serve

    model = DemoModel(_model_path(args.model), args.precision, args.fast_dtype, args.device)
    print(f"serving {model.describe()}\nopen http://{args.host}:{args.port} (Ctrl+C stops)")
    try:
        serve(model, args.host, args.port)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise ConfigError(f"cannot serve on {args.host}:{args.port} ({exc}); choose another --port or --host") from None


def cmd_quickstart(args: argparse.Namespace) -> None:
    from .config import preset
    from .quickstart import quickstart

    overrides = {"iterations": args.iterations} if args.iterations else {}
    quickstart(args.out, preset("cpu-small", **overrides), progress=not args.no_progress)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .devices import resolve_device
    from .evaluate import KIDSettings, evaluate_checkpoint, evaluate_folders, format_table, write_results

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    device = resolve_device(args.device)
    settings = KIDSettings(n_subsets=args.kid_subsets, subset_size=args.kid_subset_size)
    common = dict(settings=settings, batch_size=args.batch_size, device=device, progress=not args.no_progress)
    if args.fake:
        if args.checkpoint or not args.real or args.real in ("test", "train"):
            raise ConfigError("with --fake DIR give --real DIR (the real images to compare with) and no checkpoint")
        results = evaluate_folders(args.fake, args.real, args.inception_weights, args.source, **common)
    else:
        if not (args.checkpoint and args.data):
            raise ConfigError("give CHECKPOINT DATA, or --fake DIR --real DIR")
        real = args.real or "test"
        if real not in ("test", "train"):
            raise ConfigError(
                f"--real {real!r}: with a checkpoint it names the split of the real images, test or train"
            )
        args.checkpoint = _model_path(args.checkpoint)
        results = evaluate_checkpoint(
            args.checkpoint, args.data, args.direction, real, args.inception_weights, args.translations, **common,
            precision=args.precision, fast_dtype=args.fast_dtype,
        )  # fmt: skip
    print(format_table(results))
    write_results(results, out)
    print(f"every number and the protocol: {out}")


def _command(sub: Any, name: str, func: Callable[[argparse.Namespace], int | None], help: str) -> Any:
    """A subcommand's parser, which runs `func`."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(func=func)
    return parser


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run folder (its latest checkpoint), checkpoint folder or model file")


def _add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", required=True, help=what)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


class _Retired(argparse.Action):
    """A flag of an earlier version: refused with its new spelling, rather than read as an abbreviation."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        parser.error(f"{self.option_strings[0]} is spelled {self.const} now")


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    """--precision and --fast-dtype, spelled and meant as in training (`RunConfig`)."""
    parser.add_argument(
        "--precision",
        default="exact",
        choices=PRECISIONS,
        help="exact: the official fp32 computation; fast: ugatit's fast path (default exact)",
    )
    parser.add_argument("--fast-dtype", default="auto", choices=FAST_DTYPES,
                        help="the fast path's compute dtype; auto: bf16 where the device has bf16 units")  # fmt: skip


def _add_import_official_parser(sub: Any) -> None:
    p = _command(
        sub, "import-official", cmd_import_official, "convert a checkpoint of the official PyTorch code to ours"
    )
    p.add_argument("file", help="official checkpoint (.pt) holding genA2B, genB2A, disGA, disGB, disLA, disLB")
    _add_output(p, "our checkpoint file to write (.safetensors)")
    p.add_argument("--img-size", type=int, default=None, help="image size of a light model (default 256)")


def _add_import_tf_parser(sub: Any) -> None:
    p = _command(sub, "import-tf", cmd_import_tf, "convert a checkpoint of the official TensorFlow code (the authors' "
                 "released models) to ours")  # fmt: skip
    p.add_argument("path", help="the TF checkpoint folder (its `checkpoint` file names the latest) or a bundle prefix "
                   "such as .../UGATIT.model-1000000")  # fmt: skip
    _add_output(p, "our model file to write (.safetensors)")
    p.add_argument("--generators-only", action="store_true", help="only genA2B and genB2A, for translation")
    p.add_argument("--rho-smoothing", action=argparse.BooleanOptionalAction, default=None,
                   help="AdaILN rho smoothing (default: as the folder name says; _smoothing means on)")  # fmt: skip
    p.add_argument("--img-size", type=int, default=None, help="image size of a light model (default 256)")
    p.add_argument("--verify", action="store_true", help="check every tensor's crc32c, large ones too (slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_export_official_parser(sub: Any) -> None:
    p = _command(sub, "export-official", cmd_export_official, "write our checkpoint in the official PyTorch layout")
    _add_model(p)
    _add_output(p, "official-layout file to write (.pt)")


def _add_quickstart_parser(sub: Any) -> None:
    p = _command(
        sub, "quickstart", cmd_quickstart, "make a synthetic dataset, train on it, translate, and report (minutes)"
    )
    p.add_argument("--out", default="quickstart_out", help="folder for everything it writes (default quickstart_out)")
    p.add_argument("--iterations", type=int, help="training steps (default: the cpu-small preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train_parser(sub: Any) -> None:
    p = _command(sub, "train", cmd_train, "train (or resume) a model on DATA/trainA and DATA/trainB")
    p.add_argument("data", help="dataset folder with trainA/ and trainB/ (testA/, testB/ optional)")
    p.add_argument("--run-dir", required=True, help="where checkpoints, samples and logs go; rerun to resume")
    p.add_argument("--preset", choices=list(PRESETS), help="paper (official defaults), light, cpu-small")
    p.add_argument("--config", help="YAML or JSON file of config fields; command-line options override it")
    p.add_argument("--device", default="auto", choices=DEVICE_NAMES)
    p.add_argument("--overwrite", action="store_true", help="delete the run in --run-dir and start again")
    p.add_argument("--skip-bad-images", action="store_true", help="list unusable images and train without them")
    p.add_argument("--until", type=int, help="stop after this step (with a checkpoint), before --iterations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--inception-weights", help="for --eval-every: pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--init-from", help="start a new run from this model's weights (fine-tuning; fresh optimizers): "
                   "a model file, e.g. one from import-tf, a checkpoint or a run folder")  # fmt: skip
    add_config_options(p)


def _add_check_data_parser(sub: Any) -> None:
    p = _command(
        sub, "check-data", cmd_check_data, "scan a dataset folder and list every unusable image with its reason"
    )
    p.add_argument("data", help="dataset folder with trainA/, trainB/ (and optionally testA/, testB/)")
    p.add_argument("--min-size", type=int, default=32, help="smallest usable shorter side in pixels (default 32)")


def _add_translate_parser(sub: Any) -> None:
    p = _command(sub, "translate", cmd_translate, "translate images with a trained model")
    p.add_argument("checkpoint", help="run folder (its latest checkpoint), checkpoint folder, model file, Hub-style "
                   "folder, or .onnx file")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--out", required=True, help="output folder; one PNG per input, named after it")
    p.add_argument("--direction", choices=["A2B", "B2A"], help="default: A2B, or the direction of an .onnx file")
    p.add_argument(
        "--batch-size", type=_positive_int, help="images per generator call (default: 1 on a CPU, 8 on a GPU)"
    )
    p.add_argument("--heatmap", action="store_true", help="also write the attention heatmap over each input")
    p.add_argument("--original-size", action="store_true", help="return results at each input's own size")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--device", default="auto", choices=DEVICE_NAMES)
    p.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        help="default: onnxruntime for an .onnx file, else torch; onnxruntime needs ugatit[onnx]",
    )
    add_precision_options(p)
    p.add_argument("--fast", nargs=0, action=_Retired, const="--precision fast", help=argparse.SUPPRESS)
    add_face_options(p, "--faces", "translate each face of each photo (aligned like the training crops) instead of "
                     "the whole photo: all faces, or the largest")  # fmt: skip
    p.add_argument("--paste-back", action="store_true", help="with --faces: paste the translated faces back into "
                   "each photo, written at its size")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_face_options(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """Which faces and how much margin: shared by translate --faces and align-faces."""
    kwargs = {"nargs": "?", "const": "all"} if flag == "--faces" else {"default": "all"}
    parser.add_argument(flag, choices=["all", "largest"], help=help, dest="faces", **kwargs)
    parser.add_argument("--face-scale", type=_positive_float, default=1.0, help="the face's size in the crop "
                        "against the template's (default 1.0; below 1 leaves a wider margin)")  # fmt: skip


def _add_align_faces_parser(sub: Any) -> None:
    p = _command(sub, "align-faces", cmd_align_faces, "make a training folder of aligned face crops from raw photos")
    p.add_argument("src", help="a photo, or a folder of photos (searched recursively)")
    p.add_argument("dst", help="the folder to write NAME_face0.png, NAME_face1.png, ... to")
    p.add_argument("--size", type=_positive_int, default=256, help="crop side in pixels (default 256)")
    add_face_options(p, "--which", "all faces of each photo, or the largest (default all)")
    p.add_argument("--overwrite", action="store_true", help="replace existing crops")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_demo_parser(sub: Any) -> None:
    p = _command(sub, "demo", cmd_demo, "a local web page to try a model on your photos (needs ugatit[demo])")
    p.add_argument("model", help="run folder, checkpoint folder, model file, Hub-style folder or .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive_int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", choices=DEVICE_NAMES)
    add_precision_options(p)


def _add_evaluate_parser(sub: Any) -> None:
    p = _command(sub, "evaluate", cmd_evaluate, "KID and FID of a model's translations (or of any two image folders)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint to evaluate (translates DATA/testA and/or testB)")
    p.add_argument("data", nargs="?", help="dataset folder with testA/, testB/ (and trainA/, trainB/)")
    p.add_argument("--direction", default="both", choices=["A2B", "B2A", "both"])
    p.add_argument("--real", help="with a checkpoint: test (default) or train split of the target domain; "
                   "with --fake: the folder of real images")  # fmt: skip
    p.add_argument("--fake", help="folder of generated images, to score against --real DIR")
    p.add_argument("--source", help="with --fake: the source-domain images that were translated (for mean KID)")
    p.add_argument("--translations", help="keep the translated images in this folder (default: a temporary one)")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: cache, or download)")
    p.add_argument("--out", default="evaluation.json", help="JSON file for every number and the protocol")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--kid-subsets", type=int, default=100, help="subsets of the KID estimator (torch-fidelity: 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="rows per subset (clipped to the image count)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per Inception call (default 32)")
    add_precision_options(p)
    p.add_argument("--device", default="auto", choices=DEVICE_NAMES)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_export_parser(sub: Any) -> None:
    p = _command(sub, "export", cmd_export, "write a model file for inference or deployment from a checkpoint")
    _add_model(p)
    _add_output(p, "file (or folder, for --format pretrained) to write")
    p.add_argument(
        "--format", default="safetensors", choices=["safetensors", "onnx", "pretrained"],
        help="safetensors (ours), onnx (one direction, needs ugatit[onnx]), pretrained (Hub-style folder)",
    )  # fmt: skip
    p.add_argument("--generator-only", action="store_true", help="safetensors: only the generator(s)")
    p.add_argument(
        "--direction", choices=["A2B", "B2A", "both"],
        help="which generator(s): default both, and A2B for onnx (one generator per file)",
    )  # fmt: skip
    p.add_argument("--heatmap", action="store_true", help="onnx: add the attention heatmap as a second output")
    p.add_argument("--uint8", action="store_true", help="onnx: uint8 RGB in and out instead of floats in [-1, 1]")
    p.add_argument("--opset", type=int, default=None, help="onnx: opset version (default 17)")
    p.add_argument(
        "--quantize", choices=["int8"], default=None,
        help="onnx: int8 convolutions calibrated on --calibration, ahead of the fp32 file on the CPUs measured (its "
        "error is printed)",
    )  # fmt: skip
    p.add_argument("--calibration", help="--quantize: folder of the generator's input images (e.g. trainA for A2B)")
    p.add_argument(
        "--calibration-images", type=_positive_int, default=CALIBRATION_IMAGES,
        help=f"--quantize: how many of them calibrate (default {CALIBRATION_IMAGES}); others measure the error",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ugatit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ugatit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _add_import_official_parser,
        _add_import_tf_parser,
        _add_export_official_parser,
        _add_quickstart_parser,
        _add_train_parser,
        _add_check_data_parser,
        _add_translate_parser,
        _add_align_faces_parser,
        _add_evaluate_parser,
        _add_demo_parser,
        _add_export_parser,
    ):
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error as ugatit wrote it, or, raised by the OS, the path it refused and why (not `[Errno 21] ...`)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    return str(exc)


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
        print(f"ugatit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ugatit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
