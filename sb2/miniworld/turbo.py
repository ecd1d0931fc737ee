"""The mini-world's SD-Turbo: the teacher UNet distilled to one step at t = 999 as SD-Turbo was (Adversarial
Diffusion Distillation, Sauer et al. 2023): a distillation term — regression of the one-step x̂0 to the teacher's
25-step DDIM sample from the same noise and caption — plus a hinge GAN term from a small text-conditioned
discriminator that sees real latents of the world (VAE latents of its training pairs) against the student's."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sb2.miniworld.fitting import Progress, autocast, optimizer, step

STUDENT_T = 999


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


def train_turbo(teacher_unet, noise: torch.Tensor, cond: torch.Tensor, targets: torch.Tensor,
                real_latents: torch.Tensor, real_cond_pooled: torch.Tensor, cond_pooled: torch.Tensor,
                abar_t: torch.Tensor, steps: int, batch: int, lr: float, seed: int, device,
                adv_weight: float = 0.02, max_seconds: float | None = None):
    """``noise``/``cond``/``targets``: the distillation set (noise, caption embedding, teacher sample);
    ``real_latents`` with the pooled embeddings of their captions: what the discriminator calls real."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
    disc = LatentDiscriminator(cond.shape[-1]).to(device)
    progress = Progress("turbo", steps, max_seconds)
    opt_g, sch_g = optimizer(student.parameters(), lr, progress)
    opt_d, sch_d = optimizer(disc.parameters(), lr * 2, progress, betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        idx = torch.randint(0, len(noise), (batch,), generator=gen).to(device)
        x0 = one_step_x0(student, noise[idx], cond[idx], abar_t)
        distill = F.mse_loss(x0, targets[idx])
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
