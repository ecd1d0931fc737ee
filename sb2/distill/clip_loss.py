"""The clamped CLIP loss (paper eq. 5) and the weight schedule of its auxiliary term (paper 4.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def cosine(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def clamped_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float = 0.35, clamp: bool = True
) -> torch.Tensor:
    """max(0, τ − cos(E_img, E_txt)), averaged over the batch (eq. 5).

    With ``clamp=False`` this is the naive CLIP loss 1 − cos of the ablation (Table 6): it keeps pushing alignment
    past the point where images degrade, which the clamp at τ prevents (a sample with cos > τ passes no gradient).
    """
    cos = cosine(image_emb, text_emb)
    if clamp:
        return F.relu(tau - cos).mean()
    return (1.0 - cos).mean()


def scheduled_weight(step: int, total_steps: int, start: float, end: float = 0.0, kind: str = "linear") -> float:
    """Weight of the CLIP term at ``step`` of ``total_steps``: ``start`` at step 0, ``end`` at the last step."""
    if kind == "constant" or total_steps <= 1:
        return float(start)
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    if kind == "linear":
        return float(start + (end - start) * frac)
    if kind == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac)))
    raise ValueError(f"unknown schedule {kind!r}")


def clip_preprocess(images: torch.Tensor, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Differentiable CLIP preprocessing of images in [-1, 1]: resize to ``size`` and normalize.

    The PIL pipeline of open_clip cannot pass gradients; this one does, so the CLIP term reaches the student.
    """
    # No clamp to [-1, 1]: a clamp would zero the gradient of every saturated pixel.
    x = (images.float() + 1.0) / 2.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
