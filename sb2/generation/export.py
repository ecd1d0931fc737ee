"""Export a one-step student as a complete diffusers pipeline folder that stock diffusers runs at 1 step, t = 999."""

from __future__ import annotations

import json
from pathlib import Path


def export_pipeline(model: str | Path, cfg, out_dir: str | Path) -> Path:
    """Student UNet + the teacher's text encoder, tokenizer and VAE + an Euler scheduler with trailing spacing (one
    step lands on t = 999, and its Euler step from σ_max to 0 is exactly x̂0 = (z − σ ε)/α of the student)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sb2.atomic import atomic_dir
    from sb2.models.loading import load_one_step_unet, load_text_encoder, load_vae, resolve

    if cfg.models.student_prediction_type != "epsilon":
        pred = cfg.models.student_prediction_type
    else:
        pred = "epsilon"
    unet = load_one_step_unet(model, cfg.models)
    text_encoder, tokenizer = load_text_encoder(cfg.models.teacher, cfg.models)
    vae = load_vae(cfg.models.teacher, cfg.models)
    sched_kw = {"subfolder": "scheduler"}
    teacher_path = resolve(cfg.models.teacher)
    scheduler = EulerDiscreteScheduler.from_pretrained(teacher_path, **sched_kw)
    scheduler = EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing",
                                                   prediction_type=pred)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "sb2_export.json").write_text(json.dumps(
            {"source": str(model), "num_inference_steps": 1, "guidance_scale": 0.0, "timestep": 999}, indent=2))
    return out_dir
