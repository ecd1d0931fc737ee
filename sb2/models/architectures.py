"""The real architectures of the models SwiftBrush v2 uses, built from their configs with random weights.

Speed and memory do not depend on weight values, so benchmarks build these instead of downloading SD2.1-base: the
UNet (866M parameters, 64×64 latents for 512 px), the OpenCLIP-H text encoder of SD2.x, the SD VAE and TAESD.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def sd21_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


def sd21_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512))


def sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def taesd():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny()  # its defaults are TAESD's architecture


def clip_tokenizer():
    from transformers import CLIPTokenizer

    from sb2.models.tiny import save_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def sd21_parts(device, dtype=torch.float32, tiny_vae: bool = True) -> dict:
    """UNet, text encoder, VAE (and TAESD), tokenizer and noise schedule, initialized directly on ``device``."""
    from sb2.models.tiny import sd_scheduler

    with torch.device(device):  # a 866M UNet initializes slowly on the CPU
        parts = {"unet": sd21_unet(), "text_encoder": sd21_text_encoder(), "vae": sd_vae()}
        if tiny_vae:
            parts["tiny_vae"] = taesd()
    for k in list(parts):
        parts[k] = parts[k].to(device, dtype).eval().requires_grad_(False)
    parts["tokenizer"] = clip_tokenizer()
    parts["scheduler"] = sd_scheduler()
    return parts
