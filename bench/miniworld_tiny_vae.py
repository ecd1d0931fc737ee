"""Distil the mini-world's TinyVAE again, for longer, beside the committed world (nothing committed is touched).

    python bench/miniworld_tiny_vae.py --to /tmp/tiny_vae_120 [--seconds 120] [--steps 2000] [--workers 16]

The committed TinyVAE (``data/miniworld/tiny_vae``) was distilled for 12 s (PSNR 19 dB); the lora scheme decodes its
CLIP loss through it. This script renders the training pairs as ``sb2 miniworld pretrain`` does, encodes them with the
committed VAE, distils a TinyVAE with pretrain's own trainer (``sb2.miniworld.vae.train_tiny_vae``, the same recipe
and seed) under the given time cap, saves it to ``--to`` (a folder ``models.tiny_vae=`` can name; never inside the
world folder), and reports its reconstruction error on the first 1,024 evaluation images (as the card measures it)
beside the committed one's, measured in the same run. Writes $OUT/tiny_vae.json when OUT is set. A benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


EVAL_IMAGES = 1024  # the card measures the TinyVAE on the first 1,024 evaluation images


def main(argv=None) -> dict:
    from diffusers import AutoencoderKL, AutoencoderTiny

    from sb2.miniworld.fitting import WorldData
    from sb2.miniworld.pretrain import PretrainConfig, render_pairs
    from sb2.miniworld.vae import encode_all, reconstruction_error, save_half, train_tiny_vae

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--to", required=True, help="folder the new TinyVAE is saved to")
    ap.add_argument("--world", default=str(ROOT / "data" / "miniworld"))
    ap.add_argument("--seconds", type=float, default=120.0, help="time cap of the distillation")
    ap.add_argument("--steps", type=int, default=None, help="step cap (default: pretrain's)")
    ap.add_argument("--pairs", type=int, default=None, help="training pairs (default: pretrain's)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.steps is not None and args.steps <= 0 or args.pairs is not None and args.pairs <= 0:
        ap.error("--steps and --pairs must be positive")
    cfg = PretrainConfig()
    world_dir = Path(args.world)
    if not (world_dir / "teacher" / "vae").is_dir():
        ap.error(f"{world_dir} holds no teacher/vae: not a mini-world folder")
    to = Path(args.to).resolve()
    if to == world_dir.resolve() or world_dir.resolve() in to.parents:
        ap.error(f"--to {args.to} is inside the world folder {world_dir}: this script never writes there")
    pairs = args.pairs or cfg.train_pairs
    t = time.perf_counter()  # rendering forks workers: before anything touches CUDA
    images, captions, scenes = render_pairs(cfg.seed, "train", pairs, args.workers)
    ev_images, _, _ = render_pairs(cfg.seed, "eval", EVAL_IMAGES, args.workers)  # the first: scene i is fixed
    render_s = time.perf_counter() - t
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    vae = AutoencoderKL.from_pretrained(str(world_dir / "teacher" / "vae")).to(device).eval().requires_grad_(False)
    data = WorldData(torch.from_numpy(images).to(device), captions, scenes)
    ev = torch.from_numpy(ev_images).to(device)
    latents = encode_all(vae, data.images)
    steps = cfg.tiny_vae_steps if args.steps is None else args.steps
    tiny, info = train_tiny_vae(vae, data, latents, steps, cfg.batch, 1e-3, cfg.seed + 3,
                                device, cfg.vae_width, args.seconds)
    save_half(tiny, args.to)
    committed = AutoencoderTiny.from_pretrained(str(world_dir / "tiny_vae")).to(device).eval()
    rec = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "pairs": pairs,
           "render_seconds": round(render_s, 1), "seconds_cap": args.seconds, "train": info, "saved_to": args.to,
           "new": reconstruction_error(tiny, ev, tiny=True),
           "committed": reconstruction_error(committed, ev, tiny=True)}
    print(json.dumps(rec, indent=1), flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "tiny_vae.json").write_text(json.dumps(rec, indent=1))
    return rec


if __name__ == "__main__":
    main()
