"""Spherical interpolation of input noises (paper 8.3) and of prompt embeddings (paper 8.4)."""

from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """slerp over the flattened tensors: keeps the norm profile of Gaussian noise, unlike a straight line."""
    af, bf = a.flatten().double(), b.flatten().double()
    cos = torch.dot(af, bf) / (af.norm() * bf.norm()).clamp_min(eps)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.abs() < 1e-4:
        out = (1 - t) * af + t * bf
    else:
        out = (torch.sin((1 - t) * omega) * af + torch.sin(t * omega) * bf) / torch.sin(omega)
    return out.reshape(a.shape).to(a.dtype)


def slerp_path(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    ts = torch.linspace(0.0, 1.0, steps).tolist()
    return torch.stack([slerp(a, b, t) for t in ts])
