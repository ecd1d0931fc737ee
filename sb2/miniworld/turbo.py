"""The mini-world's SD-Turbo: the teacher UNet distilled to one step at t = 999 as SD-Turbo was (Adversarial
Diffusion Distillation, Sauer et al. 2023): distillation terms from the teacher plus a hinge GAN term from a small
text-conditioned discriminator that sees real latents of the world (VAE latents of its training pairs) against the
student's. Two distillation terms, weighted: regression of the one-step x̂0 to the teacher's 25-step DDIM sample from
the same noise and caption, and ADD's own term — the student's x̂0 noised to a random s, denoised by the guided
teacher in one step, c(s)·‖x̂θ − sg(x̂ψ)‖² with c(s) = √ᾱ_s (ADD's exponential weighting)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sb2.miniworld.fitting import Progress, autocast, optimizer, step

STUDENT_T = 999
SCORE_T_RANGE = (20, 980)  # ADD's s ~ U[20, 980): timesteps the student's x̂0 is noised to


class LatentDiscriminator(nn.Module):
    """Scaled latents (B, 4, 8, 8) + a pooled caption embedding → a realness score (projection discriminator)."""

    def __init__(self, text_dim: int, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(2 * width, 1)
        self.text = nn.Linear(text_dim, 2 * width)

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.net(z)
        return self.out(h).squeeze(1) + (h * self.text(text)).sum(1) / h.shape[1] ** 0.5


def one_step_x0(unet, noise: torch.Tensor, cond: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    with autocast(noise.device):
        eps = unet(noise, STUDENT_T, encoder_hidden_states=cond).sample.float()
    return (noise - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


@torch.no_grad()
def teacher_x0(teacher_unet, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
               t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's guided one-step estimate of x0 from ``x0`` noised to timesteps ``t`` (ADD's x̂ψ)."""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with autocast(x0.device):
        eps = teacher_unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                           encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond])).sample.float()
    e_u, e_c = eps.chunk(2)
    return (x_t - (1 - abar).sqrt() * (e_u + guidance * (e_c - e_u))) / abar.sqrt()


def score_distillation_loss(x0: torch.Tensor, x0_teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ADD's distillation term: mean over the batch of c(s)·mean‖x̂θ − sg(x̂ψ)‖² (no gradient reaches the teacher's
    estimate: its gradient on x̂θ is 2·c(s)·(x̂θ − x̂ψ), an SDS-like pull towards the guided teacher)."""
    per_sample = (x0.float() - x0_teacher.detach().float()).pow(2).flatten(1).mean(1)
    return (weight * per_sample).mean()


def add_weighting(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """c(s) = α_s in ADD's notation (x_s = α_s·x0 + σ_s·ε), i.e. √ᾱ_s: late (noisy) timesteps count less."""
    return alphas_cumprod[t].sqrt()


def train_turbo(teacher_unet, noise: torch.Tensor, cond: torch.Tensor, targets: torch.Tensor | None,
                real_latents: torch.Tensor, real_cond_pooled: torch.Tensor, cond_pooled: torch.Tensor,
                abar_t: torch.Tensor, steps: int, batch: int, lr: float, seed: int, device,
                adv_weight: float = 0.02, max_seconds: float | None = None, regression_weight: float = 1.0,
                score_weight: float = 0.0, uncond: torch.Tensor | None = None, guidance: float = 4.5,
                alphas_cumprod: torch.Tensor | None = None, t_range: tuple[int, int] = SCORE_T_RANGE):
    """``noise``/``cond``/``targets``: the distillation set (noise, caption embedding, teacher sample; ``targets``
    may be None when ``regression_weight`` is 0); ``real_latents`` with the pooled embeddings of their captions: what
    the discriminator calls real. ``score_weight`` > 0 adds ADD's term with the frozen ``teacher_unet`` at
    ``guidance`` (needs ``uncond`` and the training schedule's ``alphas_cumprod``), s uniform in ``t_range``."""
    if regression_weight and targets is None:
        raise ValueError("regression_weight > 0 needs the teacher's samples (targets)")
    if score_weight and (uncond is None or alphas_cumprod is None):
        raise ValueError("score_weight > 0 needs uncond and alphas_cumprod")
    if not (regression_weight or score_weight or adv_weight):
        raise ValueError("every term of the Turbo analog's loss has weight 0")
    torch.manual_seed(seed)
    if alphas_cumprod is not None:
        alphas_cumprod = alphas_cumprod.to(device)
    teacher_unet.requires_grad_(False)
    student = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
    disc = LatentDiscriminator(cond.shape[-1]).to(device)
    progress = Progress("turbo", steps, max_seconds)
    opt_g, sch_g = optimizer(student.parameters(), lr, progress)
    opt_d, sch_d = optimizer(disc.parameters(), lr * 2, progress, betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        idx = torch.randint(0, len(noise), (batch,), generator=gen).to(device)
        x0 = one_step_x0(student, noise[idx], cond[idx], abar_t)
        distill = x0.new_zeros(())
        if regression_weight:
            distill = distill + regression_weight * F.mse_loss(x0, targets[idx])
        if score_weight:
            s = torch.randint(t_range[0], t_range[1], (batch,), generator=gen).to(device)
            x0_t = teacher_x0(teacher_unet, x0.detach(), cond[idx], uncond, guidance, s,
                              torch.randn(x0.shape, generator=gen).to(device), alphas_cumprod)
            distill = distill + score_weight * score_distillation_loss(x0, x0_t, add_weighting(alphas_cumprod, s))
        g_adv = -disc(x0, cond_pooled[idx]).mean()
        step(opt_g, sch_g, distill + adv_weight * g_adv, student.parameters())
        ridx = torch.randint(0, len(real_latents), (batch,), generator=gen).to(device)
        d_real = disc(real_latents[ridx], real_cond_pooled[ridx])
        d_fake = disc(x0.detach(), cond_pooled[idx])
        d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        step(opt_d, sch_d, d_loss, disc.parameters())
        if progress(i, distill=distill.item(), g=g_adv.item(), d=d_loss.item()):
            break
    return student.eval().requires_grad_(False), progress.summary()
