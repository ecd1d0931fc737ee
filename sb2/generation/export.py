"""Export a one-step student as a complete diffusers pipeline folder that stock diffusers runs at 1 step, t = 999."""

from __future__ import annotations

import json
from pathlib import Path


def export_pipeline(model: str | Path, cfg, out_dir: str | Path) -> Path:
    """Student UNet + the teacher's text encoder, tokenizer and VAE + a DDIM scheduler with trailing spacing.

    With one step, trailing spacing lands on t = 999, the initial noise is not rescaled (init_noise_sigma = 1) and,
    with ᾱ_prev = 1 and no clipping, DDIM's step returns exactly x̂0 = (z − √(1−ᾱ) ε)/√ᾱ, the student's output.
    (Euler with trailing spacing, SD-Turbo's choice, scales the input noise by σ/√(σ²+1) ≈ 0.998 instead of 1.)"""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sb2.atomic import atomic_dir
    from sb2.models.loading import load_noise_scheduler, load_one_step_unet, load_text_encoder, load_vae

    unet = load_one_step_unet(model, cfg.models)
    text_encoder, tokenizer = load_text_encoder(cfg.models.teacher, cfg.models)
    vae = load_vae(cfg.models.teacher, cfg.models)
    teacher_sched = load_noise_scheduler(cfg.models.teacher, cfg.models)
    scheduler = DDIMScheduler.from_config(
        teacher_sched.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
        thresholding=False, steps_offset=1, prediction_type=cfg.models.student_prediction_type,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "sb2_export.json").write_text(json.dumps(
            {"source": str(model), "num_inference_steps": 1, "guidance_scale": 0.0,
             "timestep": cfg.vsd.student_timestep, "prediction_type": cfg.models.student_prediction_type}, indent=2))
    return out_dir
