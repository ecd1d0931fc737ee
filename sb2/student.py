"""The one-step student: a UNet fed pure noise z at the last training timestep, x̂0 recovered with the scheduler's ᾱ,
and the text encoding every stage shares."""

from __future__ import annotations

import torch

from sb2.distill.vsd import predict_x0


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], device) -> torch.Tensor:
    """Token embeddings the UNet attends to, computed exactly as diffusers' StableDiffusionPipeline does."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def student_x0(unet, z: torch.Tensor, text_emb: torch.Tensor, alphas_cumprod: torch.Tensor, timestep: int = 999,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """x̂0 = f_θ(z, y): one UNet call at ``timestep`` on pure noise (SD-Turbo and SwiftBrush both use t = 999)."""
    t = torch.full((z.shape[0],), timestep, device=z.device, dtype=torch.long)
    out = unet(z, t, encoder_hidden_states=text_emb).sample
    return predict_x0(out, z, alphas_cumprod, t, prediction_type)


def latent_shape(unet) -> tuple[int, int, int]:
    s = unet.config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return int(unet.config.in_channels), int(h), int(w)


def seeded_noise(seeds: list[int], shape: tuple[int, int, int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One CPU generator per seed, so an image depends on its own seed only (not on batch size or device)."""
    zs = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(zs).to(device=device, dtype=dtype)


def decode(decoder, latents: torch.Tensor) -> torch.Tensor:
    """Latents in UNet space → images in [-1, 1], for AutoencoderKL and AutoencoderTiny alike."""
    return decoder.decode(latents / decoder.config.scaling_factor).sample
