"""Mini-world rendering speed: scenes → uint8 images (+ captions), one process (numpy), printed as images/s.

    python bench/miniworld_render.py [--n 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

from sb2.miniworld import world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    world.make_pairs(0, "train", 256)  # warm-up
    for r in range(args.repeats):
        t0 = time.perf_counter()
        scenes = world.sample_scenes(r, "train", args.n)
        t1 = time.perf_counter()
        world.render(scenes)
        t2 = time.perf_counter()
        world.captions(scenes)
        t3 = time.perf_counter()
        print(f"repeat {r}: {args.n} scenes — sample {args.n / (t1 - t0):,.0f}/s, render {args.n / (t2 - t1):,.0f} "
              f"images/s, captions {args.n / (t3 - t2):,.0f}/s, all {args.n / (t3 - t0):,.0f} pairs/s "
              f"(1 process, {os.cpu_count()} CPUs visible)")


if __name__ == "__main__":
    main()
