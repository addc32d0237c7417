"""Reading and writing checkpoints of the official PyTorch code (znxlwm/UGATIT-pytorch).

An official file is `torch.save({genA2B, genB2A, disGA, disGB, disLA, disLB})` of plain state_dicts whose
spectral-norm layers use the old hook keys `weight_orig / weight_u / weight_v`. Our modules carry the official
names, so conversion is a key rename for the spectral-norm tensors (and `FC.1` -> `FC.2` for files written before
the MLP got its ReLUs, 2019-08-07). The architecture is read off the tensor shapes; only the image size of a light
model cannot be, since light mode works at any size.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .files import atomic_write
from .models import DISCRIMINATORS, NETWORKS, build_networks

_SN_SUFFIXES = {
    "weight_orig": "parametrizations.weight.original",
    "weight_u": "parametrizations.weight.0._u",
    "weight_v": "parametrizations.weight.0._v",
}


def _to_ours(key: str) -> str:
    for old, new in _SN_SUFFIXES.items():
        if key.endswith("." + old):
            return key[: -len(old)] + new
    return key


def _to_official(key: str) -> str:
    for old, new in _SN_SUFFIXES.items():
        if key.endswith("." + new):
            return key[: -len(new)] + old
    return key


def read_official(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Load an official checkpoint as plain tensors, never executing code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "not an allowed global" in str(exc):
            raise CheckpointError(
                f"{path}: refused, it holds Python objects that would need code to be run to load "
                "(only plain tensors and dicts are accepted)"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (its contents cannot be unpickled)") from None
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, ... on files that are not checkpoints
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_first_line(exc)})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise CheckpointError(f"{path}: not an official U-GAT-IT checkpoint (expected a dict of the six networks)")
    missing = [name for name in NETWORKS if name not in data]
    extra = sorted(set(data) - set(NETWORKS))
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing networks " + ", ".join(missing))
        if extra:
            parts.append("unexpected entries " + ", ".join(extra))
        raise CheckpointError(f"{path}: not an official U-GAT-IT checkpoint ({'; '.join(parts)})")
    for name in NETWORKS:
        state = data[name]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: entry {name!r} is not a state_dict of tensors")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def infer_config(official: dict[str, dict[str, torch.Tensor]], img_size: int | None = None) -> ModelConfig:
    """The architecture of an official checkpoint, from its tensor shapes.

    A full-mode MLP's input width fixes the image size; a light model needs `img_size` (default 256, the
    official default).
    """
    gen = official["genA2B"]
    try:
        ch = gen["DownBlock.1.weight"].shape[0]
        n_res = len([k for k in gen if re.fullmatch(r"UpBlock1_\d+\.conv1\.weight", k)])
        mlp_in = gen["FC.0.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"genA2B lacks {exc.args[0]!r}: not an official U-GAT-IT generator") from None
    dim = ch * 4
    light = mlp_in == dim
    if not light:
        side = round((mlp_in / dim) ** 0.5)
        if side * side * dim != mlp_in:
            raise CheckpointError(f"genA2B FC.0.weight has {mlp_in} inputs, which fits no image size for ch={ch}")
        inferred = side * 4
        if img_size is not None and img_size != inferred:
            raise CheckpointError(f"this full-mode model was trained at {inferred} px, not {img_size} px")
        img_size = inferred

    def layers(name: str) -> int:
        return len([k for k in official[name] if re.fullmatch(r"model\.\d+\.weight_orig", k)]) + 1

    try:
        return ModelConfig(
            img_size=img_size or 256,
            ch=ch,
            n_res=n_res,
            light=light,
            global_layers=layers("disGA"),
            local_layers=layers("disLA"),
        )
    except ConfigError as exc:
        raise CheckpointError(f"unusable architecture: {exc}") from None


def official_to_ours(
    official: dict[str, dict[str, torch.Tensor]], config: ModelConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """Rename keys into our layout and check them, key by key and shape by shape, against `config`'s networks."""
    expected = {name: net.state_dict() for name, net in build_networks(config).items()}
    ours: dict[str, dict[str, torch.Tensor]] = {}
    for name in NETWORKS:
        state = dict(official[name])
        if name not in DISCRIMINATORS and "FC.1.weight" in state and "FC.2.weight" not in state:
            state["FC.2.weight"] = state.pop("FC.1.weight")  # written before 2019-08-07
        converted = {_to_ours(key): value for key, value in state.items()}
        missing = [k for k in expected[name] if k not in converted]
        extra = [k for k in converted if k not in expected[name]]
        if missing:
            raise CheckpointError(f"{name} is missing {_to_official(missing[0])}" + _more(missing))
        if extra:
            raise CheckpointError(f"{name} has unexpected key {_to_official(extra[0])}" + _more(extra))
        for key, value in converted.items():
            want = tuple(expected[name][key].shape)
            if tuple(value.shape) != want:
                raise CheckpointError(
                    f"{name}.{_to_official(key)} has shape {tuple(value.shape)}, "
                    f"expected {want} for {config.describe()}"
                )
        ours[name] = {k: v.to(torch.float32).contiguous() for k, v in converted.items()}
    return ours


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def ours_to_official(
    states: dict[str, dict[str, torch.Tensor]], config: ModelConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """Our six state_dicts in the official layout (old spectral-norm keys, official key order), for `torch.save`."""
    with torch.device("meta"):
        order = {name: list(net.state_dict()) for name, net in build_networks(config).items()}
    return {
        name: {_to_official(key): states[name][key].detach().cpu().clone() for key in order[name]} for name in NETWORKS
    }


def load_official(
    path: str | Path, img_size: int | None = None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """Read, check and convert an official checkpoint; errors name the file."""
    official = read_official(path)
    try:
        config = infer_config(official, img_size)
        return config, official_to_ours(official, config)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def save_official(states: dict[str, dict[str, torch.Tensor]], config: ModelConfig, path: str | Path) -> None:
    if config.arch != "official":
        raise CheckpointError(
            f"a model of the {config.arch} architecture has no official PyTorch layout: the official PyTorch code "
            "cannot run it; use it with ugatit, or export it to ONNX"
        )
    official = ours_to_official(states, config)
    atomic_write(Path(path), lambda tmp: torch.save(official, tmp))
