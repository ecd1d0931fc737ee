"""Auxiliary reward losses: max(0, τ − r(D(x̂0), y)), of which the clamped CLIP loss (paper eq. 5) is one instance and
HPSv2 (paper 8.1, Table 9) another.

A reward scorer maps decoded student images in [-1, 1] (B, 3, H, W) and their prompts to one differentiable reward
per image. The clamp at τ stops a sample from pushing its reward further once it passes τ, which is what keeps the
CLIP loss from degrading images (Table 6); every reward term gets the same treatment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sb2.distill.clip_loss import clip_preprocess, cosine

RewardScorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


def clamped_reward_loss(reward: torch.Tensor, tau: float, clamp: bool = True) -> torch.Tensor:
    """mean(max(0, τ − r)); without the clamp mean(τ − r) (the naive loss: 1 − cos for CLIP with τ = 1)."""
    reward = reward.float()
    return F.relu(tau - reward).mean() if clamp else (tau - reward).mean()


class ClipReward:
    """The cosine of an open_clip model's image and prompt embeddings (:class:`sb2.models.loading.ClipScorer`): the
    CLIP loss's reward, and HPSv2's with the HPS model and checkpoint (HPS scores an image by this same cosine).

    The image goes through the differentiable preprocessing; the prompt embedding is a constant.
    """

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        s = self.scorer
        dtype = next(s.model.parameters()).dtype
        img_emb = s.encode_image(clip_preprocess(images, s.image_size, s.mean, s.std).to(dtype))
        with torch.no_grad():
            txt_emb = s.encode_text(prompts, images.device)
        return cosine(img_emb, txt_emb)


class ModuleReward:
    """Any callable (images in [-1, 1], prompts) → rewards, e.g. a mini-world judge's differentiable score; its output
    is read as one float32 reward per image."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.fn(images, prompts).float().reshape(images.shape[0])
