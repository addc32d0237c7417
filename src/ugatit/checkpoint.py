"""Everything ugatit writes to disk for a model or a run, and reads back, each file through `files.atomic_write`.

A model file (`model.safetensors`) holds tensors keyed `<network>.<parameter>` (for example `genA2B.FC.0.weight`)
and, in its safetensors metadata, the `ModelConfig` as JSON: loading needs nothing but the file. Files written
before the configuration was split embed every setting of their run under "config"; they load the same.

A run folder:

    config.json            {"model": ModelConfig, "run": RunConfig} of the run
    checkpoints/step_NNNNNNN/model.safetensors   the six networks
    checkpoints/step_NNNNNNN/state.pt            optimizers, step, data positions, RNG states (weights_only loadable)
    checkpoints/best/                            with --eval-every: the checkpoint of the best KID so far

Wherever a model is accepted, a run folder means its latest checkpoint (`resolve_model`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from . import __version__
from .config import ConfigError, ModelConfig, model_config_from_dict, model_config_to_json
from .files import atomic_write
from .models import NETWORKS

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_PREFIX = "step_"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and what is wrong with it."""


# ---------------------------------------------------------------------------------------------------------------
# Writing


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's contents, read in chunks: it identifies weights files, which may be large."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, value: Any) -> None:
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Model files


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


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """float32 tensors in the safetensors format (little-endian header length, JSON header padded to 8 bytes, raw
    data), written a tensor at a time from its own memory: `safetensors.torch.save_file` first copies every tensor
    into one buffer, which doubles the memory that saving a large model needs."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(f"{name}: write_safetensors takes contiguous float32 tensors")
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for tensor in tensors.values():
            f.write(memoryview(tensor.numpy().reshape(-1)).cast("B"))


def save_model(
    path: str | os.PathLike, states: dict[str, dict[str, torch.Tensor]], config: ModelConfig, **meta: str
) -> None:
    """Write network state_dicts and their model config to one safetensors file, atomically."""
    tensors = flatten(states)
    metadata = {"format": "ugatit", "ugatit_version": __version__, "model_config": model_config_to_json(config), **meta}
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (half-written ones keep a temporary name and are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            step = path.name.removeprefix(CHECKPOINT_PREFIX)
            if path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (path / STATE_FILE).is_file():
                found.append((int(step), path))
    return sorted(found)


def is_run_folder(path: str | os.PathLike) -> bool:
    """A folder that training writes (its config or its checkpoints), as opposed to a checkpoint or Hub folder."""
    path = Path(path)
    if not path.is_dir() or (path / MODEL_FILE).exists():
        return False
    return (path / "checkpoints").is_dir() or (path / CONFIG_FILE).is_file()


def resolve_model(path: str | os.PathLike) -> Path:
    """The model file that `path` stands for: the file itself, a folder holding `model.safetensors` (a checkpoint
    or a Hub-style folder), or a run folder, which means its latest checkpoint."""
    path = Path(path)
    if is_run_folder(path):
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: a run folder with no checkpoint yet; train it first or name a checkpoint")
        path = found[-1][1]
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def describe_source(given: str | os.PathLike, file: Path) -> str:
    """ "RUN: latest checkpoint step_N" where a run folder was given, else the path itself."""
    if is_run_folder(given):
        return f"{given}: latest checkpoint {file.parent.name}"
    return str(given)


def _open(file: Path) -> Any:
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a ugatit checkpoint (not a safetensors file: {exc})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    file = resolve_model(path)
    with _open(file) as f:
        return f.metadata() or {}


def stored_networks(path: str | os.PathLike) -> set[str]:
    """The names of the networks a model file (or what `resolve_model` makes of a path) holds, read from its header."""
    file = resolve_model(path)
    with _open(file) as f:
        return _networks(f)


def _networks(f: Any) -> set[str]:
    return {key.partition(".")[0] for key in f.keys()}


def _model_config(file: Path, metadata: dict[str, str]) -> ModelConfig:
    stored = metadata.get("model_config", metadata.get("config"))  # "config": written before the split
    if metadata.get("format") != "ugatit" or stored is None:
        raise CheckpointError(f"{file}: not a ugatit checkpoint (no embedded config)")
    try:
        return model_config_from_dict(json.loads(stored), str(file))
    except (ConfigError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{file}: its embedded config is unusable ({exc})") from None


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    file = resolve_model(path)
    return _model_config(file, read_metadata(file))


def load_model(
    path: str | os.PathLike, networks: Iterable[str] | None = None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """Read a model file: its model config and the state_dicts of `networks` (all stored ones by default)."""
    file = resolve_model(path)
    with _open(file) as f:
        config = _model_config(file, f.metadata() or {})
        stored = _networks(f)
        wanted = list(networks) if networks is not None else [n for n in NETWORKS if n in stored]
        missing = [n for n in wanted if n not in stored]
        if missing:
            raise CheckpointError(f"{file}: holds no {', '.join(missing)} (it has {', '.join(sorted(stored))})")
        # Read only the networks asked for: a full-mode generator alone is 1 GiB.
        tensors = {key: f.get_tensor(key) for key in f.keys() if key.partition(".")[0] in wanted}
    states = unflatten(tensors)
    return config, {name: states[name] for name in wanted}


def fit_states(nets: dict[str, torch.nn.Module], states: dict[str, dict[str, torch.Tensor]], source: Path) -> None:
    """Load each of `nets` (keyed by network name) with its state; a mismatch names the file it came from."""
    for name, net in nets.items():
        try:
            net.load_state_dict(states[name])
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{source}: {name} does not fit its embedded config ({first_line})") from None


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a training step draws from, as plain tensors and numbers."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(trainer: Any, run_dir: str | os.PathLike, extra: dict[str, Any], name: str | None = None) -> Path:
    """Write a trainer's `checkpoints/step_N` (or `checkpoints/<name>`, replacing it) atomically. `extra` (data
    positions, RNG states, ...) goes into the training state beside the optimizers."""
    final = Path(run_dir) / "checkpoints" / (name or f"{CHECKPOINT_PREFIX}{trainer.step:07d}")
    if final.exists() and name is None:
        return final

    def write(folder: Path) -> None:
        folder.mkdir()
        states = {net_name: net.state_dict() for net_name, net in trainer.nets.items()}
        save_model(folder / MODEL_FILE, states, trainer.model, step=str(trainer.step))
        state = {"step": trainer.step, "skipped": dict(trainer.skipped), "opt_G": trainer.opt_G.state_dict(),
                 "opt_D": trainer.opt_D.state_dict()}  # fmt: skip
        torch.save({**state, **extra}, folder / STATE_FILE)

    return atomic_write(final, write)


def load_checkpoint(trainer: Any, checkpoint: str | os.PathLike, rank: int = 0) -> dict[str, Any]:
    """Restore a trainer's networks, optimizers, step and this rank's RNG states; returns the saved state."""
    checkpoint = Path(checkpoint)
    _, states = load_model(checkpoint, list(trainer.nets))
    fit_states(trainer.nets, states, checkpoint)
    try:
        # Loaded on the CPU: the RNG states must stay there, and each optimizer moves its moments to its parameters.
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: say which and stop, rather than train from a wrong state
        raise CheckpointError(f"{checkpoint / STATE_FILE}: unreadable training state ({exc})") from None
    trainer.load_optimizers(state)
    trainer.step = state["step"]
    trainer.skipped = dict(state.get("skipped", trainer.skipped))  # absent from checkpoints written before it was
    set_rng_state(state["rng"][rank % len(state["rng"])], trainer.device)
    return state


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the last `keep_last` step checkpoints (0 keeps them all)."""
    if keep_last > 0:
        for _, path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path)
