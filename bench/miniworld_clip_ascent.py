"""What does the CLIP loss's gradient do to an image? Gradient ascent on the Turbo analog's latents, judged.

    python bench/miniworld_clip_ascent.py [--captions 256] [--steps 200] [--lr 0.05] [--tau 1.0] [--device cpu]
    python bench/miniworld_clip_ascent.py --decoder vae   # the loss through the full VAE instead of the TinyVAE

The loss of training, without a student in between: the Turbo analog's one-step latents for N evaluation captions
(noise seed i for caption i) are themselves the parameters, decoded by the TinyVAE (as in training; ``--decoder vae``:
the full VAE) and scored by the loss's CLIP
(``sb2.distill.reward.ClipReward`` on ``data/miniworld/clip``), and moved by Adam on ``clamped_reward_loss``
(τ = 1: the loss never clamps, the strongest push; the profile's τ 0.6 stops where the loss does). At a few steps the
latents are decoded by the full VAE, as the bench scores images, and judged: the attribute judge's alignment and
right-count share, the loss CLIP's and the CLIP-score judge's cosine, and how many images with a wrong count at the
start have the right one (and the reverse). If the cosine rises while the count does not move, the loss's gradient
is spent on something other than the caption's objects. Prints a table; writes $OUT/clip_ascent.json when OUT is set.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--at", type=int, nargs="+", default=None, help="steps at which to judge (default 0, 10%%, …)")
    ap.add_argument("--decoder", choices=["tiny_vae", "vae"], default="tiny_vae")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--world", default=str(ROOT / "data" / "miniworld"))
    args = ap.parse_args()
    rec = run(Path(args.world), args.captions, args.steps, args.lr, args.tau, args.device,
              args.at or sorted({0, args.steps // 10, args.steps // 4, args.steps // 2, args.steps}), args.decoder)
    print(f"{args.captions} evaluation captions, Turbo analog's latents as parameters, Adam lr {args.lr}, "
          f"τ {args.tau}, the loss through the {args.decoder}, device {args.device}\n")
    cols = ["step", "cos (loss CLIP, TinyVAE)", "cos (loss CLIP, VAE)", "cos (judge CLIP, VAE)", "alignment",
            "right count", "wrong → right", "right → wrong", "latent change"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rec["rows"]:
        print(f"| {r['step']} | {r['cos_loss_tiny']:.3f} | {r['cos_loss_vae']:.3f} | {r['cos_judge_vae']:.3f} | "
              f"{r['alignment']:.3f} | {r['count']:.3f} | {r['wrong_to_right']:.3f} | {r['right_to_wrong']:.3f} | "
              f"{r['latent_change']:.3f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "clip_ascent.json").write_text(json.dumps(rec, indent=2))


def run(root: Path, n: int, steps: int, lr: float, tau: float, device: str, at: list[int],
        decoder: str = "tiny_vae") -> dict:
    from sb2.config import load_config
    from sb2.distill.reward import ClipReward, clamped_reward_loss
    from sb2.generation.generator import OneStepGenerator
    from sb2.miniworld import world
    from sb2.miniworld.judges import load_judge, matches_caption, predict, right_count
    from sb2.models.loading import load_clip, load_tiny_vae
    from sb2.student import decode

    cfg = load_config("miniworld", [f"models.teacher={root / 'teacher'}", f"models.student={root / 'turbo'}"])
    gen = OneStepGenerator.load(root / "turbo", cfg, device=device)
    tiny = load_tiny_vae(str(root / "tiny_vae"), device=device)
    loss_clip, judge_clip = ClipReward(load_clip(str(root / "clip"), device)), \
        ClipReward(load_clip(str(root / "judges" / "clip"), device))
    attributes = load_judge(root / "judges" / "attributes").to(device)
    scenes = world.sample_scenes(0, "eval", n)
    captions = world.captions(scenes)
    with torch.no_grad():
        start = gen.latents(gen.encode(captions), gen.noise(list(range(n)))).float()
    lat = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([lat], lr=lr)
    rows, right0 = [], None

    @torch.no_grad()
    def judge(step: int, cos_tiny: float) -> dict:
        nonlocal right0
        images = decode(gen.decoder, lat.detach().to(gen.decoder.dtype)).float()
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pred = predict(attributes, u8)
        right = right_count(pred, scenes)
        if right0 is None:
            right0 = right
        return {"step": step, "cos_loss_tiny": cos_tiny,
                "cos_loss_vae": float(loss_clip(images, captions).mean()),
                "cos_judge_vae": float(judge_clip(images, captions).mean()),
                "alignment": matches_caption(pred, scenes), "count": float(right.mean()),
                "wrong_to_right": float((right & ~right0).sum() / max(1, (~right0).sum())),
                "right_to_wrong": float((~right & right0).sum() / max(1, right0.sum())),
                "latent_change": float((lat.detach() - start).norm() / start.norm())}

    through = tiny if decoder == "tiny_vae" else gen.decoder
    for step in range(steps + 1):
        cos = loss_clip(decode(through, lat), captions)
        if step in at:
            with torch.no_grad():
                cos_tiny = float(loss_clip(decode(tiny, lat.detach()), captions).mean())
            rows.append(judge(step, cos_tiny))
            print(f"step {step}: {rows[-1]}", flush=True)
        if step == steps:
            break
        opt.zero_grad()
        clamped_reward_loss(cos, tau).backward()
        opt.step()
    return {"captions": n, "steps": steps, "lr": lr, "tau": tau, "decoder": decoder, "device": device, "rows": rows,
            "right_count_at_start": int(np.sum(right0))}


if __name__ == "__main__":
    main()
