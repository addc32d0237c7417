"""The fast path's Adam: `torch.optim.Adam(fused=True)`'s update and state, without `torch.optim`.

`torch.optim` marks its optimizers' methods to be left out of compiled graphs, and that marking imports the
compiler (`torch._dynamo`) when an optimizer is built: start-up time, and memory at the training step's peak, in a
process that compiles nothing (docs/performance.md, "The compiler's import"). This optimizer calls the same fused
kernel on the same state. Its `state_dict` is the one `torch.optim.Adam(fused=True)` writes, and it loads that one
and the default Adam's, so a checkpoint moves between the exact path (which keeps `torch.optim.Adam`) and the fast
one either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# The hyperparameters a checkpoint carries, and the flags torch.optim.Adam writes beside them (the ones of its fused
# form), so that either optimizer loads the other's state_dict.
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
_TORCH_FLAGS = {
    "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": True,
    "decoupled_weight_decay": False,
}  # fmt: skip


class Adam:
    """Adam with its weight decay added to the gradient (`torch.optim.Adam`'s rule, which the official PyTorch code
    trains with) in one fused pass over the parameters. One parameter group."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.param_groups: list[dict[str, Any]] = [
            {"params": list(params), "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        ]
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient (the trainer drops those it updates elsewhere)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.moments(p) for p in params]
            update(params, [p.grad for p in params], states, group, step=True)

    def moments(self, param: nn.Parameter) -> dict[str, torch.Tensor]:
        """`param`'s step count and moments, made (zero) at its first update."""
        state = self.state.get(param)
        if state is None:
            state = self.state[param] = {
                "step": torch.zeros((), dtype=torch.float32, device=param.device),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        return state

    def group_of(self, param: nn.Parameter) -> dict[str, Any]:
        """The hyperparameters `param` updates with (for updates made outside `step`)."""
        return next(group for group in self.param_groups if any(p is param for p in group["params"]))

    def zero_grad(self) -> None:
        """Drop every gradient (torch.optim's default, set_to_none=True)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.Adam(fused=True)'s layout: parameters numbered in group order, state keyed by number."""
        index = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        return {
            "state": {index[p]: dict(state) for p, state in self.state.items()},
            "param_groups": [
                {
                    **{key: group[key] for key in _HYPERPARAMETERS},
                    **_TORCH_FLAGS,
                    "params": [index[p] for p in group["params"]],
                }
                for group in self.param_groups
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this optimizer or of `torch.optim.Adam` over the same parameters (any of its
        implementations: the moments are the same numbers; the step count moves to the parameter's device)."""
        saved_groups = state_dict["param_groups"]
        sizes = [len(group["params"]) for group in self.param_groups]
        if [len(group["params"]) for group in saved_groups] != sizes:
            raise ValueError(
                f"the optimizer state holds parameter groups of {[len(g['params']) for g in saved_groups]} "
                f"parameters, this optimizer {sizes}: it was saved for other networks"
            )
        params = {
            saved: p
            for group, saved_group in zip(self.param_groups, saved_groups, strict=True)
            for p, saved in zip(group["params"], saved_group["params"], strict=True)
        }
        self.state = {}
        for key, state in state_dict["state"].items():
            p = params[key]
            step = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
            # In p's own layout: the fused kernel pairs elements by memory offset, and a checkpoint may come from a
            # run whose weights had the other one (channels_last or not: another dtype or device).
            moments = {name: torch.empty_like(p).copy_(state[name]) for name in ("exp_avg", "exp_avg_sq")}
            self.state[p] = {"step": step, **moments}
        for group, saved_group in zip(self.param_groups, saved_groups, strict=True):
            group.update({key: saved_group[key] for key in _HYPERPARAMETERS})


def update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    group: dict[str, Any],
    step: bool,
) -> None:
    """One fused Adam update of `params` (tensors or views of them) with `grads` on their moments in `states`; the
    step counts are advanced first where `step`, else used as they are (the caller advances them)."""
    if not params:
        return
    steps = [state["step"] for state in states]
    if step:
        torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adam_(
        params, grads, [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states], [], steps,
        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
        amsgrad=False, maximize=False,
    )  # fmt: skip
