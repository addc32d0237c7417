"""The U-GAT-IT objective (docs/spec.md section 3.2): LSGAN, cycle, identity and CAM losses.

Functions of network outputs (which networks run on what is the update rule's business: `trainer.py`). Term names
follow the official code (`D_ad_loss_GA`, `G_cam_loss_A`, ...) so that logs can be read side by side with it. Every
term is a mean over the batch and the spatial positions, computed in fp32 also when the networks ran under bf16
autocast (`.float()` is free in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import RunConfig

# (discriminator, domain it judges), in the order the official code calls them: the order in which autograd
# accumulates gradients follows it, and Adam's first steps magnify those last-bit differences.
JUDGES = (("GA", "A"), ("LA", "A"), ("GB", "B"), ("LB", "B"))

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (output, cam_logit, heatmap) of a network


def lsgan(logit: torch.Tensor, target: float) -> torch.Tensor:
    logit = logit.float()
    return F.mse_loss(logit, torch.full_like(logit, target))


def _bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    logit = logit.float()
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target))


def _l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(output.float(), target.float())


def _adversarial_sum(terms: dict[str, torch.Tensor], prefix: str, domain: str) -> torch.Tensor:
    return (
        terms[f"{prefix}_ad_loss_G{domain}"]
        + terms[f"{prefix}_ad_cam_loss_G{domain}"]
        + terms[f"{prefix}_ad_loss_L{domain}"]
        + terms[f"{prefix}_ad_cam_loss_L{domain}"]
    )


def discriminator_losses(
    real_scores: dict[str, Outputs], fake_scores: dict[str, Outputs], run: RunConfig
) -> dict[str, torch.Tensor]:
    """Each discriminator scores its domain's real images as 1 and the translations into it as 0, both its patch
    logits and its CAM logits, as LSGAN outputs weighted by adv_weight. Scores are keyed by JUDGES names."""
    terms: dict[str, torch.Tensor] = {}
    for name, _ in JUDGES:
        (real_logit, real_cam, _), (fake_logit, fake_cam, _) = real_scores[name], fake_scores[name]
        terms[f"D_ad_loss_{name}"] = lsgan(real_logit, 1.0) + lsgan(fake_logit, 0.0)
        terms[f"D_ad_cam_loss_{name}"] = lsgan(real_cam, 1.0) + lsgan(fake_cam, 0.0)
    for domain in "AB":
        terms[f"D_loss_{domain}"] = run.adv_weight * _adversarial_sum(terms, "D", domain)
    terms["d_loss"] = terms["D_loss_A"] + terms["D_loss_B"]
    return terms


def generator_losses(
    fake_scores: dict[str, Outputs],
    real: dict[str, torch.Tensor],
    cycled: dict[str, torch.Tensor],
    identity: dict[str, torch.Tensor],
    source_cams: dict[str, torch.Tensor],
    target_cams: dict[str, torch.Tensor],
    run: RunConfig,
) -> dict[str, torch.Tensor]:
    """Fool both discriminators, come back on the cycle, leave target-domain images alone, and let each
    generator's CAM tell its source domain (logit 1) from its target domain (logit 0).

    Keyed by domain X: `cycled[X]` is real[X] translated out and back, `identity[X]` real[X] through the generator
    into X, `source_cams[X]` the CAM logits of the generator into X on the other domain's real images (its
    source), `target_cams[X]` its CAM logits on real[X].
    """
    terms: dict[str, torch.Tensor] = {}
    for name, _ in JUDGES:
        logit, cam, _ = fake_scores[name]
        terms[f"G_ad_loss_{name}"] = lsgan(logit, 1.0)
        terms[f"G_ad_cam_loss_{name}"] = lsgan(cam, 1.0)
    for domain in "AB":
        terms[f"G_recon_loss_{domain}"] = _l1(cycled[domain], real[domain])
        terms[f"G_identity_loss_{domain}"] = _l1(identity[domain], real[domain])
        terms[f"G_cam_loss_{domain}"] = _bce(source_cams[domain], 1.0) + _bce(target_cams[domain], 0.0)
        terms[f"G_loss_{domain}"] = (
            run.adv_weight * _adversarial_sum(terms, "G", domain)
            + run.cycle_weight * terms[f"G_recon_loss_{domain}"]
            + run.identity_weight * terms[f"G_identity_loss_{domain}"]
            + run.cam_weight * terms[f"G_cam_loss_{domain}"]
        )
    terms["g_loss"] = terms["G_loss_A"] + terms["G_loss_B"]
    return terms


def cycle_and_identity_loss(
    real: torch.Tensor, cycled: torch.Tensor, identity: torch.Tensor, target_cam: torch.Tensor, run: RunConfig
) -> torch.Tensor:
    """The share of one domain's G_loss that the generator into it reaches through its cycle and identity passes
    alone (`generator_losses`' names): a backward of it can run, and free those passes' graph, before the other
    generator's passes are computed. `generator_losses` keeps its own sum of these terms, in the official order,
    which the exact path's parity is held to."""
    return (
        run.cycle_weight * _l1(cycled, real)
        + run.identity_weight * _l1(identity, real)
        + run.cam_weight * _bce(target_cam, 0.0)
    )
