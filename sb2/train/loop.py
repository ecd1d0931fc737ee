"""The training recipe: alternate a student update (VSD, plus the clamped CLIP loss in the lora scheme) with a
LoRA-teacher update (diffusion loss on detached student samples), through accelerate.

The math lives in :mod:`sb2.distill`; this module only composes it (SwiftBrush's loop, paper 3 and 4.2–4.4).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from sb2.config import Config
from sb2.distill.clip_loss import clamped_clip_loss, clip_preprocess, cosine, scheduled_weight
from sb2.distill.vsd import add_noise, diffusion_loss, guided, sample_timesteps, vsd_loss, vsd_weight
from sb2.models.lora import add_lora, save_lora
from sb2.models.loading import load_clip, load_teacher, load_tiny_vae, load_unet
from sb2.student import decode, encode_prompts, latent_shape, student_x0
from sb2.tracking import JsonlLogger, Logger
from sb2.train.data import PromptSampler, read_prompts

Scheme = Literal["full", "lora"]
PREVIEW_PROMPTS = 8


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


def _adamw(params, lr: float, cfg: Config, device) -> torch.optim.AdamW:
    o = cfg.optim
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, fused=fused)


def student_step(m: Models, cfg: Config, emb: torch.Tensor, null_emb: torch.Tensor, prompts: list[str], step: int,
                 autocast) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Loss of one student update and the detached x̂0 the LoRA teacher learns from."""
    b = emb.shape[0]
    device = emb.device
    z = torch.randn((b, *latent_shape(m.student)), device=device)
    with autocast():
        x0 = student_x0(m.student, z, emb, m.alphas_cumprod, cfg.vsd.student_timestep,
                        cfg.models.student_prediction_type)
    t = sample_timesteps(b, m.num_train_timesteps, cfg.vsd.t_min, cfg.vsd.t_max, device=device)
    noise = torch.randn_like(x0, dtype=torch.float32)
    x_t = add_noise(x0.detach().float(), noise, m.alphas_cumprod, t)
    teacher = m.teacher_unet
    with torch.no_grad(), autocast():
        # Frozen teacher = the same UNet with the adapter off; cond and uncond in one batched call.
        teacher.disable_adapters()
        eps_c, eps_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([emb, null_emb.expand_as(emb)])).sample.chunk(2)
        teacher.enable_adapters()
        eps_teacher = guided(eps_u.float(), eps_c.float(), cfg.vsd.guidance_scale)
        if cfg.vsd.lora_guidance_scale == 1.0:
            eps_lora = teacher(x_t, t, encoder_hidden_states=emb).sample.float()
        else:
            lc, lu = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                             encoder_hidden_states=torch.cat([emb, null_emb.expand_as(emb)])).sample.chunk(2)
            eps_lora = guided(lu.float(), lc.float(), cfg.vsd.lora_guidance_scale)
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


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def train(cfg: Config, scheme: Scheme, out_dir: str | Path, logger: Logger | None = None,
          progress: bool = True) -> Path:
    """Train one branch and save it to ``out_dir/student`` (a diffusers UNet folder for ``full``, a peft LoRA adapter
    naming its base for ``lora``), with the LoRA teacher in ``out_dir/lora_teacher``, a preview grid
    ``out_dir/samples.png`` and ``out_dir/train.json``. Returns the student folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from sb2.atomic import atomic_dir

    out_dir = Path(out_dir)
    use_cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision if use_cuda else "no")
    set_seed(cfg.train.seed, device_specific=True)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    prompts_all = read_prompts(cfg.train.prompts)
    m = build_models(cfg, scheme, device, weight_dtype)
    opt_s = _adamw(m.student_params, cfg.optim.student_lr, cfg, device)
    opt_l = _adamw(m.lora_params, cfg.lora_teacher.lr, cfg, device)
    student, teacher_ddp, opt_s, opt_l = accelerator.prepare(m.student, m.teacher_unet, opt_s, opt_l)
    m.student = student
    teacher_plain = m.teacher_unet  # adapters switch on the unwrapped module; updates go through the wrapper
    ema = None
    if cfg.ema.enabled:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(m.student_params, decay=cfg.ema.decay)
    sampler = PromptSampler(prompts_all, cfg.train.batch_size, cfg.train.seed + accelerator.process_index)
    null_emb = encode_prompts(m.text_encoder, m.tokenizer, [""], device)
    cache = None
    if cfg.train.prompt_embeddings:
        from sb2.prompts.embeddings import EmbeddingCache

        cache = EmbeddingCache(cfg.train.prompt_embeddings, teacher=cfg.models.teacher, prompts=cfg.train.prompts)
    autocast = accelerator.autocast if use_cuda else nullcontext
    own_logger = logger is None
    if logger is None:
        logger = JsonlLogger(out_dir / "logs") if accelerator.is_main_process else None
    if logger is not None:
        logger.log_params({"scheme": scheme, **cfg.model_dump(mode="json")})

    bar = tqdm(range(cfg.train.steps), desc=f"train[{scheme}]", disable=not (progress and accelerator.is_main_process))
    logs: dict[str, float] = {}
    t_last, n_last = time.perf_counter(), 0
    for step in bar:
        prompts = sampler.next_batch()
        if cache is not None:
            emb = cache.lookup(prompts).to(device, null_emb.dtype)
        else:
            emb = encode_prompts(m.text_encoder, m.tokenizer, prompts, device)
        loss, x0, logs = student_step(m, cfg, emb, null_emb, prompts, step, autocast)
        accelerator.backward(loss)
        gn_s = accelerator.clip_grad_norm_(m.student_params, cfg.optim.max_grad_norm)
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(m.student_params)
        m.teacher_unet = teacher_ddp
        for _ in range(cfg.lora_teacher.updates_per_student_update):
            loss_l = lora_teacher_loss(m, cfg, x0, emb, null_emb, autocast)
            accelerator.backward(loss_l)
            gn_l = accelerator.clip_grad_norm_(m.lora_params, cfg.optim.max_grad_norm)
            opt_l.step()
            opt_l.zero_grad(set_to_none=True)
        m.teacher_unet = teacher_plain
        n_last += cfg.train.batch_size * accelerator.num_processes
        logs.update({"loss/lora_teacher": loss_l.item(), "grad_norm/student": float(gn_s),
                     "grad_norm/lora_teacher": float(gn_l), "lr/student": opt_s.param_groups[0]["lr"],
                     "lr/lora_teacher": opt_l.param_groups[0]["lr"]})
        bar.set_postfix(vsd=f"{logs['loss/vsd']:.4g}", lora=f"{logs['loss/lora_teacher']:.4g}")
        if logger is not None and ((step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps):
            now = time.perf_counter()
            logs["throughput/samples_per_s"] = n_last / max(now - t_last, 1e-9)
            t_last, n_last = now, 0
            logger.log_metrics(logs, step + 1)

    accelerator.wait_for_everyone()
    student_path = out_dir / "student"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(m.student)
        if ema is not None:
            ema.copy_to(m.student_params)  # the EMA weights are the branch's result
        with atomic_dir(student_path) as tmp:
            if scheme == "full":
                unwrapped.save_pretrained(tmp)
            else:
                save_lora(unwrapped, tmp, cfg.models.student)
        with atomic_dir(out_dir / "lora_teacher") as tmp:
            save_lora(teacher_plain, tmp, cfg.models.teacher)
        grid = _preview(m, cfg, unwrapped, prompts_all, out_dir / "samples.png", device, weight_dtype)
        if logger is not None:
            logger.log_image(grid, "samples.png")
        (out_dir / "train.json").write_text(json.dumps(
            {"scheme": scheme, "steps": cfg.train.steps, "final": logs, "student": str(student_path)}, indent=2))
    if own_logger and logger is not None:
        logger.close()
    accelerator.end_training()
    return student_path


@torch.no_grad()
def _preview(m: Models, cfg: Config, student, prompts: list[str], path: Path, device, dtype) -> Path:
    from sb2.generation.generator import OneStepGenerator
    from sb2.generation.images import save_grid

    student.eval()
    gen = OneStepGenerator(student, m.text_encoder, m.tokenizer, m.vae, m.alphas_cumprod,
                           cfg.vsd.student_timestep, cfg.models.student_prediction_type)
    ps = prompts[:PREVIEW_PROMPTS]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        images = gen(ps, seeds=list(range(len(ps))))
    return save_grid(images, path, cols=4)
