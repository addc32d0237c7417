"""Training runs: a run folder around `Trainer`, with checkpoints and exact resume, logs and sample grids.

A run folder holds `config.json` (the model and run configurations), `checkpoints/` (see `checkpoint.py`),
`log.jsonl` (every loss term every `log_every` steps, and the seconds per step waiting for data, `data_s`, and in
the step, `step_s`), `samples.json` (the images shown in sample grids, chosen once per run), `samples/A2B_N.png`,
`samples/B2A_N.png`, and `tensorboard/` when tensorboard is installed.

Resuming needs nothing but the folder: the data order and every augmentation are pure functions of the seed and
the number of samples consumed, so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (
    CONFIG_FILE,
    fit_states,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    read_model_config,
    resolve_model,
    rng_state,
    save_checkpoint,
    write_json,
)  # fmt: skip
from .config import RESUMABLE, ConfigError, ModelConfig, RunConfig, split_settings, to_dict
from .data import DataError, eval_transform, format_report, infinite_batches, load_rgb, scan_dataset
from .devices import ieee_fp32, resolve_device
from .files import atomic_write
from .models import GENERATORS, NETWORKS
from .trainer import Trainer
from .tuning import enable_huge_pages
from .visualize import make_grid, sample_column, save_image

SAMPLES_PER_SPLIT = 5
FRAMING = ("keep_aspect",)  # model settings that a run initialised from another model's weights may change
LOG_FILE = "log.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# The configuration of a run folder


def read_run_configs(run_dir: str | os.PathLike) -> tuple[ModelConfig, RunConfig]:
    """The configurations stored in a run folder (flat files written before the split load too)."""
    file = Path(run_dir) / CONFIG_FILE
    values = json.loads(file.read_text())
    flat = {**values["model"], **values["run"]} if "model" in values else values
    model, run = split_settings(flat, str(file))
    return ModelConfig(**model), RunConfig(**run)


def resolve_configs(
    run_dir: str | os.PathLike,
    requested: dict[str, Any],
    overwrite: bool = False,
    init_from: str | os.PathLike | None = None,
) -> tuple[ModelConfig, RunConfig]:
    """The configurations of a run: new ones from `requested` (flat settings), or for a run folder that holds
    checkpoints its stored ones with `requested` applied, as long as only resumable run settings change. A new run
    initialised from a model file (`init_from`) has that model's architecture; only its framing may change."""
    if overwrite or not list_checkpoints(run_dir):
        model, run = split_settings(requested)
        if init_from is None:
            return ModelConfig(**model), RunConfig(**run)
        return _init_model_config(init_from, model), RunConfig(**run)
    _, run_settings = split_settings(requested)
    stored_model, stored_run = read_run_configs(run_dir)
    _refuse_other_settings(run_dir, stored_model, stored_run, requested)
    return stored_model, dataclasses.replace(stored_run, **run_settings)


def _init_model_config(init_from: str | os.PathLike, requested: dict[str, Any]) -> ModelConfig:
    stored = read_model_config(init_from)
    conflicts = [k for k, v in requested.items() if k not in FRAMING and getattr(stored, k) != v]
    if conflicts:
        options = ", ".join("--" + k.replace("_", "-") for k in conflicts)
        raise ConfigError(
            f"--init-from {init_from} holds a {stored.describe()} model, whose architecture the run keeps: drop "
            f"{options} (or their preset or config-file settings)"
        )
    return dataclasses.replace(stored, **{k: v for k, v in requested.items() if k in FRAMING})


def _refuse_other_settings(
    run_dir: str | os.PathLike, model: ModelConfig, run: RunConfig, requested: dict[str, Any]
) -> None:
    """A run resumes with its own settings but the resumable ones; anything else would silently be another run."""
    stored = {**to_dict(model), **to_dict(run)}
    changed = {k: v for k, v in requested.items() if stored.get(k) != v and k not in RESUMABLE}
    conflicts = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in changed.items()]
    if conflicts:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({', '.join(conflicts)}): resume it with its own settings, "
            "pick another --run-dir, or pass --overwrite to delete it and start again"
        )


def _clear_run(run_dir: Path) -> None:
    """Delete what a run writes (and nothing else) before starting again with --overwrite."""
    for name in ("checkpoints", "samples", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (CONFIG_FILE, "samples.json", LOG_FILE):
        (run_dir / name).unlink(missing_ok=True)


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop entries logged after the checkpoint we resume from: those steps will be trained again."""
    if log_file.is_file():
        kept = [line for line in log_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        text = "".join(line + "\n" for line in kept)
        atomic_write(log_file, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------------------------------
# Data and samples


def _scan(data_root: Path, model: ModelConfig, skip_bad_images: bool, echo: Callable[[str], None]) -> dict:
    reports = scan_dataset(data_root, min_size=max(8, model.img_size // 2))
    bad = {name: r for name, r in reports.items() if r.bad}
    if bad and not skip_bad_images:
        raise DataError(f"{data_root} has unusable images; fix or remove them, or pass --skip-bad-images:\n"
                        + format_report(bad))  # fmt: skip
    if bad:
        echo("skipping unusable images:\n" + format_report(bad))
    return reports


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


@torch.no_grad()
@ieee_fp32()
def sample_grids(trainer: Trainer, images: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A2B and B2A grids in the official layout: one column per image, tiles real | identity heatmap | identity |
    translation heatmap | translation | cycle heatmap | cycle. Eval mode: no spectral-norm step, no graph."""
    nets = trainer.nets
    grids = {}
    for name, x, forward, backward in (
        ("A2B", images["A"], nets["genA2B"], nets["genB2A"]),
        ("B2A", images["B"], nets["genB2A"], nets["genA2B"]),
    ):
        forward.eval(), backward.eval()
        try:
            x = x.to(trainer.device)
            identity, _, identity_heat = backward(x)
            fake, _, fake_heat = forward(x)
            cycle, _, cycle_heat = backward(fake)
        finally:  # training goes on in train mode even after a failed sample
            forward.train(), backward.train()
        tiles = (x, identity, identity_heat, fake, fake_heat, cycle, cycle_heat)
        grids[name] = make_grid([sample_column(*(t[i].float().cpu() for t in tiles)) for i in range(x.shape[0])])
    return grids


# ---------------------------------------------------------------------------------------------------------------
# A run in progress


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


@dataclass
class _StepTiming:
    """Seconds spent waiting for the next batches and in the training step, averaged over the steps since the last
    log line: a data wait that is not close to zero means the loader is on the critical path (more workers, or
    `cache_images`, fix it). Under torchrun the log has each figure's largest value over ranks, since a rank that
    waits for data holds up the others. On CUDA the step's time includes its synchronisation (the loss values)."""

    data_s: float = 0.0
    step_s: float = 0.0
    steps: int = 0

    def add(self, data_s: float, step_s: float) -> None:
        self.data_s, self.step_s, self.steps = self.data_s + data_s, self.step_s + step_s, self.steps + 1

    def means(self) -> dict[str, float]:
        """The means since the last call, which starts a new interval."""
        means = {"data_s": round(self.data_s / self.steps, 4), "step_s": round(self.step_s / self.steps, 4)}
        self.data_s = self.step_s = 0.0
        self.steps = 0
        return means


@dataclass
class Run:
    """A training run in progress: the trainer, where its data comes from, and where its outputs go."""

    trainer: Trainer
    folder: Path
    data_root: Path
    info: distributed.Dist
    reports: dict
    echo: Callable[[str], None]
    start_step: int = 0
    start_consumed: int = 0
    best_kid: float = float("inf")
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: dict[str, Iterator] = field(default_factory=dict)
    writer: Any = None
    tracker: Any = None
    timing: _StepTiming = field(default_factory=_StepTiming)
    started: float = field(default_factory=time.time)

    @property
    def run(self) -> RunConfig:
        return self.trainer.run

    @property
    def main(self) -> bool:
        return self.info.is_main

    def consumed(self) -> int:
        """Samples of each domain consumed so far, all ranks together."""
        per_step = self.run.batch_size * self.info.world_size
        return self.start_consumed + (self.trainer.step - self.start_step) * per_step

    def _resume_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """What a checkpoint needs beside weights and optimizers: data positions, per-rank RNG, world size."""
        data = {d: {"seed": domain_seed(self.run, d), "consumed": self.consumed()} for d in "AB"}
        return {"data": data, "rng": rng, "world_size": self.info.world_size}

    def checkpoint(self) -> None:
        rng = distributed.gather(self.info, rng_state(self.trainer.device))
        if self.main:
            save_checkpoint(self.trainer, self.folder, self._resume_state(rng))
            prune_checkpoints(self.folder, self.run.keep_last)
        distributed.barrier(self.info)

    def write_samples(self) -> None:
        if not self.main:
            return
        step = self.trainer.step
        for name, grid in sample_grids(self.trainer, self.samples).items():
            save_image(grid, self.folder / "samples" / f"{name}_{step:07d}.png")
            if self.writer:
                self.writer.add_image(f"samples/{name}", np.asarray(grid), step, dataformats="HWC")
        if self.writer:
            for gen in GENERATORS:
                for name, param in self.trainer.nets[gen].named_parameters():
                    if name.rpartition(".")[2] == "rho":
                        self.writer.add_histogram(f"rho/{gen}.{name.removesuffix('.rho')}", param.detach().cpu(), step)

    def evaluate(self, log: Any) -> None:
        """KID of both directions on the test images; the best checkpoint so far is kept as `checkpoints/best`."""
        if self.tracker:
            step = self.trainer.step
            scores = self.tracker(self.trainer)
            kid = (scores["kid_A2B"] + scores["kid_B2A"]) / 2
            _write_line(log, {"step": step, "eval": {**scores, "kid_mean": kid}})
            if self.writer:
                for key, value in scores.items():
                    self.writer.add_scalar(f"eval/{key}", value, step)
            if kid < self.best_kid:
                self.best_kid = kid
                save_checkpoint(self.trainer, self.folder, self._resume_state([rng_state(self.trainer.device)]), "best")
                write_json(self.folder / "checkpoints" / "best.json", {"step": step, "kid": kid, **scores})
        distributed.barrier(self.info)

    def log(self, log: Any, terms: dict[str, float], bar: tqdm) -> None:
        """One log line (losses averaged over ranks, timings the slowest rank's), the bar, TensorBoard."""
        dev, step = self.trainer.device, self.trainer.step
        terms = distributed.mean_over_ranks(self.info, terms, dev)
        times = distributed.max_over_ranks(self.info, self.timing.means(), dev)
        _write_line(log, {"step": step, "time": round(time.time() - self.started, 3), **times, **terms})
        postfix = {"d_loss": f"{terms['d_loss']:.3f}", "g_loss": f"{terms['g_loss']:.1f}"}
        if times["data_s"] + times["step_s"] > 0:
            postfix["data"] = f"{times['data_s'] / (times['data_s'] + times['step_s']):.0%}"
        if any(self.trainer.skipped.values()):
            postfix["skipped"] = "D{D} G{G}".format(**self.trainer.skipped)
        bar.set_postfix(postfix, refresh=False)
        if self.writer:
            for key, value in terms.items():
                self.writer.add_scalar(f"loss/{key}" if key != "lr" else "lr", value, step)
            for key, value in times.items():
                self.writer.add_scalar(f"time/{key}", value, step)


def domain_seed(run: RunConfig, domain: str) -> int:
    """Each domain's own data seed: with one seed for both, A and B would share their shuffling order."""
    return 2 * run.seed + (domain == "B")


def _write_line(log: Any, entry: dict[str, Any]) -> None:
    log.write(json.dumps(entry) + "\n")
    log.flush()


# ---------------------------------------------------------------------------------------------------------------
# Starting, resuming and running


def _scan_on_rank0(data_root: Path, model: ModelConfig, info: distributed.Dist, skip: bool, echo: Callable) -> dict:
    """Rank 0 decodes every image once; the others take its verdict (and its error, so that no rank hangs)."""
    scanned = None
    if info.is_main:
        try:
            scanned = (_scan(data_root, model, skip, echo), None)
        except DataError as exc:
            scanned = (None, exc)
    reports, error = distributed.broadcast(info, scanned)
    if error is not None:
        raise error
    return reports


def _resume(run: Run, checkpoint: Path) -> None:
    trainer, info = run.trainer, run.info
    saved = load_checkpoint(trainer, checkpoint, info.rank)
    run.start_step, run.start_consumed = trainer.step, saved["data"]["A"]["consumed"]
    if run.main:
        _truncate_log(run.folder / LOG_FILE, trainer.step)
    run.echo(f"resuming {run.folder} from step {trainer.step}")
    if saved["world_size"] != info.world_size:
        per_step = run.run.batch_size * info.world_size
        run.echo(
            f"this run was saved with {saved['world_size']} process(es) and resumes on {info.world_size}: the "
            f"sample stream continues at sample {run.start_consumed}, now shared by {info.world_size} rank(s); "
            f"the effective batch changes from {saved['world_size'] * run.run.batch_size} to {per_step}"
        )
    best = run.folder / "checkpoints" / "best.json"
    if best.is_file():
        run.best_kid = json.loads(best.read_text())["kid"]


def _init_weights(run: Run, source: str | os.PathLike) -> None:
    file = resolve_model(source)
    _, states = load_model(file)
    fit_states({name: run.trainer.nets[name] for name in states}, states, file)
    fresh = [name for name in NETWORKS if name not in states]
    run.echo(f"initialised {', '.join(states)} from {source}"
             + (f"; {', '.join(fresh)} start from scratch" if fresh else ""))  # fmt: skip


def _open_data(run: Run, model: ModelConfig, inception_weights: str | os.PathLike | None) -> None:
    """The infinite batch streams from where the run stands, the sample images, TensorBoard and KID tracking."""
    cfg, info, dev = run.run, run.info, run.trainer.device
    samples_file = run.folder / "samples.json"
    resumed = run.trainer.step > 0 and samples_file.is_file()
    names = json.loads(samples_file.read_text()) if resumed else _choose_samples(run.reports, run.data_root, cfg.seed)
    cache = {"auto": "auto", "yes": True, "no": False}[cfg.cache_images]
    for d in "AB":
        run.batches[d] = infinite_batches(
            run.reports[f"train{d}"].good, model.img_size, cfg.batch_size, domain_seed(cfg, d),
            cfg.num_workers, augment=cfg.augment, keep_aspect=model.keep_aspect, margin=cfg.crop_margin,
            cache=cache, start=run.consumed(), rank=info.rank, world_size=info.world_size,
            pin_memory=dev.type == "cuda", name=f"train{d}",
        )  # fmt: skip
    if not run.main:
        return
    write_json(run.folder / CONFIG_FILE, {"model": to_dict(model), "run": to_dict(cfg)})
    write_json(samples_file, names)
    run.samples = {
        d: torch.stack(
            [eval_transform(load_rgb(run.data_root / n), model.img_size, model.keep_aspect) for n in names[d]]
        )
        for d in "AB"
    }
    run.writer = _tensorboard(run.folder)
    if cfg.eval_every:
        run.tracker = _kid_tracker(run.data_root, inception_weights)


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _kid_tracker(data_root: Path, weights: str | os.PathLike | None) -> Any:
    from .evaluate import KIDTracker

    for domain in "AB":
        if not (data_root / f"test{domain}").is_dir():
            raise DataError(f"--eval-every needs test images: {data_root / f'test{domain}'} is missing")
    return KIDTracker(data_root, weights)


def _loop(run: Run, last: int, progress: bool) -> bool:
    """Train up to step `last`; returns whether a signal stopped it first. Checkpoints, samples, KID and log lines
    come at their intervals, and a checkpoint at the end."""
    trainer, cfg, info, dev = run.trainer, run.run, run.info, run.trainer.device
    bar = tqdm(total=last, initial=trainer.step, disable=not (progress and run.main), unit="step", dynamic_ncols=True)
    run.started = time.time()  # the log's "time": seconds since the loop (re)started
    with open(run.folder / LOG_FILE, "a") if run.main else open(os.devnull, "w") as log, _StopRequest() as stop, bar:
        while trainer.step < last and not distributed.any_rank(info, stop.requested, dev):
            waiting = time.perf_counter()
            try:
                real_A, real_B = next(run.batches["A"]), next(run.batches["B"])
            except RuntimeError:
                if stop.requested:  # data workers interrupted by the same signal
                    break
                raise
            loaded = time.perf_counter()
            terms = trainer.train_step(real_A, real_B)
            run.timing.add(loaded - waiting, time.perf_counter() - loaded)
            bar.update(1)
            step = trainer.step
            if step % cfg.log_every == 0 or step == last:
                run.log(log, terms, bar)
            if step % cfg.sample_every == 0:
                run.write_samples()
            if cfg.eval_every and step % cfg.eval_every == 0:
                run.evaluate(log)
            if step % cfg.save_every == 0:
                run.checkpoint()
        bar.close()  # before the last samples and checkpoint, which print; the block closes it after an error too
        if trainer.step > run.start_step:
            if trainer.step == last and trainer.step % cfg.sample_every != 0:
                run.write_samples()
            run.checkpoint()
    return stop.requested


def train(
    model: ModelConfig,
    run: RunConfig,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    device: str = "auto",
    overwrite: bool = False,
    skip_bad_images: bool = False,
    until: int | None = None,
    progress: bool = True,
    inception_weights: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
    echo: Callable[[str], None] = print,
) -> Trainer:
    """Train (or resume) the run in `run_dir` on DATA/trainA and DATA/trainB up to `run.iterations` steps.

    `until` stops earlier, after that step, with a checkpoint. A run folder holding checkpoints resumes from its
    latest one (its settings are checked against `model` and `run`: `resolve_configs` gives them), unless
    `overwrite` deletes it first. A new run starts from the weights of the model file `init_from` (fine-tuning,
    with fresh optimizers) where given; networks the file lacks start from scratch. Started by torchrun, every
    process trains on its own share of the data with DistributedDataParallel, and only rank 0 writes checkpoints,
    samples and logs.
    """
    enable_huge_pages()
    info, dev = distributed.setup(resolve_device(device))
    state = None
    try:
        state = _start(model, run, Path(data_root), Path(run_dir), info, dev, overwrite, skip_bad_images, echo)
        if init_from is not None and state.trainer.step == 0:
            _init_weights(state, init_from)
        _open_data(state, model, inception_weights)
        last = min(run.iterations, until) if until is not None else run.iterations
        stopped = _loop(state, last, progress)
        if stopped and state.trainer.step < last:
            state.echo(f"stopped at step {state.trainer.step}; checkpoint saved, run the same command again to resume")
        return state.trainer
    finally:
        if state is not None and state.writer:  # what TensorBoard has buffered is written even after an error
            state.writer.close()
        distributed.teardown(info)


def _start(
    model: ModelConfig,
    run: RunConfig,
    data_root: Path,
    run_dir: Path,
    info: distributed.Dist,
    dev: torch.device,
    overwrite: bool,
    skip_bad_images: bool,
    echo: Callable[[str], None],
) -> Run:
    """The run, new or resumed from the folder's latest checkpoint, with its data checked."""
    echo = echo if info.is_main else (lambda message: None)
    distributed.check_same_config(info, {**to_dict(model), **to_dict(run)})
    if overwrite and info.is_main:
        _clear_run(run_dir)
    distributed.barrier(info)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        _refuse_other_settings(run_dir, *read_run_configs(run_dir), {**to_dict(model), **to_dict(run)})
    reports = _scan_on_rank0(data_root, model, info, skip_bad_images, echo)
    torch.manual_seed(run.seed)
    trainer = Trainer(model, run, dev, distributed=info.enabled)
    if run.fast:
        echo(f"fast path on {dev.type}: computing in {str(trainer.dtype).removeprefix('torch.')}")
    state = Run(trainer, run_dir, data_root, info, reports, echo)
    if checkpoints:
        _resume(state, checkpoints[-1][1])
    if info.enabled:
        echo(
            f"{info.world_size} processes x batch {run.batch_size} = effective batch {run.batch_size * info.world_size}"
        )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return state
