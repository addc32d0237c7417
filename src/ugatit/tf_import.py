"""Import a checkpoint of the official TensorFlow code (the authors' released models) as a ugatit model file.

The architecture is read from the checkpoint: widths, depths, full or light mode and, in full mode, the image size
come from the variables' shapes; rho smoothing from the checkpoint folder's name (the TF code appends `_smoothing`
to it when the option is on). Each network of `tf_models.py` names the TF variables it needs; only those are read,
a tensor at a time from the memory-mapped data file, and converted to PyTorch layout. The optimizer's Adam slots and
beta powers are never read; the spectral-norm u vectors are kept (the discriminators' outputs depend on them).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import save_model
from .config import ConfigError, ModelConfig
from .models import GENERATORS, NETWORKS, build_discriminator, build_generator
from .tf_checkpoint import TFCheckpoint, TFCheckpointError

# The TF scope of each network: generator_B translates A to B (UGATIT.py, generate_a2b), discriminator_A judges
# domain-A images.
TF_SCOPES = {
    "genA2B": "generator_B",
    "genB2A": "generator_A",
    "disGA": "discriminator_A/global",
    "disGB": "discriminator_B/global",
    "disLA": "discriminator_A/local",
    "disLB": "discriminator_B/local",
}
SLAB_BYTES = 64 << 20  # the most of a variable mapped at once
LIGHT_IMG_SIZE = 256  # the TF code's default; a light model runs at any size, but images are framed at this one


def is_optimizer_variable(name: str) -> bool:
    """Adam's slots (`<var>/Adam`, `<var>/Adam_1`) and beta powers (`beta1_power`, `beta2_power_1`, ...)."""
    return bool(re.search(r"/Adam(_\d+)?$", name) or re.fullmatch(r"beta[12]_power(_\d+)?", name))


def tf_name(net: nn.Module, key: str, scope: str) -> str:
    """The TF variable that the state_dict entry `key` of a `tf_models` network holds."""
    path, _, leaf = key.rpartition(".")
    sub_scope = getattr(net.get_submodule(path), "tf_scope", "")
    parts = [scope, *path.split("."), sub_scope, "kernel" if leaf == "weight" else leaf]
    return "/".join(part for part in parts if part)


def _smoothing_from_folder(prefix: Path) -> bool | None:
    """What the checkpoint folder's name says of rho smoothing: the TF code's `model_dir` ends in `_smoothing` when
    it is on, and in `_<cam_weight>` or `_sn` when it is off; None for a folder named otherwise."""
    name = prefix.parent.name
    if name.endswith("_smoothing"):
        return True
    if re.search(r"_\d+resblock_\d+dis_.*(_sn|_\d+)$", name):
        return False
    return None


def _count(ckpt: TFCheckpoint, pattern: str) -> int:
    return sum(1 for name in ckpt.names if re.fullmatch(pattern, name))


def infer_config(
    ckpt: TFCheckpoint, rho_smoothing: bool | None = None, img_size: int | None = None
) -> tuple[ModelConfig, str]:
    """The `ModelConfig` of a TF checkpoint, and a line saying where rho smoothing came from."""
    gen = TF_SCOPES["genA2B"]
    needed = f"{gen}/conv/conv2d/kernel", f"{gen}/MLP/linear_0/dense/kernel"
    for name in needed:
        if name not in ckpt:
            raise TFCheckpointError(f"{ckpt.index_path}: no variable {name}; not a checkpoint of the U-GAT-IT TF code")
    ch = ckpt.shape(needed[0])[3]
    n_res = _count(ckpt, rf"{gen}/resblock_\d+/res1/conv_0/conv2d/kernel")
    dim = 4 * ch
    mlp_in = ckpt.shape(needed[1])[0]
    light = mlp_in == dim
    if not light:
        side = round((mlp_in // dim) ** 0.5)
        if side * side * dim != mlp_in:
            raise TFCheckpointError(f"{ckpt.index_path}: {needed[1]} has {mlp_in} rows, not (img_size / 4)^2 * {dim}")
        if img_size is not None and img_size != 4 * side:
            raise ConfigError(f"img_size={img_size}: this full-mode checkpoint was trained at {4 * side} px")
        img_size = 4 * side
    global_down = _count(ckpt, r"discriminator_A/global/conv_\d+/kernel")
    local_down = _count(ckpt, r"discriminator_A/local/conv_\d+/kernel")
    smoothing, said = rho_smoothing, "as asked"
    if smoothing is None:
        smoothing = _smoothing_from_folder(ckpt.prefix)
        said = f"as the folder name {ckpt.prefix.parent.name} says"
        if smoothing is None:
            smoothing = True
            said = (
                "the TF default, since the folder name does not say; set it with --rho-smoothing / --no-rho-smoothing"
            )
    config = ModelConfig(
        img_size=img_size or LIGHT_IMG_SIZE, ch=ch, n_res=n_res, light=light,
        global_layers=global_down + 2 if global_down else 7, local_layers=local_down + 2 if local_down else 5,
        arch="official-tf", rho_smoothing=smoothing,
    )  # fmt: skip
    return config, f"rho smoothing {'on' if smoothing else 'off'}: {said}"


@dataclass(frozen=True)
class _Layout:
    """How a TF variable becomes a PyTorch parameter: viewed with `view`, its axes permuted by `order`, the
    result reshaped to `shape`."""

    view: tuple[int, ...]
    order: tuple[int, ...]
    shape: tuple[int, ...]


def _layout(key: str, shape: tuple[int, ...], config: ModelConfig) -> _Layout:
    """Conv kernels HWIO -> OIHW; dense kernels transposed, where full mode's first MLP layer also has its rows,
    which run over H, W, C, reordered to C, H, W; u [1, n] -> [n]; biases and norms as they are."""
    leaf = key.rpartition(".")[2]
    if leaf == "weight" and len(shape) == 4:
        return _Layout(shape, (3, 2, 0, 1), tuple(shape[i] for i in (3, 2, 0, 1)))
    if key == "MLP.linear_0.weight" and not config.light and len(shape) == 2:
        side = config.img_size // 4
        return _Layout((side, side, shape[0] // side**2, shape[1]), (3, 2, 0, 1), (shape[1], shape[0]))
    if leaf == "weight" and len(shape) == 2:
        return _Layout(shape, (1, 0), (shape[1], shape[0]))
    return _Layout(shape, tuple(range(len(shape))), (math.prod(shape),) if leaf == "u" else shape)


def _convert(ckpt: TFCheckpoint, tf_var: str, layout: _Layout, verify: bool | str) -> torch.Tensor:
    """Copy a TF variable into a new tensor of PyTorch layout, a slab of rows at a time from the file, so that
    the memory beyond the kept weights stays one slab even for the 1 GiB MLP layer of a paper-size generator."""
    ckpt.mapped(tf_var, verify)  # the checks, and the checksum where `verify` asks for it
    view, order = layout.view, layout.order  # every model variable has at least one axis
    out = np.empty([view[axis] for axis in order], np.float32)
    into = out.transpose(np.argsort(order))  # the output seen in the variable's axis order
    per_row = ckpt.shape(tf_var)[0] // view[0] if view[0] else 1  # variable rows per row of the view
    step = max(1, SLAB_BYTES // max(1, out.nbytes // max(view[0], 1)))
    for start in range(0, view[0], step):
        stop = min(view[0], start + step)
        slab = ckpt.mapped(tf_var, rows=(start * per_row, stop * per_row))
        into[start:stop] = slab.reshape((stop - start, *view[1:]))
        del slab  # unmapped: its pages leave this process
    return torch.from_numpy(out).reshape(layout.shape)


@dataclass
class ImportReport:
    """What `import_tf` did: the model it wrote, and what it read, skipped and ignored."""

    config: ModelConfig
    smoothing: str  # where the rho smoothing setting came from
    networks: tuple[str, ...]
    ignored: list[str]  # variables of the file that neither the networks nor the optimizer account for
    skipped: int  # optimizer variables, never read
    tensors: int
    bytes: int


def import_tf(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    generators_only: bool = False,
    rho_smoothing: bool | None = None,
    img_size: int | None = None,
    verify: bool | str = "auto",
    progress: bool = True,
) -> ImportReport:
    """Read the TF checkpoint at `path` (its folder, or a bundle prefix such as `.../UGATIT.model-1000000`) and
    write its networks (all six, or the two generators) to the ugatit model file `out`, atomically.

    A model variable missing from the file, or of another shape than the architecture read from it needs, is a
    `TFCheckpointError` naming it, and nothing is written.
    """
    ckpt = TFCheckpoint(path)
    config, smoothing = infer_config(ckpt, rho_smoothing, img_size)
    networks = GENERATORS if generators_only else NETWORKS
    if not generators_only and not any(name.endswith("/u") for name in ckpt.names):
        raise TFCheckpointError(
            f"{ckpt.index_path}: discriminators without spectral norm (TF --sn False) are not supported; "
            "import the generators alone with --generators-only"
        )
    with torch.device("meta"):  # the shapes alone: a paper-size generator holds 279 M weights
        templates = {name: _build(config, name) for name in networks}
    shapes = {name: {key: value.shape for key, value in net.state_dict().items()} for name, net in templates.items()}
    wanted = {
        (name, key): tf_name(net, key, TF_SCOPES[name]) for name, net in templates.items() for key in shapes[name]
    }
    for tf_var in wanted.values():
        if tf_var not in ckpt:
            hint = "" if generators_only or tf_var.startswith("generator") else "; --generators-only skips them"
            raise TFCheckpointError(f"{ckpt.index_path}: model variable {tf_var} is missing{hint}")
        if ckpt.dtype(tf_var) != np.float32:
            raise TFCheckpointError(f"{ckpt.index_path}: {tf_var} is stored as {ckpt.dtype(tf_var)}, not float32")
    total = sum(int(np.prod(ckpt.shape(v))) * 4 for v in wanted.values())
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in networks}
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="import-tf") as bar:
        for (name, key), tf_var in wanted.items():
            expected = shapes[name][key]
            layout = _layout(key, ckpt.shape(tf_var), config)
            if layout.shape != tuple(expected):
                raise TFCheckpointError(
                    f"{ckpt.index_path}: {tf_var} has shape {list(ckpt.shape(tf_var))}, which does not fit "
                    f"{config.describe()} (read from the other variables)"
                )
            states[name][key] = tensor = _convert(ckpt, tf_var, layout, verify)
            bar.update(tensor.numel() * 4)
    optimizer = sum(1 for n in ckpt.names if is_optimizer_variable(n))
    used = set(wanted.values())
    left_out = tuple(TF_SCOPES[name] + "/" for name in NETWORKS if name not in networks)  # not asked for
    ignored = [n for n in ckpt.names if n not in used and not is_optimizer_variable(n) and not n.startswith(left_out)]
    save_model(out, states, config, source=str(ckpt.prefix.name), imported_from="tensorflow")
    return ImportReport(config, smoothing, networks, ignored, optimizer, len(wanted), total)


def _build(config: ModelConfig, name: str) -> nn.Module:
    if name in GENERATORS:
        return build_generator(config)
    return build_discriminator(config, config.global_layers if name.startswith("disG") else config.local_layers)


def describe_import(report: ImportReport, path: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """What `ugatit import-tf` prints: the model, where smoothing came from, and the variables left out."""
    lines = [
        f"imported {path}: {report.config.describe()}",
        report.smoothing,
        f"wrote {', '.join(report.networks)} ({report.tensors} tensors, {report.bytes / 2**20:.1f} MiB) to {out}; "
        f"skipped {report.skipped} optimizer variables",
    ]
    if report.ignored:
        lines.append(f"ignored {len(report.ignored)} variable(s) that the TF test code does not read: "
                     + ", ".join(report.ignored))  # fmt: skip
    return lines
