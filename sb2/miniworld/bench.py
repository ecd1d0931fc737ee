"""`sb2 miniworld bench`: the paper's tables in miniature, scored by the evaluation stage's own code with the
mini-world judges (``miniworld`` profile): FID, precision, recall, CLIP score — and alignment accuracy from the
attribute judge — on the evaluation captions, mean ± std over seeds.

Rows so far: the teacher at 25 DDIM steps with cfg 2, 4.5 and 7.5 (Table 1's teacher), the Turbo analog (one step),
and any trained student given as ``NAME=PATH`` (a UNet, LoRA or merged folder). Training the rows of Tables 2, 5, 6 and
the λ sweep (Figs. 3, 7) is not wired in yet: train them with ``sb2 train -p miniworld`` and pass them here.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from sb2.miniworld import world


@dataclass
class MultiStepGenerator:
    """The teacher behind the one-step generator's interface (``encode``, ``noise``, ``latents``, ``decoder``), so
    the evaluation streams its images exactly as a student's: DDIM with classifier-free guidance."""

    base: object  # a OneStepGenerator loaded from the teacher pipeline (its UNet, text encoder, VAE)
    steps: int
    guidance: float

    def __getattr__(self, name):
        return getattr(self.base, name)

    @torch.no_grad()
    def latents(self, text_emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        from sb2.miniworld.teacher import sample

        uncond = self.base.encode([""])
        return sample(self.base.unet, text_emb.float(), uncond.float(), z.float(), self.steps, self.guidance)


class _Collector:
    """An ``ImageWriter`` stand-in that keeps the generated uint8 images (for the alignment judge)."""

    def __init__(self):
        self.images: list[torch.Tensor] = []

    def write(self, start, captions, images):
        self.images.append(images.cpu())


def bench(out: str | Path, quick: bool = False, device: str | None = None, seeds: tuple[int, ...] = (0, 1, 2),
          students: dict[str, str] | None = None, world_dir: str | Path | None = None) -> dict:
    from sb2.config import load_config
    from sb2.evaluation.evaluate import default_device, load_judges, protocol_metrics, write_json
    from sb2.evaluation.reference import reference_for
    from sb2.evaluation.timing import PhaseTimer
    from sb2.generation.generator import OneStepGenerator
    from sb2.miniworld.captions import write_reference_images
    from sb2.miniworld.judges import alignment, load_judge, world_root

    device = default_device(device)
    root = Path(world_dir) if world_dir else world_root()
    out = Path(out)
    n = 32 if quick else 2048
    steps = 2 if quick else 25
    ref_images = out / f"reference_{n}"
    if not ref_images.is_dir():
        write_reference_images(ref_images, num_eval=n)
    overrides = [f"models.{k}={root / v}" for k, v in (("teacher", "teacher"), ("student", "turbo"),
                                                        ("tiny_vae", "tiny_vae"), ("clip", "clip"))]
    overrides += [f"evaluate.num_captions={n}", f"evaluate.reference_images={ref_images}",
                  f"evaluate.reference_dir={out / f'reference_features_{n}'}", "evaluate.dtype=float32",
                  f"evaluate.clip_score.model={root / 'judges' / 'clip'}", "evaluate.batch_size=256"]
    cfg = load_config("miniworld", overrides)
    ecfg = cfg.evaluate
    import os

    os.environ["SB2_MINIWORLD"] = str(root)  # where the feature judge (kind: module) loads from
    judges = load_judges(ecfg, device, metrics=["fid", "precision_recall", "clip_score"])
    reference = reference_for(ecfg, judges, device, ["fid", "precision_recall"])
    attributes = load_judge(root / "judges" / "attributes").to(device)
    scenes = world.sample_scenes(0, "eval", n)
    captions = world.captions(scenes)

    teacher = OneStepGenerator.from_pipeline(root / "teacher", device=device)
    rows = {f"teacher, {steps} steps, cfg {g}": MultiStepGenerator(teacher, steps, g) for g in (2.0, 4.5, 7.5)}
    rows["turbo analog, 1 step"] = OneStepGenerator.load(root / "turbo", cfg, device=device)
    for name, path in (students or {}).items():
        rows[name] = OneStepGenerator.load(path, cfg, device=device)

    results: dict[str, dict] = {}
    for name, gen in rows.items():
        runs = []
        for s in seeds:
            ecfg.seed = 100_000 * s
            collector = _Collector()
            m = protocol_metrics(gen, captions, judges, reference, ecfg, PhaseTimer(device), collector, progress=False)
            m["alignment"] = alignment(attributes, torch.cat(collector.images), scenes)
            runs.append(m)
            print(f"{name} seed {s}: {json.dumps(m)}", flush=True)
        results[name] = {k: {"mean": statistics.fmean(r[k] for r in runs),
                             "std": statistics.pstdev([r[k] for r in runs]) if len(runs) > 1 else 0.0}
                         for k in runs[0]}
    record = {"num_captions": n, "seeds": list(seeds), "world": str(root), "rows": results}
    write_json(out / "results.json", record)
    (out / "results.md").write_text(results_markdown(record))
    return record


def results_markdown(record: dict) -> str:
    keys = ("fid", "precision", "recall", "clip_score", "alignment")
    lines = [f"# Mini-world benchmark ({record['num_captions']} evaluation captions, seeds {record['seeds']})", "",
             "FID in the units of judges/features; mean ± std over seeds.", "",
             "| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, r in record["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]['mean']:.4g} ± {r[k]['std']:.2g}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
