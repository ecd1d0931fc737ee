"""HPSv2 (Wu et al. 2023) on its benchmark prompts (paper Tables 4, 9), scored with open_clip and the HPS checkpoint.

The ``hpsv2`` package is not used: it pins ``protobuf<4``, which conflicts with kfp. Its scoring is small enough to
restate (``hpsv2/evaluation.py``, ``evaluate_benchmark``): the ViT-H-14 open_clip model with the fine-tuned HPS_v2
weights loaded over both towers; per image, the cosine of the normalized image and prompt embeddings (no logit
scale); per style, the mean over chunks of 80 prompts of 100 × the chunk's mean cosine, and the spread (population
std) of those chunk scores. Images are scored at the generator's resolution through open_clip's validation transform
(HPSv2's benchmark reads saved JPEGs; this reads the uint8 images directly, without JPEG compression).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from sb2.evaluation.clip_score import clip_cosines
from sb2.evaluation.stream import generate_uint8

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
HPS_CHUNK = 80


def read_hps_prompts(folder: str | Path, styles: list[str], per_style: int | None = None) -> dict[str, list[str]]:
    """``<folder>/<style>.json`` (a list of prompts) for each style, the first ``per_style`` of each when given."""
    out = {}
    for style in styles:
        path = Path(folder) / f"{style}.json"
        if not path.is_file():
            raise FileNotFoundError(f"HPSv2 prompts {str(path)!r} do not exist")
        prompts = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"HPSv2 prompts {str(path)!r}: expected a JSON list of strings")
        out[style] = prompts[:per_style] if per_style else prompts
    return out


def hps_summary(cosines: list[float] | np.ndarray, chunk: int = HPS_CHUNK) -> dict[str, float]:
    """HPSv2's benchmark figure: 100 × mean cosine of each chunk of ``chunk`` prompts; their mean and std."""
    c = np.asarray(cosines, dtype=np.float64)
    chunks = [c[i:i + chunk].mean() * 100 for i in range(0, len(c), chunk)]
    return {"mean": float(np.mean(chunks)), "std": float(np.std(chunks)), "n": int(len(c))}


def hps_scores(gen, judge, prompts_by_style: dict[str, list[str]], seed: int, batch_size: int,
               timer=None) -> dict[str, dict[str, float]]:
    """Generate one image per prompt (prompt i of a style from seed + i) and score it with the HPS judge."""
    out = {}
    for style, prompts in prompts_by_style.items():
        cos = []
        for _, batch, images in generate_uint8(gen, prompts, [seed + i for i in range(len(prompts))], batch_size,
                                               timer):
            with timer("hps") if timer else nullcontext():
                cos.append(clip_cosines(judge, images, batch, prefix="").cpu())
        out[style] = hps_summary(torch.cat(cos).numpy())
    return out
