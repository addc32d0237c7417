"""One U-GAT-IT training iteration: the six networks, their two Adam optimizers, and the update rule.

`Trainer.train_step` is the official update (UGATIT_SPEC.md section 2) with two savings that leave every number
unchanged: the two translations of the real batches are computed once and shared by the discriminator update
(detached) and the generator update (6 generator passes per step instead of 8, and no backward through the
generators in the D update), and the discriminators' weight gradients are not computed in the G update. The
discriminator update runs per domain (backward, then Adam on that domain's two discriminators), which halves the
gradient memory at its peak and changes no number either; the one change in behaviour is that a non-finite
gradient in one domain skips only that domain's update.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import Config, ConfigError
from .losses import discriminator_losses, generator_losses
from .models import DISCRIMINATORS, GENERATORS, build_networks
from .norms import clip_rho
from .precision import autocast, compute_dtype, fast_memory_format


def learning_rate(config: Config, step: int) -> float:
    """Learning rate of the 1-based step `step`: constant, then linear decay to 0 over the second half.

    The official loop subtracts lr / (iterations // 2) at the start of every step past the half-way point; this is
    the same value as a function of the step, so it is right after a resume too.
    """
    half = config.iterations // 2
    if not config.decay or half == 0 or step <= half:
        return config.lr
    return max(0.0, config.lr * (1.0 - (step - half) / half))


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True


def _adam(params: Iterator[nn.Parameter], config: Config) -> torch.optim.Adam:
    # The exact path keeps PyTorch's default implementation, whose rounding the parity fixture was made with;
    # the fast path uses the fused kernel (one pass over all parameters, same update up to the last bits).
    fused = {"fused": True} if config.fast else {}
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **fused)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library has one (not musl, macOS or Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_heap() -> bool:
    """Hand the pages of the C heap's free blocks back to the OS; False where the C library cannot.

    CPU activations under 32 MiB come from glibc's heap, which keeps freed blocks resident for reuse, and the free
    blocks are scattered, so the heap never shrinks on its own and grows step after step: without a release, the
    peak RSS of a 128 px light fast step crept from 2.39 GiB after one step to 2.79 GiB after twelve on a 2-core
    AVX2 EPYC, and stayed at 2.50-2.54 GiB with one release per step. The pages released are faulted back in when
    the heap reuses them, which is the cost: about 4 % of a 128 px step and 15 % of a 256 px one there.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


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


class Trainer:
    """Owns the networks (keyed by their official names) and the optimizers; `step` counts completed steps and
    `skipped` the updates left out because their gradients were not finite (the discriminators of each domain
    update separately, so a step counts 0, 1 or 2 under "D"; `train_step` reports 1.0 as "skipped_D" for either)."""

    def __init__(
        self,
        config: Config,
        device: str | torch.device = "cpu",
        nets: dict[str, nn.Module] | None = None,
        distributed: bool = False,
    ):
        self.config = config
        self.device = torch.device(device)
        # The fast path's layout for activations and generator weights (`precision.fast_memory_format`). The
        # discriminators' weights stay contiguous: their big layers run as matrix products (models._fast_conv), and
        # fused Adam would copy a channels_last tensor at every step.
        self.dtype = compute_dtype(config, self.device)
        fast_format = fast_memory_format(self.device, self.dtype)
        self.memory_format = fast_format if config.fast else torch.contiguous_format
        self.nets = {
            name: net.to(
                self.device, memory_format=self.memory_format if name in GENERATORS else torch.contiguous_format
            ).train()
            for name, net in (nets or build_networks(config)).items()
        }
        self.opt_G = _adam(itertools.chain(*(self.nets[n].parameters() for n in GENERATORS)), config)
        self.opt_D = _adam(itertools.chain(*(self.nets[n].parameters() for n in DISCRIMINATORS)), config)
        self.step = 0
        self.skipped = {"D": 0, "G": 0}
        if config.compile:
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

    def autocast(self) -> torch.autocast:
        """Autocast to the run's compute dtype (`precision.compute_dtype`); a no-op in fp32. Losses, normalisation
        statistics and spectral norms stay in fp32."""
        return autocast(self.device, self.dtype)

    def _set_discriminators_trainable(self, trainable: bool) -> None:
        for name in DISCRIMINATORS:
            self.nets[name].requires_grad_(trainable)

    def train_step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, float]:
        """One D update then one G update on a pair of batches; returns every loss term as a float."""
        config, nets = self.config, self.nets
        lr = learning_rate(config, self.step + 1)
        for optimizer in (self.opt_G, self.opt_D):
            for group in optimizer.param_groups:
                group["lr"] = lr
        real_A = real_A.to(self.device, non_blocking=True, memory_format=self.memory_format)
        real_B = real_B.to(self.device, non_blocking=True, memory_format=self.memory_format)

        # Under DDP: the two shared translations run on the bare generators (a D update must not arm the
        # generators' gradient reduction), the D update on the wrapped discriminators, and the G update on the
        # wrapped generators with bare discriminators (no discriminator all-reduce in the G update).
        d_nets = {**nets, **{name: self.wrapped[name] for name in DISCRIMINATORS}}
        g_nets = {**nets, **{name: self.wrapped[name] for name in GENERATORS}}
        with self.autocast():
            fake_A2B, cam_A2B, _ = nets["genA2B"](real_A)
            fake_B2A, cam_B2A, _ = nets["genB2A"](real_B)
        if self.device.type == "cpu":
            # Once per step, where the last G update's activations are all dead and the translations have reused
            # what they could of them (`release_free_heap`). Releases after the D and the G updates as well saved
            # 0-0.02 GiB more at 128 px and 0.13-0.18 GiB at 256 px, and cost 5 % more of a 128 px step.
            release_free_heap()
        with self.autocast():
            d_terms = discriminator_losses(
                d_nets, real_A, real_B, fake_A2B.detach(), fake_B2A.detach(), config, batched=config.fast
            )
        # Each domain's loss reaches only its own two discriminators, so backward and update run per domain: the
        # same gradients and the same per-parameter Adam updates (Adam passes over parameters without a gradient),
        # with half the discriminator gradients alive at once. Domain A's graph is gone before B's backward.
        d_ok = True
        for domain in "AB":
            d_terms[f"D_loss_{domain}"].backward()
            d_ok &= self._apply(self.opt_D, "D")

        self._set_discriminators_trainable(False)
        try:
            with self.autocast():
                g_terms = generator_losses(
                    g_nets, real_A, real_B, fake_A2B, fake_B2A, cam_A2B, cam_B2A, config, batched=config.fast
                )
            g_terms["g_loss"].backward()
        finally:
            self._set_discriminators_trainable(True)
        g_ok = self._apply(self.opt_G, "G")
        for name in GENERATORS:
            clip_rho(nets[name])

        self.step += 1
        terms = {name: value.detach() for name, value in {**d_terms, **g_terms}.items()}
        values = torch.stack(list(terms.values())).double().tolist()
        return {
            "lr": lr,
            **dict(zip(terms, values, strict=True)),
            "skipped_D": float(not d_ok),
            "skipped_G": float(not g_ok),
        }

    def _apply(self, optimizer: torch.optim.Optimizer, name: str) -> bool:
        """Take the optimizer step unless a gradient is inf or NaN, which Adam would turn into NaN weights for good.

        Near-constant images (a collapsed generator output, flat backgrounds at small sizes) give channels of zero
        variance, and each InstanceNorm backward then multiplies the gradient by 1 / sqrt(eps) ~ 316: through the
        cycle pass it can overflow. The official code would store NaN weights; we skip that one update and count it.
        """
        applied = _grads_finite(optimizer)
        if applied:
            optimizer.step()
        else:
            self.skipped[name] += 1
        # Freed now rather than at the next update: the discriminators' gradients alone are 0.45 GB at ch 64.
        optimizer.zero_grad(set_to_none=True)
        return applied
