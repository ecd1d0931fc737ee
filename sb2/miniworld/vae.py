"""The mini-world's autoencoders: a diffusers ``AutoencoderKL`` (64×64 RGB ↔ 4×8×8 latents, SD's 8× layout) whose
``scaling_factor`` makes the latents unit-variance (SD's 0.18215 was found the same way), and an ``AutoencoderTiny``
distilled from it as TAESD is from SD's VAE: its encoder regresses the scaled VAE latents, its decoder maps them
back to the images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sb2.miniworld.fitting import Progress, WorldData, autocast, optimizer, step, to_signed


def new_vae(width: int = 32):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(width, 2 * width, 3 * width, 3 * width),
        layers_per_block=1, latent_channels=4, norm_num_groups=min(32, width), sample_size=64, scaling_factor=1.0,
    )


def new_tiny_vae(width: int = 32):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4,
        num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1), latent_channels=4, scaling_factor=1.0,
    )


def detail_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What plain L1 under-weights in these scenes, where the background is most of the pixels: the edges of small
    objects (L1 of the image gradients) and each object's color (L1 of the 4×4-pooled image, per channel)."""
    edges = sum(F.l1_loss(torch.diff(rec, dim=d), torch.diff(x, dim=d)) for d in (-1, -2))
    return edges + F.l1_loss(F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4))


def train_vae(data: WorldData, steps: int, batch: int, lr: float, seed: int, device, width: int = 32,
              kl_weight: float = 1e-6, max_seconds: float | None = None):
    torch.manual_seed(seed)
    vae = new_vae(width).to(device).train()
    progress = Progress("vae", steps, max_seconds)
    opt, sched = optimizer(vae.parameters(), lr, progress)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = to_signed(data.batch(gen, batch)[0])
        with autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        l1 = F.l1_loss(rec, x)
        loss = l1 + F.mse_loss(rec, x) + detail_loss(rec, x) + kl_weight * post.kl().mean()
        step(opt, sched, loss, vae.parameters())
        if progress(i, l1=l1.item()):
            break
    vae.eval().requires_grad_(False)
    latents = encode_all(vae, data.images)
    std = latents.float().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae, progress.summary()


@torch.no_grad()
def encode_all(vae, images_uint8: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Unscaled latent means (the mode, as SD's training encodes), (N, 4, 8, 8)."""
    out = []
    for a in range(0, len(images_uint8), batch):
        with autocast(images_uint8.device):
            out.append(vae.encode(to_signed(images_uint8[a : a + batch])).latent_dist.mode().float())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_error(vae, images_uint8: torch.Tensor, tiny: bool = False) -> dict:
    """Mean absolute error (0–255 scale) and PSNR of encode→decode on ``images_uint8``."""
    x = to_signed(images_uint8)
    if tiny:
        rec = vae.decode(vae.encode(x).latents).sample
    else:
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    err = (rec.clamp(-1, 1) - x) * 127.5
    mse = err.pow(2).mean().item()
    return {"mae_255": err.abs().mean().item(), "psnr_db": 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()}


def train_tiny_vae(vae, data: WorldData, latents: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
                   device, width: int = 32, max_seconds: float | None = None):
    """TAESD-style: encoder → scaled VAE latents (L1), decoder(scaled latents) → the image (L1 + MSE)."""
    torch.manual_seed(seed)
    tiny = new_tiny_vae(width).to(device).train()
    progress = Progress("tiny_vae", steps, max_seconds)
    opt, sched = optimizer(tiny.parameters(), lr, progress)
    gen = torch.Generator().manual_seed(seed)
    sf = vae.config.scaling_factor
    for i in range(steps):
        images, _, idx = data.batch(gen, batch)
        x, z = to_signed(images), latents[idx.to(latents.device)] * sf
        with autocast(device):
            enc = tiny.encode(x).latents
            dec = tiny.decode(z).sample
        loss_enc = F.l1_loss(enc.float(), z)
        loss_dec = F.l1_loss(dec.float(), x) + F.mse_loss(dec.float(), x)
        step(opt, sched, loss_enc + loss_dec, tiny.parameters())
        if progress(i, enc=loss_enc.item(), dec=loss_dec.item()):
            break
    return tiny.eval().requires_grad_(False), progress.summary()


def save_half(model, folder) -> None:
    """diffusers ``save_pretrained`` in float16 (half the bytes); ``from_pretrained`` loads it as float32."""
    dtype = next(model.parameters()).dtype
    model.to(torch.float16).save_pretrained(folder)
    model.to(dtype)
