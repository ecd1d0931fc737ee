"""Variational Score Distillation (paper eq. 4) and the LoRA-teacher diffusion loss, as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _atleast_f32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 under mixed precision (and in fp64 when given fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t) for integer timesteps ``t`` (eq. 1)."""
    a_bar = _atleast_f32(alphas_cumprod.to(t.device)[t])
    return a_bar.sqrt(), (1.0 - a_bar).sqrt()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x0 + σ_t ε (eq. 1)."""
    a, s = alpha_sigma(alphas_cumprod, t)
    return _expand(a, x0) * x0 + _expand(s, x0) * noise


def predict_x0(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """x̂0 from a UNet output at timestep t, with ᾱ taken from the scheduler (at t = 999 SD's ᾱ ≈ 0.0047, never
    hard-coded: another scheduler config has another value)."""
    a, s = alpha_sigma(alphas_cumprod, t)
    a, s = _expand(a, sample), _expand(s, sample)
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * sample - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sample_timesteps(
    batch: int, num_train_timesteps: int, t_min: float, t_max: float, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t uniform over the integers in [t_min·T, t_max·T] (SwiftBrush/ProlificDreamer use [0.02T, 0.98T])."""
    lo = int(t_min * num_train_timesteps)
    hi = max(lo + 1, int(t_max * num_train_timesteps))
    return torch.randint(lo, hi, (batch,), generator=generator).to(device)


def vsd_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, kind: str = "one_minus_alpha_bar") -> torch.Tensor:
    """w(t) of eq. (4). SwiftBrush uses 1 − ᾱ_t (= σ_t², ProlificDreamer's choice)."""
    a_bar = _atleast_f32(alphas_cumprod.to(t.device)[t])
    if kind == "one_minus_alpha_bar":
        return 1.0 - a_bar
    if kind == "constant":
        return torch.ones_like(a_bar)
    if kind == "snr_inverse":
        return (1.0 - a_bar) / a_bar
    if kind == "dmd":
        raise ValueError("the 'dmd' weighting depends on the sample: use dmd_weight")
    raise ValueError(f"unknown VSD weighting {kind!r}")


def dmd_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
               eps_teacher: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample normalization (Yin et al. 2024; DMD2) as a weight w of eq. (4).

    DMD's x0-space gradient (x̂0_fake − x̂0_real) / mean|x0 − x̂0_real| equals w·(ε̂_teacher − ε̂_lora) with
    w = (σ_t / α_t) / mean|x0 − x̂0_real|, since x̂0 = (x_t − σ_t ε̂) / α_t for both scores at the same x_t. x̂0_real is
    the guided teacher's estimate; the mean is over each sample's elements. Detached (a weight, not a path for
    gradients); a sample whose estimate equals x0 exactly gets the floor 1e-12 instead of a division by zero.
    """
    a, s = alpha_sigma(alphas_cumprod, t)
    x0 = _atleast_f32(x0.detach())
    x0_real = predict_x0(eps_teacher.detach().to(x0.dtype), x_t.detach().to(x0.dtype), alphas_cumprod, t)
    norm = (x0 - x0_real).abs().flatten(1).mean(1).clamp_min(1e-12)
    return (s / a).to(norm.dtype) / norm


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ε_u + γ(ε_c − ε_u): γ = 1 is the conditional prediction, γ = 0 the unconditional."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def vsd_loss(
    x0: torch.Tensor,
    eps_teacher: torch.Tensor,
    eps_lora: torch.Tensor,
    weight: torch.Tensor,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5‖x̂0 − sg(x̂0 − g)‖² with g = w(t)(ε̂_teacher − ε̂_lora), whose gradient on x̂0 is g (eq. 4).

    With ``reduction="sum"`` the loss sums over a sample's elements and averages over the batch, so ∂L/∂x̂0_i = g_i / B;
    ``"mean"`` (SwiftBrush's) also divides by the number of elements per sample. Returns (loss, g).
    """
    x0 = _atleast_f32(x0)
    grad = _expand(weight, x0) * (eps_teacher.to(x0.dtype) - eps_lora.to(x0.dtype))
    grad = torch.nan_to_num(grad)
    target = (x0 - grad).detach()
    per_elem = 0.5 * (x0 - target) ** 2
    per_sample = per_elem.flatten(1).sum(1)
    if reduction == "mean":
        per_sample = per_sample / per_elem[0].numel()
    elif reduction != "sum":
        raise ValueError(f"unknown reduction {reduction!r}")
    return per_sample.mean(), grad


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ε-prediction loss ‖ε_ψ(x_t, t, y) − ε‖² of the LoRA teacher (eq. 2), mean over elements."""
    return F.mse_loss(_atleast_f32(eps_pred), _atleast_f32(noise).to(_atleast_f32(eps_pred).dtype))
