"""DMD's regression pairs (``sb2 regpairs``): noise z and the teacher's deterministic sampler output for it, stored once
so that ``regularization.kind=dmd_pairs`` can regress the student's one-step x̂0 = f_θ(z, y) to them (DMD, Yin et al.
2024; sb2/distill/regularization.py).

Reads: the teacher (``models.teacher``: its UNet, text encoder, VAE-latent shape and noise schedule) and prompts (a text
file, or a Parquet/CSV file or folder with a ``prompt`` column, as ``train.prompts``). The sampler is DDIM with
``regularization.pairs.steps`` steps and the teacher's classifier-free guidance (``pairs.guidance_scale``, by default
``vsd.guidance_scale``); pair i starts from the noise of seed ``pairs.seed + i``, so a pair does not depend on the batch
size. Writes, all at once (an atomic folder): ``OUT/pairs-00000.safetensors…`` (``noise`` and ``target``, (N, C, h, w);
the shard's prompts, JSON, in its metadata) and ``OUT/manifest.json`` (format, teacher, sampler settings, latent
shape, shards and their rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sb2.config import Config
from sb2.distill.vsd import guided
from sb2.train.paired import BadPair, PairedInputError

FORMAT = "sb2-regpairs"
MANIFEST = "manifest.json"


@dataclass
class TeacherPair:
    caption: str
    noise: torch.Tensor  # (C, h, w), the student's input at its timestep
    target: torch.Tensor  # (C, h, w), the teacher's sample from that noise


@torch.no_grad()
def ddim_sample(unet, scheduler_config, noise: torch.Tensor, emb: torch.Tensor, null_emb: torch.Tensor,
                guidance_scale: float, steps: int) -> torch.Tensor:
    """The teacher's deterministic sampler: DDIM (η = 0) with classifier-free guidance, from ``noise`` to latents."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, device=noise.device)
    x = noise.float() * sched.init_noise_sigma
    text = torch.cat([emb, null_emb.expand_as(emb)])
    dtype = next(unet.parameters()).dtype
    for t in sched.timesteps:
        eps_c, eps_u = unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=text).sample.float().chunk(2)
        x = sched.step(guided(eps_u, eps_c, guidance_scale), t, x).prev_sample
    return x


def generate_regpairs(cfg: Config, prompts_source: str | Path, out_dir: str | Path, limit: int | None = None,
                      device: str | None = None, progress: bool = True) -> dict:
    """Run the teacher's sampler on the prompts (the first ``limit``) and write the pairs folder; returns its manifest."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from sb2.atomic import atomic_dir
    from sb2.models.loading import load_teacher
    from sb2.student import encode_prompts, latent_shape, seeded_noise
    from sb2.train.data import read_prompts

    pc = cfg.regularization.pairs
    prompts = read_prompts(prompts_source)[:limit]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weight_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    teacher = load_teacher(cfg.models, dtype=weight_dtype, device=device)
    shape = latent_shape(teacher.unet)
    store = {"float16": torch.float16, "float32": torch.float32}[pc.dtype]
    guidance = cfg.vsd.guidance_scale if pc.guidance_scale is None else pc.guidance_scale
    null = encode_prompts(teacher.text_encoder, teacher.tokenizer, [""], device)
    shards = []
    bar = tqdm(total=len(prompts), desc="regpairs", unit="pair", disable=not progress)
    with atomic_dir(out_dir) as tmp:
        for k, start in enumerate(range(0, len(prompts), pc.shard_rows)):
            rows = range(start, min(start + pc.shard_rows, len(prompts)))
            noises, targets = [], []
            for b in range(rows.start, rows.stop, pc.batch_size):
                ids = list(range(b, min(b + pc.batch_size, rows.stop)))
                # rounded to the stored dtype first: the teacher sees exactly the noise that is stored
                z = seeded_noise([pc.seed + i for i in ids], shape, device).to(store)
                emb = encode_prompts(teacher.text_encoder, teacher.tokenizer, [prompts[i] for i in ids], device)
                x = ddim_sample(teacher.unet, teacher.scheduler.config, z.float(), emb, null, guidance, pc.steps)
                noises.append(z.cpu())
                targets.append(x.to(store).cpu())
                bar.update(len(ids))
            name = f"pairs-{k:05d}.safetensors"
            save_file({"noise": torch.cat(noises).contiguous(), "target": torch.cat(targets).contiguous()},
                      str(tmp / name), metadata={"prompts": json.dumps([prompts[i] for i in rows])})
            shards.append({"file": name, "rows": len(rows)})
        manifest = {
            "format": FORMAT, "count": len(prompts), "teacher": cfg.models.teacher, "prompts": str(prompts_source),
            "latent_shape": list(shape), "sampler": "ddim", "steps": pc.steps, "guidance_scale": guidance,
            "seed": pc.seed, "dtype": pc.dtype, "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    bar.close()
    return manifest


class TeacherPairSource:
    """A folder of ``sb2 regpairs``; ``load(i)`` reads the i-th pair's rows only."""

    kind = "dmd_pairs"

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.name = str(folder)
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PairedInputError(f"{self.folder / MANIFEST}: not a readable pairs manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise PairedInputError(f"{self.folder}: not a folder written by `sb2 regpairs`")
        self.manifest = manifest
        self._rows: list[tuple[str, int]] = []
        self._captions: list[str] = []
        for shard in manifest["shards"]:
            path = self.folder / shard["file"]
            try:
                with safe_open(str(path), "pt") as f:
                    prompts = json.loads(f.metadata()["prompts"])
            except Exception as e:  # noqa: BLE001 — safetensors raises its own error type for a corrupt file
                raise PairedInputError(f"{path}: unreadable pairs shard ({str(e).splitlines()[0]})") from None
            if len(prompts) != shard["rows"]:
                raise PairedInputError(f"{path}: {len(prompts)} prompts, the manifest says {shard['rows']} rows")
            self._rows.extend((str(path), r) for r in range(shard["rows"]))
            self._captions.extend(prompts)
        if not self._rows:
            raise PairedInputError(f"{self.folder}: holds no pairs")

    def fit(self, latent_shape: tuple[int, int, int], vae_scale_factor: int) -> None:
        """Stored pairs must have the student's latent shape (they are its input and output)."""
        if tuple(self.manifest["latent_shape"]) != tuple(latent_shape):
            raise PairedInputError(f"{self.folder}: pairs of latents {tuple(self.manifest['latent_shape'])}, the "
                                   f"student makes {tuple(latent_shape)}")

    def __len__(self) -> int:
        return len(self._rows)

    def where(self, i: int) -> str:
        path, row = self._rows[i]
        return f"{path}: row {row}"

    def load(self, i: int) -> TeacherPair:
        from safetensors import safe_open

        path, row = self._rows[i]
        try:
            with safe_open(path, "pt") as f:
                noise = f.get_slice("noise")[row:row + 1]
                target = f.get_slice("target")[row:row + 1]
        except Exception as e:  # noqa: BLE001
            raise BadPair(f"unreadable pair ({str(e).splitlines()[0]})") from None
        return TeacherPair(self._captions[i], noise[0].float(), target[0].float())

