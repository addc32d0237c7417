"""Training runs: a run directory, checkpoints with exact resume, logs and sample grids around `Trainer`.

A run directory holds:

    config.json            the resolved Config of the run
    samples.json           the fixed images shown in sample grids (chosen once per run)
    log.jsonl              every loss term every `log_every` steps, and the seconds per step waiting for data
                           (data_s) and in the step (step_s)
    checkpoints/step_NNNNNNN/model.safetensors   the six networks, config embedded
    checkpoints/step_NNNNNNN/state.pt            optimizers, step, data positions, RNG states
    samples/A2B_NNNNNNN.png, samples/B2A_NNNNNNN.png
    tensorboard/           when tensorboard is installed

Resuming needs nothing but the directory: the data order and every augmentation are pure functions of the seed
and the number of samples consumed, so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import MODEL_FILE, CheckpointError, atomic_write, fsync_dir, load_model, save_model
from .config import Config
from .data import DataError, eval_transform, format_report, infinite_batches, load_rgb, scan_dataset
from .models import GENERATORS, NETWORKS
from .norms import ILN, AdaILN
from .trainer import Trainer
from .visualize import make_grid, sample_column, save_image

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "step_"
SAMPLES_PER_SPLIT = 5
# Settings that may change when a run is resumed; any other difference means a different run.
RESUMABLE = {
    "iterations", "save_every", "sample_every", "log_every", "keep_last", "num_workers", "eval_every",
    "cache_images", "precision", "fast_dtype", "compile", "grad_checkpoint",
}  # fmt: skip


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (half-written ones keep a temporary name and are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            step = path.name.removeprefix(CHECKPOINT_PREFIX)
            if path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (path / STATE_FILE).is_file():
                found.append((int(step), path))
    return sorted(found)


def _rng_state(device: torch.device) -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(trainer: Trainer, run_dir: str | Path, extra: dict[str, Any], name: str | None = None) -> Path:
    """Write `checkpoints/step_N` (or `checkpoints/<name>`, replacing it) atomically: into a temporary folder,
    fsynced, then renamed into place."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / (name or f"{CHECKPOINT_PREFIX}{trainer.step:07d}")
    if final.exists() and name is None:
        return final
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    old = folder / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        states = {net_name: net.state_dict() for net_name, net in trainer.nets.items()}
        save_model(tmp / MODEL_FILE, states, trainer.config, step=str(trainer.step))
        state = {
            "step": trainer.step,
            "opt_G": trainer.opt_G.state_dict(),
            "opt_D": trainer.opt_D.state_dict(),
            **extra,
        }
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # a named checkpoint being replaced: keep the old one until the new one is in place
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer: Trainer, checkpoint: str | Path, rank: int = 0) -> dict[str, Any]:
    """Restore networks, optimizers, step and this rank's RNG states; returns the saved training state."""
    checkpoint = Path(checkpoint)
    _, states = load_model(checkpoint, NETWORKS)
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location=trainer.device, weights_only=True)
    except Exception as exc:  # a damaged file: say which and stop, rather than train from a wrong state
        raise CheckpointError(f"{checkpoint / STATE_FILE}: unreadable training state ({exc})") from None
    for name, net in trainer.nets.items():
        net.load_state_dict(states[name])
    trainer.opt_G.load_state_dict(state["opt_G"])
    trainer.opt_D.load_state_dict(state["opt_D"])
    trainer.step = state["step"]
    _set_rng_state(state["rng"][rank % len(state["rng"])], trainer.device)
    return state


def _prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    if keep_last > 0:
        for _, path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------------
# Run directory


def run_config(run_dir: str | Path, requested: dict[str, Any], overwrite: bool = False) -> Config:
    """The config of a run: a new one from `requested`, or the stored one of an existing run with `requested`
    applied, as long as only settings in RESUMABLE change (anything else would silently be another run)."""
    config_file = Path(run_dir) / "config.json"
    if overwrite or not config_file.is_file() or not list_checkpoints(run_dir):
        return Config(**requested)
    stored = Config.from_dict(json.loads(config_file.read_text()))
    changed = {k: v for k, v in requested.items() if getattr(stored, k) != v}
    conflicts = [f"{k} {getattr(stored, k)!r} -> {v!r}" for k, v in changed.items() if k not in RESUMABLE]
    if conflicts:
        raise DataError(
            f"{run_dir} holds a run with other settings ({', '.join(conflicts)}): resume it with its own settings, "
            "pick another --run-dir, or pass --overwrite to delete it and start again"
        )
    return stored.replace(**changed)


def _clear_run(run_dir: Path) -> None:
    """Delete what a run writes (and nothing else) before starting again with --overwrite."""
    for name in ("checkpoints", "samples", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("config.json", "samples.json", "log.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop entries logged after the checkpoint we resume from: those steps will be trained again."""
    if log_file.is_file():
        kept = [line for line in log_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(log_file, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


# ---------------------------------------------------------------------------------------------------------------
# Samples


def _choose_samples(reports: dict, data_root: Path, seed: int) -> dict[str, list[str]]:
    """Pick the grid images once per run: 5 train and 5 test images per domain (10 train ones without a test set)."""
    rng = random.Random(seed)
    chosen = {}
    for domain in "AB":
        train = reports[f"train{domain}"].good
        test = reports[f"test{domain}"].good if f"test{domain}" in reports else []
        if test:
            picks = rng.sample(train, min(SAMPLES_PER_SPLIT, len(train))) + rng.sample(
                test, min(SAMPLES_PER_SPLIT, len(test))
            )
        else:
            picks = rng.sample(train, min(2 * SAMPLES_PER_SPLIT, len(train)))
        chosen[domain] = [str(path.relative_to(data_root)) for path in picks]
    return chosen


def _sample_batch(data_root: Path, names: list[str], config: Config) -> torch.Tensor:
    return torch.stack([eval_transform(load_rgb(data_root / n), config.img_size, config.keep_aspect) for n in names])


@torch.no_grad()
def sample_grids(trainer: Trainer, images_A: torch.Tensor, images_B: torch.Tensor) -> dict[str, Any]:
    """A2B and B2A grids in the official layout: one column per image, tiles real | identity heatmap | identity |
    translation heatmap | translation | cycle heatmap | cycle. Eval mode: no spectral-norm step, no graph."""
    nets = trainer.nets
    grids = {}
    for name, images, forward, backward in (
        ("A2B", images_A, nets["genA2B"], nets["genB2A"]),
        ("B2A", images_B, nets["genB2A"], nets["genA2B"]),
    ):
        forward.eval(), backward.eval()
        x = images.to(trainer.device)
        identity, _, identity_heat = backward(x)
        fake, _, fake_heat = forward(x)
        cycle, _, cycle_heat = backward(fake)
        forward.train(), backward.train()
        columns = [
            sample_column(
                *(t[i].float().cpu() for t in (x, identity, identity_heat, fake, fake_heat, cycle, cycle_heat))
            )
            for i in range(x.shape[0])
        ]
        grids[name] = make_grid(columns)
    return grids


# ---------------------------------------------------------------------------------------------------------------
# The loop


class _StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step and save; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _kid_tracker(data_root: Path, weights: str | Path | None) -> Any:
    from .evaluate import KIDTracker

    for domain in "AB":
        if not (data_root / f"test{domain}").is_dir():
            raise DataError(f"--eval-every needs test images: {data_root / f'test{domain}'} is missing")
    return KIDTracker(data_root, weights)


class _StepTiming:
    """Seconds spent waiting for the next batches and in the training step, averaged over the steps since the last
    log line: a data wait that is not close to zero means the loader is on the critical path (more workers, or
    `cache_images`, fix it). Under torchrun the log has each figure's largest value over ranks, since a rank that
    waits for data holds up the others in their gradient all-reduce. On CUDA the step's time includes its
    synchronisation (the loss values)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.data_s = self.step_s = 0.0
        self.steps = 0

    def add(self, data_s: float, step_s: float) -> None:
        self.data_s += data_s
        self.step_s += step_s
        self.steps += 1

    def means(self) -> dict[str, float]:
        """The means since the last call, which starts a new interval."""
        means = {"data_s": round(self.data_s / self.steps, 4), "step_s": round(self.step_s / self.steps, 4)}
        self._reset()
        return means


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _domain_batches(
    config: Config, paths: list, seed: int, consumed: int, device: torch.device, name: str, info: distributed.Dist
) -> Iterator:
    cache = {"auto": "auto", "yes": True, "no": False}[config.cache_images]
    return infinite_batches(
        paths, config.img_size, config.batch_size, seed, config.num_workers,
        augment=config.augment, keep_aspect=config.keep_aspect, margin=config.crop_margin, cache=cache, start=consumed,
        rank=info.rank, world_size=info.world_size, pin_memory=device.type == "cuda", name=name,
    )  # fmt: skip


def _scan(data_root: Path, config: Config, skip_bad_images: bool, echo: Callable[[str], None]) -> dict:
    reports = scan_dataset(data_root, min_size=max(8, config.img_size // 2))
    bad = {name: r for name, r in reports.items() if r.bad}
    if bad and not skip_bad_images:
        raise DataError(f"{data_root} has unusable images; fix or remove them, or pass --skip-bad-images:\n"
                        + format_report(bad))  # fmt: skip
    if bad:
        echo("skipping unusable images:\n" + format_report(bad))
    return reports


def train(
    config: Config,
    data_root: str | Path,
    run_dir: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    skip_bad_images: bool = False,
    until: int | None = None,
    progress: bool = True,
    inception_weights: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> Trainer:
    """Train (or resume) the run in `run_dir` on DATA/trainA and DATA/trainB up to `config.iterations` steps.

    `until` stops earlier, after that step, with a checkpoint. With `config.eval_every`, KID x 100 of both
    directions on the test images is logged every that many steps and the best checkpoint is kept as
    `checkpoints/best`. The run resumes from its latest checkpoint when
    `run_dir` holds one with a compatible config (see `run_config`); `overwrite` deletes it and starts again.
    Started by torchrun, every process trains on its own share of the data with DistributedDataParallel, and
    only rank 0 writes checkpoints, samples and logs.
    """
    data_root, run_dir = Path(data_root), Path(run_dir)
    info, dev = distributed.setup(resolve_device(device))
    try:
        return _train(
            config, data_root, run_dir, info, dev, overwrite, skip_bad_images, until, progress, inception_weights, echo
        )
    finally:
        distributed.teardown(info)


def _train(
    config: Config,
    data_root: Path,
    run_dir: Path,
    info: distributed.Dist,
    dev: torch.device,
    overwrite: bool,
    skip_bad_images: bool,
    until: int | None,
    progress: bool,
    inception_weights: str | Path | None,
    echo: Callable[[str], None],
) -> Trainer:
    main = info.is_main
    echo = echo if main else (lambda message: None)
    distributed.check_same_config(info, config)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not overwrite:
        config = run_config(run_dir, {f.name: getattr(config, f.name) for f in fields(config)})
    elif overwrite:
        if main:
            _clear_run(run_dir)
        distributed.barrier(info)
        checkpoints = []

    # Rank 0 decodes every image once; the others take its verdict (and its error, so that no rank hangs).
    scanned = None
    if main:
        try:
            scanned = (_scan(data_root, config, skip_bad_images, echo), None)
        except DataError as exc:
            scanned = (None, exc)
    reports, error = distributed.broadcast(info, scanned)
    if error is not None:
        raise error

    torch.manual_seed(config.seed)
    trainer = Trainer(config, dev, distributed=info.enabled)
    if config.fast:
        echo(f"fast path on {dev.type}: computing in {str(trainer.dtype).removeprefix('torch.')}")
    samples_file = run_dir / "samples.json"
    if checkpoints and samples_file.is_file():
        sample_names = json.loads(samples_file.read_text())
    else:
        sample_names = _choose_samples(reports, data_root, config.seed)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "config.json", config.to_dict())
        _write_json(samples_file, sample_names)
    seeds = {"A": 2 * config.seed, "B": 2 * config.seed + 1}
    per_step = config.batch_size * info.world_size  # samples of each domain consumed per step, all ranks together
    start_step, start_consumed = 0, 0
    if checkpoints:
        saved = load_checkpoint(trainer, checkpoints[-1][1], info.rank)
        start_step, start_consumed = trainer.step, saved["data"]["A"]["consumed"]
        if main:
            _truncate_log(run_dir / "log.jsonl", trainer.step)
        echo(f"resuming {run_dir} from step {trainer.step}")
        if saved["world_size"] != info.world_size:
            echo(
                f"this run was saved with {saved['world_size']} process(es) and resumes on {info.world_size}: the "
                f"sample stream continues at sample {start_consumed}, now shared by {info.world_size} rank(s); "
                f"the effective batch changes from {saved['world_size'] * config.batch_size} to {per_step}"
            )
    if info.enabled:
        echo(f"{info.world_size} processes x batch {config.batch_size} = effective batch {per_step}")

    def consumed() -> int:
        return start_consumed + (trainer.step - start_step) * per_step

    def resume_state(rng: list[dict[str, Any]]) -> dict[str, Any]:
        """What a checkpoint needs beside weights and optimizers: data positions, per-rank RNG, world size."""
        data = {d: {"seed": seeds[d], "consumed": consumed()} for d in "AB"}
        return {"data": data, "rng": rng, "world_size": info.world_size}

    batches = {
        d: _domain_batches(config, reports[f"train{d}"].good, seeds[d], consumed(), dev, f"train{d}", info)
        for d in "AB"
    }
    samples = {d: _sample_batch(data_root, sample_names[d], config) for d in "AB"} if main else {}
    last = min(config.iterations, until) if until is not None else config.iterations
    writer = _tensorboard(run_dir) if main else None
    tracker = _kid_tracker(data_root, inception_weights) if config.eval_every and main else None
    best_file = run_dir / "checkpoints" / "best.json"
    best = json.loads(best_file.read_text())["kid"] if checkpoints and best_file.is_file() else float("inf")

    def evaluate(log: Any) -> None:
        nonlocal best
        if tracker:
            scores = tracker(trainer)
            kid = (scores["kid_A2B"] + scores["kid_B2A"]) / 2
            log.write(json.dumps({"step": trainer.step, "eval": {**scores, "kid_mean": kid}}) + "\n")
            log.flush()
            if writer:
                for key, value in scores.items():
                    writer.add_scalar(f"eval/{key}", value, trainer.step)
            if kid < best:
                best = kid
                save_checkpoint(trainer, run_dir, resume_state([_rng_state(trainer.device)]), name="best")
                _write_json(best_file, {"step": trainer.step, "kid": kid, **scores})
        distributed.barrier(info)

    def write_samples() -> None:
        if not main:
            return
        grids = sample_grids(trainer, samples["A"], samples["B"])
        for name, grid in grids.items():
            save_image(grid, run_dir / "samples" / f"{name}_{trainer.step:07d}.png")
            if writer:
                writer.add_image(f"samples/{name}", np.asarray(grid), trainer.step, dataformats="HWC")
        if writer:
            for gen in GENERATORS:
                for module_name, module in trainer.nets[gen].named_modules():
                    if isinstance(module, (AdaILN, ILN)):
                        writer.add_histogram(f"rho/{gen}.{module_name}", module.rho.detach().cpu(), trainer.step)

    def checkpoint() -> None:
        rng = distributed.gather(info, _rng_state(trainer.device))
        if main:
            save_checkpoint(trainer, run_dir, resume_state(rng))
            _prune_checkpoints(run_dir, config.keep_last)
        distributed.barrier(info)

    bar = tqdm(total=last, initial=trainer.step, disable=not (progress and main), unit="step", dynamic_ncols=True)
    started = time.time()
    log_path = run_dir / "log.jsonl"
    timing = _StepTiming()
    with open(log_path, "a") if main else open(os.devnull, "w") as log, _StopRequest() as stop:
        while trainer.step < last and not distributed.any_rank(info, stop.requested, dev):
            waiting = time.perf_counter()
            try:
                real_A, real_B = next(batches["A"]), next(batches["B"])
            except RuntimeError:
                if stop.requested:  # data workers interrupted by the same signal
                    break
                raise
            loaded = time.perf_counter()
            terms = trainer.train_step(real_A, real_B)
            timing.add(loaded - waiting, time.perf_counter() - loaded)
            bar.update(1)
            step = trainer.step
            if step % config.log_every == 0 or step == last:
                terms = distributed.mean_over_ranks(info, terms, dev)
                times = distributed.max_over_ranks(info, timing.means(), dev)
                entry = {"step": step, "time": round(time.time() - started, 3), **times, **terms}
                log.write(json.dumps(entry) + "\n")
                log.flush()
                postfix = {"d_loss": f"{terms['d_loss']:.3f}", "g_loss": f"{terms['g_loss']:.1f}"}
                if times["data_s"] + times["step_s"] > 0:
                    postfix["data"] = f"{times['data_s'] / (times['data_s'] + times['step_s']):.0%}"
                if any(trainer.skipped.values()):
                    postfix["skipped"] = "D{D} G{G}".format(**trainer.skipped)
                bar.set_postfix(postfix, refresh=False)
                if writer:
                    for key, value in terms.items():
                        writer.add_scalar(f"loss/{key}" if key != "lr" else "lr", value, step)
                    for key, value in times.items():
                        writer.add_scalar(f"time/{key}", value, step)
            if step % config.sample_every == 0:
                write_samples()
            if config.eval_every and step % config.eval_every == 0:
                evaluate(log)
            if step % config.save_every == 0:
                checkpoint()
        bar.close()
        if trainer.step > start_step:
            if trainer.step == last and trainer.step % config.sample_every != 0:
                write_samples()
            checkpoint()
    if writer:
        writer.close()
    if stop.requested and trainer.step < last:
        echo(f"stopped at step {trainer.step}; checkpoint saved, run the same command again to resume")
    return trainer
