"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): writes what rank 0 sees to a file."""

import sys

import torch

from ugatit import distributed
from ugatit.config import ConfigError, ModelConfig, RunConfig, to_dict
from ugatit.trainer import Trainer

TINY = ModelConfig(img_size=32, ch=4, n_res=1, light=True, global_layers=4, local_layers=3)


def batches(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 2-sample batches on every rank (and in the single-process reference)."""
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.rand(steps, 2, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(2))


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    info, device = distributed.setup(torch.device("cpu"))
    if mode == "steps":
        torch.manual_seed(0)
        trainer = Trainer(TINY, RunConfig(), device, distributed=True)
        real_A, real_B = batches(3)
        for k in range(3):
            rank = slice(info.rank, info.rank + 1)
            trainer.train_step(real_A[k, rank], real_B[k, rank])
        states = distributed.gather(info, {name: net.state_dict() for name, net in trainer.nets.items()})
        if info.is_main:
            torch.save(states, out)
    elif mode == "config":
        try:
            settings = {**to_dict(TINY), **to_dict(RunConfig(cam_weight=1000.0 + info.rank))}
            distributed.check_same_config(info, settings)
            message = "accepted"
        except ConfigError as exc:
            message = str(exc)
        if info.is_main:
            with open(out, "w") as f:
                f.write(message)
    distributed.teardown(info)


if __name__ == "__main__":
    main()
