"""The mini-world's SD2.1: a text-conditional latent diffusion ``UNet2DConditionModel`` (ε-prediction, SD's
scaled-linear DDPM schedule of 1000 steps, 10 % null-text dropout for classifier-free guidance), trained on the
VAE latents of the world's training pairs with the frozen CLIP text tower, saved as a StableDiffusionPipeline folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from sb2.miniworld.fitting import Progress, autocast, optimizer, step
from sb2.miniworld.tokenizer import tokenize

BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def new_unet(text_dim: int, width: int = 64):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=(4, 8, 8), use_linear_projection=True, norm_num_groups=32,  # SD2.x-style
    )


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**BETAS, prediction_type="epsilon", clip_sample=False)


def inference_scheduler():
    """What the saved pipeline samples with: DDIM on SD's schedule (25 steps is the reference setting)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**BETAS, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="leading")


@torch.no_grad()
def embed(text_encoder, tokenizer, captions: list[str], device) -> torch.Tensor:
    return text_encoder(tokenize(tokenizer, captions).to(device))[0]


@torch.no_grad()
def pooled_embed(text_encoder, tokenizer, captions: list[str], device) -> torch.Tensor:
    return text_encoder(tokenize(tokenizer, captions).to(device)).pooler_output


@torch.no_grad()
def caption_states(text_encoder, ids: torch.Tensor, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen text encoder's hidden states of each distinct caption once (captions repeat; a step then costs
    no text forward): a table (U, 77, D), in bfloat16 on CUDA, and each caption's row in it."""
    unique, which = torch.unique(ids, dim=0, return_inverse=True)
    dtype = torch.bfloat16 if unique.device.type == "cuda" else torch.float32
    table = torch.cat([text_encoder(unique[a : a + batch])[0].to(dtype) for a in range(0, len(unique), batch)])
    return table, which


class EMA:
    def __init__(self, model, decay: float):
        self.model, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model, step_: int) -> None:
        d = min(self.decay, (1 + step_) / (10 + step_))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)


def train_teacher(latents: torch.Tensor, ids: torch.Tensor, null_ids: torch.Tensor, text_encoder, steps: int,
                  batch: int, lr: float, seed: int, device, width: int = 64, null_text_dropout: float = 0.1,
                  ema_decay: float = 0.998, max_seconds: float | None = None, init=None):
    """``latents``: scaled VAE latents (N, 4, 8, 8) of the pairs, ``ids`` their captions' token ids, ``null_ids``
    those of "". ``init``: a UNet to continue training instead of a new one. Returns the EMA UNet and a summary."""
    torch.manual_seed(seed)
    unet = (copy.deepcopy(init).float() if init is not None
            else new_unet(text_encoder.config.hidden_size, width)).to(device).train().requires_grad_(True)
    table, which = caption_states(text_encoder, ids)
    null = caption_states(text_encoder, null_ids)[0]
    ema = EMA(unet, ema_decay)
    sched = train_scheduler()
    abar = sched.alphas_cumprod.to(device)
    progress = Progress("teacher", steps, max_seconds)
    opt, lr_sched = optimizer(unet.parameters(), lr, progress, warmup=200)
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < null_text_dropout
        cond = torch.where(drop.to(device)[:, None, None], null, table[which[idx.to(device)]])
        x0 = latents[idx.to(latents.device)].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast(device):
            pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), noise)
        step(opt, lr_sched, loss, unet.parameters())
        ema.update(unet, i)
        if progress(i, loss=loss.item()):
            break
    return ema.model, progress.summary()


@torch.no_grad()
def sample(unet, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int = 25,
           guidance: float = 4.5, batch: int = 1024) -> torch.Tensor:
    """DDIM with classifier-free guidance from ``noise`` (scaled latents out), as the pipeline samples."""
    sched = inference_scheduler()
    sched.set_timesteps(steps, device=noise.device)
    outs = []
    for a in range(0, len(noise), batch):
        x, c = noise[a : a + batch].clone(), cond[a : a + batch]
        u = uncond.expand(len(c), -1, -1)
        for t in sched.timesteps:
            with autocast(noise.device):
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([u, c])).sample.float()
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        outs.append(x)
    return torch.cat(outs)


def save_pipeline(unet, vae, text_encoder, tokenizer, folder) -> None:
    """A stock StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    Weights are stored in float16 and load as float32: diffusers upcasts by default, and the text encoder's config
    keeps ``dtype: float32``, which transformers 5 loads by (its weights come from the float16 open_clip file, so
    this loses nothing)."""
    from diffusers import StableDiffusionPipeline

    unet, vae = copy.deepcopy(unet).to("cpu", torch.float16), copy.deepcopy(vae).to("cpu", torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=copy.deepcopy(text_encoder).to("cpu", torch.float32), tokenizer=tokenizer, unet=unet,
        scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    halve_safetensors(Path(folder) / "text_encoder" / "model.safetensors")


def halve_safetensors(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(path),
              metadata={"format": "pt"})
