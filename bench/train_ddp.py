"""Benchmark: data-parallel scaling of `sb2 train` itself (accelerate + DDP), one process per GPU.

Builds the SD2.1-base architecture with random weights as a diffusers pipeline folder (the teacher) and a UNet folder
(the student init), then runs the real command — ``accelerate launch -m sb2 train --scheme full`` — with 1 process and
with N processes on the same machine, batch B per GPU, and reads the throughput the loop logs itself
(``throughput/samples_per_s`` in ``logs/metrics.jsonl``, counted over all processes). Scaling efficiency =
throughput(N) / (N × throughput(1)).

    python bench/train_ddp.py [--gpus 2] [--steps 40] [--batch 16]
    python bench/train_ddp.py --tiny      # CPU smoke test: tiny models, gloo, 2 processes

Prints a table; writes $OUT/train_ddp.json when OUT is set. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [f"a photo of subject {i} in a scene, highly detailed, {i % 7} lights" for i in range(512)]


def build_models(root: Path) -> tuple[str, str]:
    """The teacher pipeline folder and the student UNet folder, SD2.1-base architecture, random weights."""
    import torch

    from sb2.models.architectures import sd21_parts

    teacher, student = root / "teacher", root / "student"
    if (student / "config.json").exists():
        return str(teacher), str(student)
    p = sd21_parts("cuda", torch.float32, tiny_vae=False)
    for name in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        p[name].save_pretrained(teacher / name)
    (teacher / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    p["unet"].save_pretrained(student)
    return str(teacher), str(student)


def run(n: int, args, teacher: str, student: str, prompts: Path, out: Path) -> dict:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
              "--dynamo_backend", "no"]
    if args.tiny:
        launch += ["--cpu", "--mixed_precision", "no"]
    else:
        launch += (["--multi_gpu"] if n > 1 else []) + ["--mixed_precision", "bf16"]
    sets = [f"models.teacher={teacher}", f"models.student={student}", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.prompts={prompts}", f"train.log_every={args.log_every}",
            "tracking.enabled=false", "tracking.image_every=0", f"checkpoint.every={10 * args.steps}",
            "train.gradient_checkpointing=false", "ema.enabled=false"]
    cmd = launch + ["-m", "sb2", "train", "--scheme", "full", "--profile", "tiny" if args.tiny else "sd21",
                    "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        raise SystemExit(f"{n} process(es): sb2 train failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tput = [r["throughput/samples_per_s"] for r in rows if "throughput/samples_per_s" in r]
    steady = tput[2:] if len(tput) > 3 else tput[1:]  # the first windows hold cuDNN autotuning and allocator growth
    return {"processes": n, "samples_per_s": statistics.median(steady), "windows": tput, "wall_s": wall,
            "batch_per_process": args.batch, "steps": args.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--work", default="/tmp/sb2-ddp-bench")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only-many", action="store_true", help="skip the 1-process baseline (smoke tests only)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.batch, args.steps, args.log_every = min(args.batch, 2), min(args.steps, 12), 2
        teacher, student, card = "tiny:teacher", "tiny:student", f"cpu ({os.cpu_count()} cores)"
    else:
        import torch

        teacher, student = build_models(work / "models")
        card = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    results = []
    for n in ((args.gpus,) if args.only_many else (1, args.gpus)):
        out = work / f"run-{n}"
        subprocess.run(["rm", "-rf", str(out)])
        r = run(n, args, teacher, student, prompts, out)
        results.append(r)
        print(f"{n} process(es): {r['samples_per_s']:.1f} samples/s (windows {[round(x, 1) for x in r['windows']]}),"
              f" wall {r['wall_s']:.0f} s", flush=True)
    one, many = results[0]["samples_per_s"], results[-1]["samples_per_s"]
    eff = many / (args.gpus * one)
    print(f"\ncard: {card}; batch {args.batch} per process, full scheme, best eager settings")
    print(f"scaling efficiency with {args.gpus} processes: {eff:.3f} ({many:.1f} vs {args.gpus} × {one:.1f} samples/s)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "train_ddp.json").write_text(json.dumps(
            {"card": card, "runs": results, "scaling_efficiency": eff}, indent=2))


if __name__ == "__main__":
    main()
