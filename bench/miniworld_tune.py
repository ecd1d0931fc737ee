"""Tuning runs for the mini-world bench: one student per variant (the bench's own training and scoring), one seed.

    python bench/miniworld_tune.py --steps 400 --variants "A|vsd.guidance_scale=2.0" "B|vsd.guidance_scale=2.0"
    python bench/miniworld_tune.py --parallel 6 --timeout-s 500 --variants ...   # one process a variant, 6 at a time

Each variant is ``ROW|override|override...`` with ROW = A (full, VSD), B (LoRA + clamped CLIP + schedule) or M (both
trained with the overrides, then merged at λ = 0.5: the A, B and merged rows), or ``T|CFG``: the teacher at that
guidance (the bench's 25 DDIM steps; no student), ``T|CFG|steps=N`` at N DDIM steps. Writes
$OUT/tune.json (or ./tune.json). With ``--parallel N`` each variant runs in its own process (N at a time, each
killed after ``--timeout-s``): the tiny UNet's training loop is bound by the CPU's kernel launches, so one GPU trains
several side by side; ``--mps`` first tries to start CUDA MPS (kernels of different processes then run
concurrently). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--captions", type=int, default=2048)
    ap.add_argument("--lr-full", type=float, default=1e-6)
    ap.add_argument("--lr-lora", type=float, default=3e-4)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--device", default=None)
    ap.add_argument("--name", default="tune")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=None)
    ap.add_argument("--mps", action="store_true")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    if args.parallel > 1:
        return run_parallel(args, out)
    results, t0 = [], time.perf_counter()
    base = {k: list(v[2]) for k, v in bench.STUDENTS.items()}
    for i, spec in enumerate(args.variants):
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skipped {spec}: past the budget", flush=True)
            continue
        row, *overrides = spec.split("|")
        labels = variant_rows(row, overrides)
        for student in variant_students(row):
            group, scheme, _ = bench.STUDENTS[student]
            bench.STUDENTS[student] = (group, scheme, base[student] + overrides)
        steps = teacher_steps(row, overrides)
        plan = bench.Plan(num_captions=args.captions, seeds=(0,), train_steps=args.steps, batch_size=args.batch,
                          sweep=False, rows=labels, full_lr=args.lr_full, lora_lr=args.lr_lora,
                          grid_captions=4, train_seeds=(0,),  # one student a variant: a variant sets train.seed
                          **({"teacher_steps": steps} if steps else {}))
        rec = bench.run(f"/tmp/{args.name}/out{i}", plan, device=args.device, work=f"/tmp/{args.name}/work{i}")
        scores = {lab: {k: rec["rows"][lab][k]["mean"] for k in ("fid", "precision", "recall", "clip_score",
                                                                 "alignment", "count") if k in rec["rows"][lab]}
                  for lab in labels if lab in rec["rows"]}
        trained = {s: rec.get("students", {}).get(s) for s in variant_students(row)}
        train_rec = trained if row == "M" else trained.get(row)  # None for the teacher
        results.append({"variant": spec, **scores.get(labels[-1], {}), "train": train_rec,
                        **({"rows": scores} if len(labels) > 1 else {})})
        print("RESULT", json.dumps(results[-1]), flush=True)
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))


def teacher_steps(row: str, overrides: list[str]) -> int | None:
    """The DDIM steps a teacher variant asks for (``T|CFG|steps=N``); None for the bench's own (25) or a student."""
    if row != "T":
        return None
    steps = [o.removeprefix("steps=") for o in overrides if o.startswith("steps=")]
    if not steps:
        return None
    if len(steps) > 1 or not steps[0].isdigit() or int(steps[0]) < 1:
        raise SystemExit(f"a teacher variant's steps=N is one positive integer (got T|{'|'.join(overrides)})")
    return int(steps[0])


def variant_rows(row: str, overrides: list[str]) -> list[str]:
    """The bench rows a variant scores (the last is its headline); ``T|CFG`` adds a teacher row at that guidance,
    ``T|CFG|steps=N`` at N DDIM steps instead of the bench's 25."""
    if row == "T":
        steps = teacher_steps(row, overrides)
        try:
            (cfg,) = (float(o) for o in overrides if not o.startswith("steps="))
        except ValueError:  # several values, none, or not a number
            raise SystemExit(f"a teacher variant is T|CFG or T|CFG|steps=N (got T|{'|'.join(overrides)})") from None
        label = f"teacher, cfg {cfg:g}" + (f", {steps} step{'s' * (steps > 1)}" if steps else "")
        if label not in {lab for _, lab, _ in bench.ROWS}:
            bench.ROWS.append(("Table 1: the teacher (multi-step, DDIM)", label, f"teacher:{cfg}"))
            bench.ORDER.insert(0, label)
        return [label]
    if row == "M":
        return [LABELS["A"], LABELS["B"], "merged A+B, λ = 0.5"]
    if row not in LABELS:
        raise SystemExit(f"unknown row {row!r}: A, B, M or T")
    return [LABELS[row]]


def variant_students(row: str) -> tuple[str, ...]:
    """The students a variant's overrides go to: both branches for M, none for a teacher row."""
    return ("A", "B") if row == "M" else (row,) if row in LABELS else ()


def stop_mps(timeout: float = 30) -> str:
    """Ask the MPS control daemon to quit. On the GPU machine its ``quit`` has been seen to hang past 30 s after the
    results were written (the machine is given back afterwards anyway), so a hang is reported, not raised: the
    script's exit status stays that of its work."""
    import subprocess

    try:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", check=False, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"MPS: the daemon did not quit ({type(e).__name__}); left running", flush=True)
        return f"not stopped: {type(e).__name__}"
    return "stopped"


def start_mps() -> str:
    """Start the CUDA MPS control daemon (pipe and log folders under /tmp); returns what happened ("started" when
    this call started one: run_parallel then stops it at the end)."""
    import subprocess

    pipe, log = Path("/tmp/sb2-mps/pipe"), Path("/tmp/sb2-mps/log")
    pipe.mkdir(parents=True, exist_ok=True)
    log.mkdir(parents=True, exist_ok=True)
    os.environ["CUDA_MPS_PIPE_DIRECTORY"], os.environ["CUDA_MPS_LOG_DIRECTORY"] = str(pipe), str(log)
    try:
        r = subprocess.run(["nvidia-cuda-mps-control", "-d"], check=False, capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not started: {e}"
    if r.returncode != 0:
        return f"not started: exit {r.returncode} {r.stderr.strip()}"
    probe = subprocess.run([sys.executable, "-c", "import torch; torch.ones(8, device='cuda').sum().item()"],
                           check=False, capture_output=True, text=True, timeout=120)
    if probe.returncode == 0:
        return "started"
    stop_mps()  # a daemon whose clients cannot connect would fail every process: run without
    return f"started but unusable, stopped: {probe.stderr.strip()[-300:]}"


def run_parallel(args, out: Path) -> None:
    """Each variant in its own process of this script, ``--parallel`` at a time; results gathered in order."""
    import subprocess

    mps = start_mps() if args.mps else "not started by this script"
    print(f"MPS: {mps}", flush=True)
    running: list[tuple[int, str, subprocess.Popen, float]] = []
    # `timeout` and schedulers stop a command with SIGTERM, whose default ends Python at once, skipping the cleanup
    # below: made an exception here, it runs it
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _run_variants(args, out, mps, running)
    finally:  # an error, Ctrl-C or SIGTERM here must not leave the children training on the GPU, nor our daemon running
        for _, _, proc, _ in running:
            proc.kill()
        if mps == "started":
            stop_mps()
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _run_variants(args, out: Path, mps: str, running: list) -> None:
    import subprocess

    t0 = time.perf_counter()
    todo = list(enumerate(args.variants))
    status: dict[int, str] = {}
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--captions", str(args.captions),
              "--lr-full", str(args.lr_full), "--lr-lora", str(args.lr_lora)] + (
        ["--device", args.device] if args.device else [])
    while todo or running:
        while todo and len(running) < args.parallel:
            i, spec = todo.pop(0)
            if time.perf_counter() - t0 > args.budget_s:
                status[i] = "skipped: past the budget"
                continue
            cmd = [sys.executable, __file__, "--variants", spec, "--name", f"{args.name}_{i}"] + common
            with open(out / f"{args.name}_{i}.log", "w") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            running.append((i, spec, proc, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            i, spec, proc, started = item
            if proc.poll() is not None:
                status[i] = f"exit {proc.returncode} after {time.perf_counter() - started:.0f} s"
                running.remove(item)
            elif args.timeout_s and time.perf_counter() - started > args.timeout_s:
                proc.kill()
                proc.wait()
                status[i] = f"killed after {args.timeout_s:.0f} s"
                running.remove(item)
    results = []
    for i, spec in enumerate(args.variants):
        f = out / f"{args.name}_{i}.json"
        rec = json.loads(f.read_text())[0] if f.exists() else {"variant": spec}
        results.append({**rec, "status": status.get(i)})
        print("RESULT", json.dumps(results[-1]), flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (out / f"{args.name}.json").write_text(json.dumps({"device": device, "mps": mps, "parallel": args.parallel,
                                                       "seconds": round(time.perf_counter() - t0, 1),
                                                       "variants": results}, indent=1))


if __name__ == "__main__":
    main()
