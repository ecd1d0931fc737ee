"""Image regularization on a little real data (paper 5.1, Tables 3 and 5: "Ours*", FID 8.14), as pure functions.

SwiftBrush v2 trains image-free; its best model adds "an extra regularization [DMD] on minimal real data": 200K
LAION-Aesthetics 6.25+ pairs, about 5% of the training data. The paper gives no more detail, so two forms are here:

- ``real`` (the default). A real image's latent z is noised to the student's input timestep T' (999),
  x_T' = sqrt(ᾱ_T')·z + sqrt(1 − ᾱ_T')·ε, and the student's one-step prediction x̂0 = f_θ(x_T', y) is regressed to z.
  Why this input and not pure noise: a regression from random noise to a random real image pairs them arbitrarily,
  and its minimizer is the mean image of the caption (a blur). Noised to T', the input carries the image (a weak
  signal: sqrt(ᾱ_999) ≈ 0.07 for SD) exactly as the forward process would, so the target is consistent with the
  input; the input still has the distribution the student sees at inference (unit variance, nearly all noise), so
  nothing new is asked of the network. This is the x0-prediction diffusion loss at t = T': its minimizer is
  E[z | x_T', y], which pulls the student's outputs toward real images without fixing which noise makes which image.
- ``dmd_pairs`` (DMD's own form, Yin et al. 2024). Noise z and the teacher's deterministic sampler output
  x_teacher = ODE(z, y) are stored once (``sb2 regpairs``); the student's x̂0 = f_θ(z, y) is regressed to x_teacher.
  The pairing is the teacher's own map, so again not arbitrary; it ties the student to the teacher's modes.

The distance is a latent mean squared error, or a perceptual distance (LPIPS, DMD's choice) of decoded images.
"""

from __future__ import annotations

import random

import torch

from sb2.distill.vsd import _atleast_f32, add_noise


def student_input_for_real(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                           timestep: int) -> torch.Tensor:
    """x_T' = sqrt(ᾱ_T')·z + sqrt(1 − ᾱ_T')·ε: a real latent noised to the student's input timestep."""
    t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
    return add_noise(latents, noise, alphas_cumprod, t)


def latent_regression_loss(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖x̂0 − z‖² averaged over elements (and samples), in fp32; the target passes no gradient."""
    x0 = _atleast_f32(x0)
    return ((x0 - target.detach().to(x0.dtype)) ** 2).mean()


def perceptual_regression_loss(net, images: torch.Tensor, target_images: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``net(images, target)`` (LPIPS: a distance per sample, shaped (B,) or (B, 1, 1, 1));
    images in [-1, 1], the target passes no gradient."""
    d = net(images, target_images.detach().to(images.dtype))
    return _atleast_f32(d).reshape(images.shape[0], -1).mean()


def is_regularization_step(seed: int, step: int, share: float) -> bool:
    """Whether ``step`` carries a regularization batch: a draw of its own per (seed, step), so the same steps are chosen
    on every process and after any resume, independently of all other random numbers; over N steps the count is
    Binomial(N, share)."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return random.Random(f"sb2-regularization:{seed}:{step}").random() < share
