"""The U-GAT-IT objective (UGATIT_SPEC.md section 2): LSGAN, cycle, identity and CAM losses.

Term names follow the official code (`D_ad_loss_GA`, `G_cam_loss_A`, ...) so that logs can be read side by side
with it. Every term is a mean over the batch and the spatial positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config

# Every loss is computed in fp32, also when the networks ran under bf16 autocast (`.float()` is free in fp32).


def lsgan(logit: torch.Tensor, target: float) -> torch.Tensor:
    logit = logit.float()
    return F.mse_loss(logit, torch.full_like(logit, target))


def _bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    logit = logit.float()
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target))


def _l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(output.float(), target.float())


# (discriminator, domain it judges); the official code calls them in this order, and so do we: the order in which
# autograd accumulates gradients follows it, and Adam's first steps magnify those last-bit differences.
_DISCS = (("GA", "A"), ("LA", "A"), ("GB", "B"), ("LB", "B"))


def _adversarial_sum(terms: dict[str, torch.Tensor], prefix: str, domain: str) -> torch.Tensor:
    return (
        terms[f"{prefix}_ad_loss_G{domain}"]
        + terms[f"{prefix}_ad_cam_loss_G{domain}"]
        + terms[f"{prefix}_ad_loss_L{domain}"]
        + terms[f"{prefix}_ad_cam_loss_L{domain}"]
    )


def discriminator_losses(
    nets: dict[str, nn.Module],
    real_A: torch.Tensor,
    real_B: torch.Tensor,
    fake_A2B: torch.Tensor,
    fake_B2A: torch.Tensor,
    config: Config,
    batched: bool = False,
) -> dict[str, torch.Tensor]:
    """Each discriminator scores its domain's real images as 1 and the translations into it as 0.

    Both the patch logits and the CAM logits are trained as LSGAN outputs, weighted by adv_weight. Every
    discriminator is called on the real batch, then on the fake one: each training-mode call advances its
    spectral-norm power iteration, so the calls are part of the official numbers. `batched` (fast discriminators)
    makes both calls one (`Discriminator.forward(x, calls=2)`): the same function, the weights read once.
    """
    real = {"A": real_A, "B": real_B}
    fake = {"A": fake_B2A, "B": fake_A2B}
    if batched and real_A.shape[0] == fake_B2A.shape[0] and real_B.shape[0] == fake_A2B.shape[0]:
        both = {
            # A bf16 fake means autocast is on: the first convolution rounds the real batch to bf16 anyway.
            name: nets[f"dis{name}"](torch.cat([real[domain].to(fake[domain].dtype), fake[domain]]), calls=2)
            for name, domain in _DISCS
        }
        real_out = {name: tuple(t.chunk(2)[0] for t in out) for name, out in both.items()}
        fake_out = {name: tuple(t.chunk(2)[1] for t in out) for name, out in both.items()}
    else:
        real_out = {name: nets[f"dis{name}"](real[domain]) for name, domain in _DISCS}
        fake_out = {name: nets[f"dis{name}"](fake[domain]) for name, domain in _DISCS}
    terms: dict[str, torch.Tensor] = {}
    for name, _ in _DISCS:
        (real_logit, real_cam, _), (fake_logit, fake_cam, _) = real_out[name], fake_out[name]
        terms[f"D_ad_loss_{name}"] = lsgan(real_logit, 1.0) + lsgan(fake_logit, 0.0)
        terms[f"D_ad_cam_loss_{name}"] = lsgan(real_cam, 1.0) + lsgan(fake_cam, 0.0)
    for domain in "AB":
        terms[f"D_loss_{domain}"] = config.adv_weight * _adversarial_sum(terms, "D", domain)
    terms["d_loss"] = terms["D_loss_A"] + terms["D_loss_B"]
    return terms


def generator_losses(
    nets: dict[str, nn.Module],
    real_A: torch.Tensor,
    real_B: torch.Tensor,
    fake_A2B: torch.Tensor,
    fake_B2A: torch.Tensor,
    cam_A2B: torch.Tensor,
    cam_B2A: torch.Tensor,
    config: Config,
    batched: bool = False,
) -> dict[str, torch.Tensor]:
    """Fool both discriminators, come back on the cycle, leave target-domain images alone, and let each
    generator's CAM tell its source domain (logit 1) from its target domain (logit 0).

    `fake_*` and `cam_*` are the translations of the real batches, computed once per step and shared with the
    discriminator update; this runs the four remaining generator passes (cycle and identity). `batched` runs each
    generator's cycle and identity passes as one batch: every layer works per sample, so the function is the same,
    with fewer, larger convolutions (the fast path; the summation order of the weight gradients differs).
    """
    genA2B, genB2A = nets["genA2B"], nets["genB2A"]
    if batched:
        n = real_A.shape[0]
        (recon_A, fake_A2A), (_, cam_A2A) = (t.split(n) for t in genB2A(torch.cat([fake_A2B, real_A]))[:2])
        (recon_B, fake_B2B), (_, cam_B2B) = (t.split(n) for t in genA2B(torch.cat([fake_B2A, real_B]))[:2])
        recon = {"A": recon_A, "B": recon_B}
    else:
        recon = {"A": genB2A(fake_A2B)[0], "B": genA2B(fake_B2A)[0]}
        fake_A2A, cam_A2A, _ = genB2A(real_A)
        fake_B2B, cam_B2B, _ = genA2B(real_B)
    real = {"A": real_A, "B": real_B}
    identity = {"A": fake_A2A, "B": fake_B2B}
    cam_loss = {
        "A": _bce(cam_B2A, 1.0) + _bce(cam_A2A, 0.0),
        "B": _bce(cam_A2B, 1.0) + _bce(cam_B2B, 0.0),
    }
    fake = {"A": fake_B2A, "B": fake_A2B}
    terms: dict[str, torch.Tensor] = {}
    for name, domain in _DISCS:
        logit, cam, _ = nets[f"dis{name}"](fake[domain])
        terms[f"G_ad_loss_{name}"] = lsgan(logit, 1.0)
        terms[f"G_ad_cam_loss_{name}"] = lsgan(cam, 1.0)
    for domain in "AB":
        terms[f"G_recon_loss_{domain}"] = _l1(recon[domain], real[domain])
        terms[f"G_identity_loss_{domain}"] = _l1(identity[domain], real[domain])
        terms[f"G_cam_loss_{domain}"] = cam_loss[domain]
        terms[f"G_loss_{domain}"] = (
            config.adv_weight * _adversarial_sum(terms, "G", domain)
            + config.cycle_weight * terms[f"G_recon_loss_{domain}"]
            + config.identity_weight * terms[f"G_identity_loss_{domain}"]
            + config.cam_weight * terms[f"G_cam_loss_{domain}"]
        )
    terms["g_loss"] = terms["G_loss_A"] + terms["G_loss_B"]
    return terms
