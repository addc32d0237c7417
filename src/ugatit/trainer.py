"""One U-GAT-IT training iteration: the six networks, their two Adam optimizers, and the update rule.

`Trainer.train_step` is the official update (docs/spec.md section 3) with savings that leave every number unchanged:
the two translations of the real batches are computed once and shared by the discriminator update (detached) and
the generator update (6 generator passes per step instead of 8, and no backward through the generators in the D
update), and the discriminators' weight gradients are not computed in the G update. The discriminator update runs
per domain (backward, then Adam on that domain's two discriminators), which halves the gradient memory at its peak
and changes no number either; the one change in behaviour is that a non-finite gradient in one domain skips only
that domain's update.

With `precision="fast"` the trainer swaps `ugatit.fast` into its networks, computes in the fast dtype, uses fused
Adam, runs paired passes as one (`fast.stacked`) and, outside DDP, builds the discriminators' largest weight
gradients one at a time in their update (`fast.deferred_weight_grads`: the same numbers) and runs the G update's
backward in three parts, each generator's cycle and identity passes before the other generator's are computed, then
the rest (the same gradients, summed in another order); with "exact" it keeps the official fp32 computation.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import fast
from .config import ConfigError, ModelConfig, RunConfig
from .devices import ieee_fp32
from .losses import JUDGES, Outputs, cycle_and_identity_loss, discriminator_losses, generator_losses
from .models import DISCRIMINATORS, GENERATORS, build_networks
from .norms import clip_rho
from .tuning import release_free_heap

OTHER = {"A": "B", "B": "A"}
Optimizer = torch.optim.Adam | fast.Adam  # the exact path's and the fast path's


def learning_rate(run: RunConfig, step: int) -> float:
    """Learning rate of the 1-based step `step`: constant, then linear decay to 0 over the second half.

    The official loop subtracts lr / (iterations // 2) at the start of every step past the half-way point; this is
    the same value as a function of the step, so it is right after a resume too.
    """
    half = run.iterations // 2
    if not run.decay or half == 0 or step <= half:
        return run.lr
    return max(0.0, run.lr * (1.0 - (step - half) / half))


def _grads_finite(optimizer: Optimizer) -> bool:
    """Whether every gradient entry is finite: by the largest magnitude, which is NaN or inf only if an entry is
    (a 2-norm overflows for finite entries above about 1e19)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack(torch._foreach_norm(grads, math.inf)).isfinite().all()) if grads else True


def _adam(params: Iterator[nn.Parameter], run: RunConfig) -> Optimizer:
    # The exact path keeps PyTorch's default implementation, whose rounding the parity fixture was made with;
    # the fast path runs the fused kernel (one pass over all parameters, same update up to the last bits) through
    # `fast.Adam`, which does not import the compiler.
    if run.fast:
        return fast.Adam(params, lr=run.lr, betas=run.betas, weight_decay=run.weight_decay)
    return torch.optim.Adam(params, lr=run.lr, betas=run.betas, weight_decay=run.weight_decay)


# How torch.optim computes, as opposed to what it remembers: each path keeps its own when it loads a saved state.
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def _load_optimizer(optimizer: Optimizer, saved: dict[str, Any]) -> None:
    """Load a saved optimizer state (moments, step counts, hyperparameters) into `optimizer`, which keeps its own
    implementation. torch.optim would adopt the saved groups' flags, so an exact run resumed from a fast checkpoint
    (`--precision` may change on resume) would step with the fast path's fused Adam. The state comes on the CPU
    (`load_checkpoint`), where the default Adam keeps its step counts: on a GPU they would cost it a sync per
    parameter and step."""
    if isinstance(optimizer, torch.optim.Optimizer):
        groups = [
            {**group, **{key: own[key] for key in _IMPLEMENTATION if key in own}}
            for group, own in zip(saved["param_groups"], optimizer.param_groups, strict=False)  # torch checks counts
        ]
        saved = {**saved, "param_groups": groups}
    optimizer.load_state_dict(saved)


def _check_compiler(device: torch.device) -> None:
    """torch.compile's CPU code needs a C++ compiler, which it would only ask for at the first step, in a long
    traceback; this says so when the trainer is built."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a private helper: without it, the first step tells
        return
    try:
        get_cpp_compiler()
    except (RuntimeError, OSError) as exc:  # none found, or one that cannot run
        raise ConfigError(
            f"compile=True (--compile) on a CPU needs a C++ compiler: {exc}; install g++ or set CXX, or train without "
            "--compile"
        ) from None


def prepare(
    nets: dict[str, nn.Module], run: RunConfig, device: torch.device
) -> tuple[torch.dtype, torch.memory_format]:
    """Put built networks on `device` for training as `run` says, in place: the fast kernels or the lean pads,
    checkpointing, layout. Returns the compute dtype and the activations' memory format."""
    dtype = fast.resolve_dtype(run.fast_dtype, device) if run.fast else torch.float32
    layout = fast.memory_format(device, dtype) if run.fast else torch.contiguous_format
    for name, net in nets.items():
        if run.fast:
            fast.apply(net)
        else:
            fast.lean(net)
        if run.grad_checkpoint and name in GENERATORS:
            fast.grad_checkpoint(net)
        # The discriminators' weights stay contiguous: their big layers run as matrix products, and fused Adam
        # would copy a channels_last tensor at every step.
        net.to(device, memory_format=layout if name in GENERATORS else torch.contiguous_format).train()
    return dtype, layout


def _stacked_passes(
    gen: nn.Module, translated: torch.Tensor, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A generator's cycle pass (on the translation out of its domain) and identity pass (on its domain's real
    batch) as one call (every layer works per sample: the same function, with fewer, larger convolutions): the
    cycled images, the identity images and the identity pass's CAM logits."""
    (cycled, _, _), (identity, cam, _) = fast.stacked(gen, translated, real)
    return cycled, identity, cam


def _by_output(per_domain: dict[str, tuple[torch.Tensor, ...]]) -> tuple[dict[str, torch.Tensor], ...]:
    """{domain: (output 0, output 1, ...)} as ({domain: output 0}, {domain: output 1}, ...)."""
    return tuple(dict(zip(per_domain, outputs, strict=True)) for outputs in zip(*per_domain.values(), strict=True))


class Trainer:
    """Owns the networks (keyed by their official names) and the optimizers; `step` counts completed steps and
    `skipped` the updates left out because their gradients were not finite (the discriminators of each domain
    update separately, so a step counts 0, 1 or 2 under "D"; `train_step` reports 1.0 as "skipped_D" for either)."""

    def __init__(
        self,
        model: ModelConfig,
        run: RunConfig,
        device: str | torch.device = "cpu",
        nets: dict[str, nn.Module] | None = None,
        distributed: bool = False,
    ):
        self.model, self.run = model, run
        if run.grad_checkpoint and model.arch != "official":
            raise ConfigError(f"grad_checkpoint (--grad-checkpoint) is for the official architecture, not {model.arch}")
        self.device = torch.device(device)
        self.nets = nets or build_networks(model)
        self.dtype, self.memory_format = prepare(self.nets, run, self.device)
        # Real and fake batches go through a discriminator in one call only where its fast layers count the call as
        # two power iterations (not the TF architecture's spectral norm).
        self.stack_judges = run.fast and all(fast.is_fast(self.nets[name]) for name in DISCRIMINATORS)
        # Two savings of the fast path that DDP cannot take, since it reduces every gradient as one backward leaves
        # it: the discriminators' largest weight gradients stay factored until their update, which builds them one
        # at a time (`fast.deferred_weight_grads`), and the G update backpropagates each generator's cycle and
        # identity passes before the other generator's run (`_cycle_and_identity_backward`).
        self.piecewise_backward = run.fast and not distributed
        self.opt_G = _adam(itertools.chain(*(self.nets[n].parameters() for n in GENERATORS)), run)
        self.opt_D = _adam(itertools.chain(*(self.nets[n].parameters() for n in DISCRIMINATORS)), run)
        self.step = 0
        self.skipped = {"D": 0, "G": 0}
        if run.compile:
            _check_compiler(self.device)
            for net in self.nets.values():
                net.compile()
        # Under torchrun each network gets its own DDP wrapper. Buffers (the spectral-norm u, v) are synced once at
        # start, not at every call: the weights stay identical on every rank, so the power iterations do too.
        self.wrapped: dict[str, nn.Module] = (
            {name: DistributedDataParallel(net, forward_sync_buffers=False) for name, net in self.nets.items()}
            if distributed
            else self.nets
        )

    def load_optimizers(self, saved: dict[str, Any]) -> None:
        """Load the optimizers' states saved under "opt_G" and "opt_D" (a checkpoint's), each optimizer keeping
        its own implementation (`_load_optimizer`)."""
        _load_optimizer(self.opt_G, saved["opt_G"])
        _load_optimizer(self.opt_D, saved["opt_D"])

    def autocast(self) -> torch.autocast:
        """Autocast to the run's compute dtype (a no-op in fp32); losses, norm statistics, spectral norms stay fp32."""
        return fast.autocast(self.device, self.dtype)

    @ieee_fp32()  # both paths: the exact one is fp32, and the fast one bf16 or fp32, never TF32
    def train_step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, float]:
        """One D update then one G update on a pair of batches; returns every loss term as a float."""
        lr = learning_rate(self.run, self.step + 1)
        for optimizer in (self.opt_G, self.opt_D):
            for group in optimizer.param_groups:
                group["lr"] = lr
        real = {
            domain: batch.to(self.device, non_blocking=True, memory_format=self.memory_format)
            for domain, batch in (("A", real_A), ("B", real_B))
        }
        # The two translations, shared by both updates. Under DDP they run on the bare generators: a D update must
        # not arm the generators' gradient reduction.
        with self.autocast():
            fake_A2B, cam_A2B, _ = self.nets["genA2B"](real["A"])
            fake_B2A, cam_B2A, _ = self.nets["genB2A"](real["B"])
        fake = {"A": fake_B2A, "B": fake_A2B}  # keyed by the domain translated into
        if self.device.type == "cpu" and self.run.release_heap:
            # Once per step, where the last G update's activations are all dead and the translations have reused
            # what they could of them (docs/performance.md, "The C heap").
            release_free_heap()
        d_terms, d_ok = self._update_discriminators(real, {d: f.detach() for d, f in fake.items()})
        g_terms, g_ok = self._update_generators(real, fake, {"A": cam_B2A, "B": cam_A2B})
        self.step += 1
        terms = {name: value.detach() for name, value in {**d_terms, **g_terms}.items()}
        values = torch.stack(list(terms.values())).double().tolist()
        return {
            "lr": lr,
            **dict(zip(terms, values, strict=True)),
            "skipped_D": float(not d_ok),
            "skipped_G": float(not g_ok),
        }

    def _update_discriminators(
        self, real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """The D update, run on the DDP-wrapped discriminators. Each domain's loss reaches only its own two
        discriminators, so backward and update run per domain: the same gradients and the same per-parameter Adam
        updates, with half the discriminator gradients alive at once."""
        nets = {name: self.wrapped[f"dis{name}"] for name, _ in JUDGES}
        with self.autocast():
            real_scores, fake_scores = self._judge(nets, real, fake)
            terms = discriminator_losses(real_scores, fake_scores, self.run)
        ok = True
        for domain in "AB":
            with fast.deferred_weight_grads() if self.piecewise_backward else contextlib.nullcontext() as deferred:
                terms[f"D_loss_{domain}"].backward()
            ok &= self._apply(self.opt_D, "D", deferred)
        return terms, ok

    def _judge(
        self, nets: dict[str, nn.Module], real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Outputs], dict[str, Outputs]]:
        """Every discriminator's scores of its domain's real batch and of the translations into it: real first,
        then fake, as the official code calls them (each training-mode call advances a power iteration)."""
        if self.stack_judges and all(real[d].shape[0] == fake[d].shape[0] for d in "AB"):
            # A bf16 fake means autocast is on: the first convolution rounds the real batch to bf16 anyway.
            both = {name: fast.stacked(nets[name], real[d].to(fake[d].dtype), fake[d]) for name, d in JUDGES}
            return {name: pair[0] for name, pair in both.items()}, {name: pair[1] for name, pair in both.items()}
        real_scores = {name: nets[name](real[domain]) for name, domain in JUDGES}
        return real_scores, {name: nets[name](fake[domain]) for name, domain in JUDGES}

    def _update_generators(
        self, real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor], source_cams: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """The G update, on the DDP-wrapped generators with bare discriminators (no discriminator all-reduce), whose
        weight gradients are not computed."""
        gens = {"A": self.wrapped["genB2A"], "B": self.wrapped["genA2B"]}  # keyed by the domain translated into
        for name in DISCRIMINATORS:
            self.nets[name].requires_grad_(False)
        try:
            if self.piecewise_backward:
                (cycled, identity, target_cams), fake_grads = self._cycle_and_identity_backward(gens, real, fake)
            else:
                with self.autocast():
                    cycled, identity, target_cams = self._cycle_and_identity(gens, real, fake)
                fake_grads = {}
            with self.autocast():
                fake_scores = {name: self.nets[f"dis{name}"](fake[domain]) for name, domain in JUDGES}
                terms = generator_losses(fake_scores, real, cycled, identity, source_cams, target_cams, self.run)
            outputs = [terms["g_loss"], *(fake[d] for d in fake_grads)]
            torch.autograd.backward(outputs, [None, *fake_grads.values()])
        finally:
            for name in DISCRIMINATORS:
                self.nets[name].requires_grad_(True)
        ok = self._apply(self.opt_G, "G")
        for name in GENERATORS:
            clip_rho(self.nets[name])
        return terms, ok

    def _cycle_and_identity(
        self, gens: dict[str, nn.Module], real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Keyed by domain X: real[X] translated out and back, real[X] through the generator into X, and that
        generator's CAM logits on it. The fast path runs each generator's two passes as one call
        (`_stacked_passes`)."""
        if self.run.fast:
            return _by_output({d: _stacked_passes(gens[d], fake[OTHER[d]], real[d]) for d in "AB"})
        cycled = {d: gens[d](fake[OTHER[d]])[0] for d in "AB"}
        identity = {d: gens[d](real[d]) for d in "AB"}
        return cycled, {d: out[0] for d, out in identity.items()}, {d: out[1] for d, out in identity.items()}

    def _cycle_and_identity_backward(
        self, gens: dict[str, nn.Module], real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]
    ) -> tuple[tuple[dict[str, torch.Tensor], ...], dict[str, torch.Tensor]]:
        """`_cycle_and_identity` one generator at a time, each followed by the backward of its share of the loss
        (`cycle_and_identity_loss`), so that one generator's graph is alive instead of two; the other terms' graphs
        (the translations', the discriminators') stay for the caller's backward. Returns its outputs, detached, and
        the gradient these passes send into each translation (keyed by domain, as `fake`) for that backward."""
        inputs = {d: fake[d].detach().requires_grad_() for d in "AB"}
        outputs = {}
        for d in "AB":
            with self.autocast():
                cycled, identity, cam = _stacked_passes(gens[d], inputs[OTHER[d]], real[d])
                loss = cycle_and_identity_loss(real[d], cycled, identity, cam, self.run)
            loss.backward()  # outside autocast, as every backward here
            outputs[d] = (cycled.detach(), identity.detach(), cam.detach())
        return _by_output(outputs), {d: inputs[d].grad for d in "AB"}

    def _apply(self, optimizer: Optimizer, name: str, deferred: fast.DeferredGrads | None = None) -> bool:
        """Take the optimizer step unless a gradient is inf or NaN, which Adam would turn into NaN weights for good.

        Near-constant images (a collapsed generator output, flat backgrounds at small sizes) give channels of zero
        variance, and each InstanceNorm backward then multiplies the gradient by 1 / sqrt(eps) ~ 316: through the
        cycle pass it can overflow. The official code would store NaN weights; we skip that one update and count it.
        """
        applied = _grads_finite(optimizer) and (deferred is None or deferred.finite())
        if applied:
            optimizer.step()
        else:
            self.skipped[name] += 1
        # Freed now rather than at the next update: the discriminators' gradients alone are large at ch 64.
        optimizer.zero_grad()
        if applied and deferred is not None:
            deferred.step(optimizer)  # after the others are freed: one of these alive at a time
        return applied
