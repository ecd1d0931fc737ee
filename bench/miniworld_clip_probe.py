"""Can the mini-world's CLIP models tell a caption from the same caption with one statement made false?

    python bench/miniworld_clip_probe.py [--scenes 1024] [--device cpu]

For real rendered evaluation scenes (the judges' own ground truth), each caption is compared with counterfactual
captions of the same scene, written by the world's own caption code after one change to the scene record:
one object fewer (count − 1), one object more (count + 1, a bare shape), another shape for one object, another color,
position or size for an object whose caption states it, another background where the caption states it. For each kind
the share of scenes where CLIP scores the true caption above the counterfactual, on the image, is reported (chance
0.5), for the CLIP the clamped CLIP loss uses (``data/miniworld/clip``) and the judge CLIP of the CLIP score
(``data/miniworld/judges/clip``), through the loss's own preprocessing. A kind that CLIP cannot tell is one that the
CLIP loss cannot teach. Prints a table; writes $OUT/clip_probe.json when OUT is set. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sb2.miniworld import world  # noqa: E402

KINDS = ("count - 1", "count + 1", "shape", "color", "position", "size", "background")


def counterfactual(scenes: world.Scenes, kind: str, rng: np.random.Generator) -> tuple[world.Scenes, np.ndarray]:
    """A copy of ``scenes`` with one statement of each caption made false by ``kind``, and which scenes it applies to
    (a scene whose caption does not state that kind, or has no room for it, is left out). Rarely the changed phrase
    stays true of the image, when another object of that shape has the new attribute unstated. "count + 1" adds a
    bare "a <shape>" phrase and "count − 1" drops the last phrase, so those two also change the caption's form."""
    s = copy.deepcopy(scenes)
    n, ok = len(s), np.zeros(len(s), bool)
    for i in range(n):
        c = int(s.count[i])
        if kind == "count - 1" and c >= 2:
            s.count[i] = c - 1
            s.shape[i, c - 1] = -1
            ok[i] = True
        elif kind == "count + 1" and c <= 2:
            s.count[i], s.shape[i, c] = c + 1, rng.integers(len(world.SHAPES))
            s.says_color[i, c] = s.says_size[i, c] = s.says_position[i, c] = False
            ok[i] = True
        elif kind == "shape":
            k = rng.integers(c)
            s.shape[i, k] = (s.shape[i, k] + rng.integers(1, len(world.SHAPES))) % len(world.SHAPES)
            ok[i] = True
        elif kind in ("color", "position", "size"):
            says = {"color": s.says_color, "position": s.says_position, "size": s.says_size}[kind][i, :c]
            if says.any():
                k = int(rng.choice(np.flatnonzero(says)))
                arr, m = {"color": (s.color, len(world.COLORS)), "position": (s.cell, len(world.POSITIONS)),
                          "size": (s.size, len(world.SIZES))}[kind]
                arr[i, k] = (arr[i, k] + rng.integers(1, m)) % m
                ok[i] = True
        elif kind == "background" and s.says_background[i]:
            m = len(world.BACKGROUNDS)
            s.background[i] = (s.background[i] + rng.integers(1, m)) % m
            ok[i] = True
    return s, ok


@torch.no_grad()
def probe(clip_folder: str, images: np.ndarray, scenes: world.Scenes, device, seed: int = 0) -> dict:
    from sb2.distill.clip_loss import clip_preprocess
    from sb2.models.loading import load_clip

    scorer = load_clip(clip_folder, device=device)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    img = torch.nn.functional.normalize(scorer.encode_image(clip_preprocess(x, scorer.image_size, scorer.mean,
                                                                            scorer.std)), dim=-1)

    def text(caps: list[str]) -> torch.Tensor:
        return torch.cat([torch.nn.functional.normalize(scorer.encode_text(caps[a:a + 256], device), dim=-1)
                          for a in range(0, len(caps), 256)])

    true = (img * text(world.captions(scenes))).sum(-1)
    rng = np.random.default_rng(seed)
    out = {"true_cosine_median": float(true.median())}
    for kind in KINDS:
        cf, ok = counterfactual(scenes, kind, rng)
        caps = world.captions(cf)
        idx = np.flatnonzero(ok)
        false = (img[idx] * text([caps[i] for i in idx])).sum(-1)
        margin = true[idx] - false
        out[kind] = {"scenes": len(idx), "true_above": float((margin > 0).float().mean()),
                     "margin_median": float(margin.median())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--world", default=str(ROOT / "data" / "miniworld"))
    args = ap.parse_args()
    images, _, scenes = world.make_pairs(0, "eval", args.scenes)
    res = {name: probe(str(Path(args.world) / sub), images, scenes, args.device)
           for name, sub in (("loss CLIP (data/miniworld/clip)", "clip"),
                             ("judge CLIP (data/miniworld/judges/clip)", "judges/clip"))}
    print(f"{args.scenes} evaluation scenes (real renders), seed 0: share where the true caption scores above the "
          "counterfactual (chance 0.5); median cosine margin in brackets\n")
    print("| CLIP | " + " | ".join(KINDS) + " |")
    print("| --- |" + " --- |" * len(KINDS))
    for name, r in res.items():
        print(f"| {name} | " + " | ".join(f"{r[k]['true_above']:.3f} ({r[k]['margin_median']:+.3f}; n {r[k]['scenes']})"
                                          for k in KINDS) + " |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "clip_probe.json").write_text(json.dumps(
            {"scenes": args.scenes, "kinds": list(KINDS), "results": res}, indent=2))


if __name__ == "__main__":
    main()
