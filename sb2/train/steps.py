"""One training iteration's pieces: the models a step touches, the student's loss (VSD, plus the clamped CLIP loss
in the lora scheme) and the LoRA teacher's diffusion loss on detached student samples.

The math lives in :mod:`sb2.distill`; this module only composes it (SwiftBrush's step, paper 3 and 4.2–4.4).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from sb2.config import Config
from sb2.distill.clip_loss import clamped_clip_loss, clip_preprocess, cosine, scheduled_weight
from sb2.distill.vsd import add_noise, diffusion_loss, guided, sample_timesteps, vsd_loss, vsd_weight
from sb2.models.loading import load_clip, load_teacher, load_tiny_vae, load_unet
from sb2.models.lora import add_lora
from sb2.student import decode, latent_shape, student_x0

Scheme = Literal["full", "lora"]


@dataclass
class Models:
    """Everything a step touches. ``teacher_unet`` carries the LoRA teacher as a switchable adapter."""

    student: torch.nn.Module
    student_params: list[torch.nn.Parameter]
    teacher_unet: torch.nn.Module
    lora_params: list[torch.nn.Parameter]
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    tiny_vae: torch.nn.Module | None = None
    clip: object | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        # read once from the plain module: under DDP ``student`` becomes a wrapper without ``.config``
        self.latent_shape = latent_shape(self.student)


def build_models(cfg: Config, scheme: Scheme, device, weight_dtype=torch.float32) -> Models:
    """Frozen teacher (+ LoRA teacher adapter), trainable student, and for ``lora`` the TinyVAE and CLIP."""
    teacher = load_teacher(cfg.models, dtype=weight_dtype, device=device)
    lt = cfg.lora_teacher
    lora_params = add_lora(teacher.unet, lt.rank, lt.alpha, lt.target_modules, lt.dropout)
    for p in lora_params:  # trainable weights stay fp32 under mixed precision
        p.data = p.data.float()
    student = load_unet(cfg.models.student, cfg.models, dtype=torch.float32, device=device)
    if scheme == "full":
        student.requires_grad_(True)
        student_params = list(student.parameters())
    elif scheme == "lora":
        sl = cfg.student_lora
        student_params = add_lora(student, sl.rank, sl.alpha, sl.target_modules, sl.dropout)
    else:
        raise ValueError(f"scheme must be 'full' or 'lora', not {scheme!r}")
    if cfg.train.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    m = Models(student, student_params, teacher.unet, lora_params, teacher.text_encoder, teacher.tokenizer,
               teacher.vae, teacher.alphas_cumprod.to(device), teacher.num_train_timesteps)
    if scheme == "lora" and cfg.clip_loss.enabled:
        m.tiny_vae = load_tiny_vae(cfg.models.tiny_vae, cfg.models, weight_dtype, device)
        m.clip = load_clip(cfg.models.clip, device=device, dtype=weight_dtype)
    return m


def apply_speed_switches(m: Models, cfg: Config, device) -> Models:
    """GPU-only switches, measured in bench/train_step.py: NHWC memory format for the UNets' convolutions and
    torch.compile (in place, so adapters still switch on the same module)."""
    if torch.device(device).type != "cuda":
        return m
    if cfg.train.channels_last:
        for mod in (m.student, m.teacher_unet, m.tiny_vae):
            if mod is not None:
                mod.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        for unet in (m.student, m.teacher_unet):
            compile_unet(unet, cfg.train.compile_mode)
    return m


def compile_unet(unet: torch.nn.Module, mode: str = "blocks") -> None:
    """torch.compile in place. ``blocks`` compiles every transformer and ResNet block separately: blocks of the same
    class and shape reuse one graph, which keeps compilation to minutes where the whole UNet's forward and backward
    took over four; the code between blocks (time embedding, up/down sampling, skip concatenation) stays eager."""
    if mode == "full":
        unet.compile()
        return
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    import torch._dynamo

    # one graph per (block class, shape, grad mode, adapter state): more than dynamo's default of 8 per code object
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    for mod in unet.modules():
        if isinstance(mod, (BasicTransformerBlock, ResnetBlock2D)):
            mod.compile(dynamic=False)


def _adamw(params, lr: float, cfg: Config, device) -> torch.optim.AdamW:
    o = cfg.optim
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, fused=fused)


@contextmanager
def per_sample_adapters(unet, adapter_names: list[str]):
    """Run the LoRA adapter on some samples of a batch only (peft's mixed-batch forward; "__base__" = adapter off):
    the frozen teacher's cond/uncond passes and the LoRA teacher's pass become one UNet call on one batch."""
    from peft.tuners.lora import LoraLayer

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    hooks = [mod.register_forward_pre_hook(inject, with_kwargs=True) for mod in unet.modules()
             if isinstance(mod, LoraLayer)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def teacher_predictions(teacher, x_t, t, emb, null_emb, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """ε̂ of the frozen teacher (with CFG) and of the LoRA teacher (with its own guidance scale) at x_t."""
    b = x_t.shape[0]
    null = null_emb.expand_as(emb)
    lora_cfg = cfg.vsd.lora_guidance_scale != 1.0
    if cfg.vsd.single_teacher_call:
        segments = [(emb, "__base__"), (null, "__base__"), (emb, "default")] + ([(null, "default")] if lora_cfg else [])
        names = [name for _, name in segments for _ in range(b)]
        with per_sample_adapters(teacher, names):
            out = teacher(torch.cat([x_t] * len(segments)), torch.cat([t] * len(segments)),
                          encoder_hidden_states=torch.cat([e for e, _ in segments])).sample.float().chunk(len(segments))
        eps_c, eps_u, lora_c = out[:3]
        lora_u = out[3] if lora_cfg else None
    else:
        teacher.disable_adapters()
        eps_c, eps_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([emb, null])).sample.float().chunk(2)
        teacher.enable_adapters()
        if lora_cfg:
            lora_c, lora_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     encoder_hidden_states=torch.cat([emb, null])).sample.float().chunk(2)
        else:
            lora_c, lora_u = teacher(x_t, t, encoder_hidden_states=emb).sample.float(), None
    eps_teacher = guided(eps_u, eps_c, cfg.vsd.guidance_scale)
    eps_lora = lora_c if lora_u is None else guided(lora_u, lora_c, cfg.vsd.lora_guidance_scale)
    return eps_teacher, eps_lora


def student_step(m: Models, cfg: Config, emb: torch.Tensor, null_emb: torch.Tensor, prompts: list[str], step: int,
                 autocast) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Loss of one student update and the detached x̂0 the LoRA teacher learns from."""
    b = emb.shape[0]
    device = emb.device
    z = torch.randn((b, *m.latent_shape), device=device)
    with autocast():
        x0 = student_x0(m.student, z, emb, m.alphas_cumprod, cfg.vsd.student_timestep,
                        cfg.models.student_prediction_type)
    t = sample_timesteps(b, m.num_train_timesteps, cfg.vsd.t_min, cfg.vsd.t_max, device=device)
    noise = torch.randn_like(x0, dtype=torch.float32)
    x_t = add_noise(x0.detach().float(), noise, m.alphas_cumprod, t)
    with torch.no_grad(), autocast():
        eps_teacher, eps_lora = teacher_predictions(m.teacher_unet, x_t, t, emb, null_emb, cfg)
    w = vsd_weight(m.alphas_cumprod, t, cfg.vsd.weighting)
    loss_vsd, _ = vsd_loss(x0, eps_teacher, eps_lora, w, cfg.vsd.reduction)
    loss = loss_vsd
    logs = {"loss/vsd": loss_vsd.item()}
    if m.clip is not None:
        cl = cfg.clip_loss
        weight = scheduled_weight(step, cfg.train.steps, cl.weight, cl.end_weight, cl.schedule)
        with autocast():
            images = decode(m.tiny_vae, x0.to(m.tiny_vae.dtype))
            img_emb = m.clip.encode_image(clip_preprocess(images, m.clip.image_size, m.clip.mean, m.clip.std)
                                          .to(next(m.clip.model.parameters()).dtype))
            with torch.no_grad():
                txt_emb = m.clip.encode_text(prompts, device)
        loss_clip = clamped_clip_loss(img_emb, txt_emb, cl.tau, cl.clamp)
        loss = loss + weight * loss_clip
        logs.update({"loss/clip": loss_clip.item(), "clip/weight": weight,
                     "clip/cos": cosine(img_emb, txt_emb).mean().item()})
    return loss, x0.detach(), logs


def lora_teacher_loss(m: Models, cfg: Config, x0: torch.Tensor, emb: torch.Tensor, null_emb: torch.Tensor,
                      autocast) -> torch.Tensor:
    """ε-prediction diffusion loss of the LoRA teacher on detached student samples, t uniform over [0, T), with
    null-text dropout so that it can also predict unconditionally."""
    b = x0.shape[0]
    t = torch.randint(0, m.num_train_timesteps, (b,), device=x0.device)
    noise = torch.randn_like(x0, dtype=torch.float32)
    x_t = add_noise(x0.float(), noise, m.alphas_cumprod, t)
    drop = torch.rand(b, device=x0.device) < cfg.lora_teacher.null_text_dropout
    cond = torch.where(drop.view(-1, 1, 1), null_emb.expand_as(emb), emb)
    with autocast():
        eps = m.teacher_unet(x_t, t, encoder_hidden_states=cond).sample
    return diffusion_loss(eps, noise)
