"""What the mini-world's one-step models get wrong about their captions: alignment broken down by kind of statement.

    python bench/miniworld_alignment.py [--captions 512] [--student RUN/student ...] [--device cpu]

For the teacher (25 DDIM steps, cfg 2 and 4.5), the Turbo analog and any student folders given, on the first N
evaluation captions (seed 0): the alignment accuracy, the share of images with the right number of objects, and the
alignment with one kind of statement (background, shape, color, size, position) left unchecked — the gap to the
alignment is what that kind costs. Prints a table; writes $OUT/alignment.json when OUT is set. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sb2.miniworld import bench
from sb2.miniworld.judges import STATEMENTS, alignment_breakdown

KEYS = ["alignment", "count", *(f"without_{k}" for k in STATEMENTS)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=512)
    ap.add_argument("--student", action="append", default=[], help="a student folder (UNet or LoRA); repeatable")
    ap.add_argument("--teacher-steps", type=int, default=25)
    ap.add_argument("--device", default=None)
    ap.add_argument("--world", default=None)
    args = ap.parse_args()
    from sb2.evaluation.evaluate import default_device
    from sb2.generation.generator import OneStepGenerator
    from sb2.miniworld.judges import world_root

    root = Path(args.world).resolve() if args.world else world_root().resolve()
    plan = bench.Plan(num_captions=args.captions, seeds=(0,), teacher_steps=args.teacher_steps, name="alignment")
    b = bench.Bench(Path("local_outputs/miniworld/alignment"), Path("local_outputs/miniworld/alignment"), plan,
                    default_device(args.device), root)
    models = [("teacher, cfg 2", "teacher:2.0"), ("teacher, cfg 4.5", "teacher:4.5"), ("Turbo analog", "turbo")]
    models += [(f"student {s}", s) for s in args.student]
    seeds = list(range(args.captions))
    rows = {}
    for label, what in models:
        t = time.perf_counter()
        gen = (OneStepGenerator.load(what, b.cfg, device=b.device) if label.startswith("student")
               else b.generator(what))
        images = bench.grid_images(gen, b.captions, seeds)
        rows[label] = alignment_breakdown(b.attributes, images, b.scenes)
        print(f"{label}: {time.perf_counter() - t:.0f} s", flush=True)
    print(f"\n{args.captions} evaluation captions, seed 0, device {b.device}\n")
    print("| model | " + " | ".join(KEYS) + " |")
    print("| --- |" + " --- |" * len(KEYS))
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "alignment.json").write_text(json.dumps(
            {"captions": args.captions, "device": str(b.device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
