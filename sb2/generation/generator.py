"""The one-step generator: prompts (+ seeds or noise) → images with one UNet call per batch, and the `generate` stage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sb2.student import decode, encode_prompts, latent_shape, seeded_noise, student_x0

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class OneStepGenerator:
    unet: Any
    text_encoder: Any
    tokenizer: Any
    decoder: Any
    alphas_cumprod: torch.Tensor
    timestep: int = 999
    prediction_type: str = "epsilon"

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @classmethod
    def load(cls, model: str | Path, cfg, device="cpu", dtype: str | torch.dtype = "float32",
             decoder: str = "vae") -> "OneStepGenerator":
        """``model``: a UNet folder, a LoRA student folder or a pipeline folder; the text encoder, tokenizer, VAE and
        schedule come from the pipeline folder if it is one, else from the config's teacher."""
        from sb2.models.loading import (load_noise_scheduler, load_one_step_unet, load_text_encoder, load_tiny_vae,
                                        load_vae)

        dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
        mp = Path(str(model)).expanduser()
        source = str(mp) if (mp / "model_index.json").is_file() else cfg.models.teacher
        unet = load_one_step_unet(model, cfg.models, dtype=dt, device=device).eval().requires_grad_(False)
        text_encoder, tokenizer = load_text_encoder(source, cfg.models, dt, device)
        dec = (load_tiny_vae(cfg.models.tiny_vae, cfg.models, dt, device) if decoder == "tiny_vae"
               else load_vae(source, cfg.models, dt, device))
        sched = load_noise_scheduler(source, cfg.models)
        return cls(unet, text_encoder, tokenizer, dec, sched.alphas_cumprod, cfg.vsd.student_timestep,
                   cfg.models.student_prediction_type)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.device)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        return seeded_noise(seeds, latent_shape(self.unet), self.device, self.dtype)

    @classmethod
    def from_pipeline(cls, folder: str | Path, device="cpu", dtype: str | torch.dtype = "float32") -> "OneStepGenerator":
        """An exported pipeline folder is self-contained: no config needed (serving loads it this way)."""
        from sb2.models.loading import load_noise_scheduler, load_text_encoder, load_unet, load_vae

        dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
        folder = str(folder)
        meta_path = Path(folder) / "sb2_export.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        unet = load_unet(folder, dtype=dt, device=device).eval().requires_grad_(False)
        text_encoder, tokenizer = load_text_encoder(folder, None, dt, device)
        sched = load_noise_scheduler(folder)
        return cls(unet, text_encoder, tokenizer, load_vae(folder, None, dt, device), sched.alphas_cumprod,
                   int(meta.get("timestep", 999)), meta.get("prediction_type", "epsilon"))

    @torch.no_grad()
    def latents(self, text_emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return student_x0(self.unet, z.to(self.device, self.dtype), text_emb.to(self.device, self.dtype),
                          self.alphas_cumprod, self.timestep, self.prediction_type)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int] | None = None, noise: torch.Tensor | None = None,
                 text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1], shape (B, 3, H, W), float32 on the CPU."""
        if noise is None:
            seeds = list(range(len(prompts))) if seeds is None else seeds
            noise = self.noise(seeds)
        emb = self.encode(prompts) if text_emb is None else text_emb
        x0 = self.latents(emb, noise)
        return decode(self.decoder, x0.to(self.decoder.dtype)).float().cpu()


def read_prompt_args(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    out = list(prompts or [])
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {prompt_file!r} does not exist")
        out += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not out:
        raise ValueError("no prompts given (pass prompts or --prompt-file)")
    return out


def generate(model: str | Path, prompts: list[str], out_dir: str | Path, cfg, device: str | None = None,
             seeds: list[int] | None = None, interpolate: str | None = None, steps: int = 8) -> dict[str, Any]:
    """The generate stage: PNGs ``out_dir/0000.png``…, ``grid.png`` and ``generate.json`` (prompts and seeds).

    ``interpolate="noise"`` slerps between the noises of seeds[0] and seeds[1] for prompts[0] (paper 8.3);
    ``"prompt"`` slerps between the embeddings of prompts[0] and prompts[1] with one noise (paper 8.4).
    """
    from sb2.atomic import atomic_dir
    from sb2.generation.images import save_grid, to_pil
    from sb2.generation.interpolate import slerp_path

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.generate.dtype if device != "cpu" else "float32"
    gen = OneStepGenerator.load(model, cfg, device=device, dtype=dtype, decoder=cfg.generate.decoder)
    replaced = 0
    if cfg.generate.subpixel_upsample != "off":  # before the fast path makes its layouts and graphs
        from sb2.generation.subpixel import subpixel_upsamplers

        replaced = sum(subpixel_upsamplers(m, cfg.generate.subpixel_upsample) for m in (gen.unet, gen.decoder))
    if device != "cpu" and cfg.generate.fast and interpolate is None:
        from sb2.generation.fast import GraphedOneStep

        gen = GraphedOneStep(gen, compile=cfg.generate.compile, tuned=cfg.generate.tuned_compile,
                             coordinate_descent=cfg.generate.coordinate_descent_tuning)
    base = cfg.generate.seed
    if interpolate == "noise":
        s = seeds or [base, base + 1]
        z = slerp_path(gen.noise([s[0]])[0], gen.noise([s[1]])[0], steps)
        images = gen([prompts[0]] * steps, noise=z)
        record = {"interpolate": "noise", "prompt": prompts[0], "seeds": s[:2], "steps": steps}
    elif interpolate == "prompt":
        if len(prompts) < 2:
            raise ValueError("prompt interpolation needs two prompts")
        e = gen.encode(prompts[:2])
        emb = slerp_path(e[0], e[1], steps)
        s = seeds or [base]
        images = gen([""] * steps, noise=gen.noise([s[0]] * steps), text_emb=emb)
        record = {"interpolate": "prompt", "prompts": prompts[:2], "seed": s[0], "steps": steps}
    elif interpolate is None:
        seeds = seeds or [base + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        bs = cfg.generate.batch_size
        chunks = []
        for i in tqdm(range(0, len(prompts), bs), desc="generate", unit="batch", disable=len(prompts) <= bs):
            chunks.append(gen(prompts[i:i + bs], seeds[i:i + bs]))
        images = torch.cat(chunks)
        record = {"prompts": prompts, "seeds": seeds}
    else:
        raise ValueError(f"interpolate must be 'noise' or 'prompt', not {interpolate!r}")
    record.update(model=str(model), count=len(images))
    if replaced:
        record["subpixel_upsample"] = {"mode": cfg.generate.subpixel_upsample, "upsamplers": replaced}
    with atomic_dir(out_dir) as out:
        for i, im in enumerate(to_pil(images)):
            im.save(out / f"{i:04d}.png")
        save_grid(images, out / "grid.png", cols=cfg.generate.grid_cols if interpolate is None else steps)
        (out / "generate.json").write_text(json.dumps(record, indent=2))
    return record
