"""Tuning runs for the mini-world bench: one student per variant (the bench's own training and scoring), one seed.

    python bench/miniworld_tune.py --steps 400 --variants "A|vsd.guidance_scale=2.0" "B|vsd.guidance_scale=2.0"

Each variant is ``ROW|override|override...`` with ROW = A (full, VSD) or B (LoRA + clamped CLIP + schedule). Writes
$OUT/tune.json (or ./tune.json). A benchmark, not a test.
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

from sb2.miniworld import bench  # noqa: E402

LABELS = {"A": "A: full, VSD", "B": "B: LoRA, clamped + schedule (B)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--captions", type=int, default=2048)
    ap.add_argument("--lr-full", type=float, default=1e-6)
    ap.add_argument("--lr-lora", type=float, default=1e-4)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--device", default=None)
    ap.add_argument("--name", default="tune")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    results, t0 = [], time.perf_counter()
    base = {k: list(v[2]) for k, v in bench.STUDENTS.items()}
    for i, spec in enumerate(args.variants):
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skipped {spec}: past the budget", flush=True)
            continue
        row, *overrides = spec.split("|")
        group, scheme, _ = bench.STUDENTS[row]
        bench.STUDENTS[row] = (group, scheme, base[row] + overrides)
        plan = bench.Plan(num_captions=args.captions, seeds=(0,), train_steps=args.steps, batch_size=args.batch,
                          sweep=False, rows=[LABELS[row]], full_lr=args.lr_full, lora_lr=args.lr_lora,
                          grid_captions=4)
        rec = bench.run(f"/tmp/{args.name}/out{i}", plan, device=args.device, work=f"/tmp/{args.name}/work{i}")
        r = rec["rows"][LABELS[row]]
        results.append({"variant": spec, **{k: r[k]["mean"] for k in ("fid", "precision", "recall", "clip_score",
                                                                        "alignment")},
                        "train": rec["students"][row]})
        print("RESULT", json.dumps(results[-1]), flush=True)
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
