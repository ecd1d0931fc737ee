"""Turbo-analog variants side by side, then a student from each: does a better init give better students?

    python bench/miniworld_turbo_variants.py --variants "add|score_weight=1" "add_only|score_weight=1,regression_weight=0" \
        [--student-steps 600] [--rows A] [--budget-s 560]

Each variant is ``NAME|SETTING,SETTING...`` with the settings of ``sb2 miniworld pretrain --turbo`` (empty: the
committed recipe). For each, one process copies the committed world (data/miniworld) to /tmp/turbo_variants/NAME
and retrains its Turbo analog there with every other model kept (``--keep`` of all six: the same teacher, judges and
metrics); all run at once under CUDA MPS. Then ``bench/miniworld_tune.py`` trains one student per row and variant
from that Turbo analog (``models.student=…``), plus the same rows from the committed Turbo analog as the baseline of
this run, and scores them as the bench does. Writes $OUT/variants.tar (the cards, logs, sample grids and tune.json)
and $OUT/turbo_NAME.tar (each variant's Turbo-analog folder, to commit or to score on CPU with
bench/miniworld_alignment.py --student). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from miniworld_tune import start_mps, stop_mps

KEEP = ["vae", "tiny_vae", "clip", "judges/clip", "judges", "teacher"]


def parse(spec: str) -> tuple[str, list[str]]:
    name, _, settings = spec.partition("|")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"{spec!r}: a variant is NAME|SETTING,SETTING... with NAME in letters, digits, _ and -")
    return name, [s for s in settings.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--student-steps", type=int, default=600)
    ap.add_argument("--rows", nargs="+", default=["A"])
    ap.add_argument("--captions", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=600, help="time cap of each Turbo analog's training")
    ap.add_argument("--budget-s", type=float, default=560, help="the whole run; students are killed past it")
    ap.add_argument("--work", default="/tmp/turbo_variants")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(os.environ.get("OUT", "."))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = [parse(s) for s in args.variants]
    mps = start_mps()
    print(f"MPS: {mps}", flush=True)
    record = {"mps": mps, "variants": {}, "args": vars(args)}
    try:
        procs = {}
        workers = max(1, (os.cpu_count() or 2) // len(variants))
        for name, settings in variants:
            world = work / name
            shutil.rmtree(world, ignore_errors=True)
            shutil.copytree(ROOT / "data" / "miniworld", world)
            cmd = [sys.executable, "-m", "sb2", "miniworld", "pretrain", "--out", str(world), "--workers",
                   str(workers), "--seconds", f"turbo={args.seconds}",
                   *[a for k in KEEP for a in ("--keep", k)], *[a for s in settings for a in ("--turbo", s)]]
            with open(work / f"{name}.pretrain.log", "w") as log:  # the child keeps its own descriptor
                procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                               time.perf_counter())
        while procs:  # each as it ends, so that its time is its own
            for name, (proc, started) in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del procs[name]
                card = work / name / "card.json"
                turbo = json.loads(card.read_text())["models"]["turbo"] if rc == 0 else None
                record["variants"][name] = {"settings": dict(variants)[name], "exit": rc,
                                            "pretrain_seconds": round(time.perf_counter() - started, 1),
                                            "turbo": turbo}
                print(name, "exit", rc, json.dumps(turbo and {k: turbo[k] for k in ("steps", "seconds", "metrics")}),
                      flush=True)
            time.sleep(1)
        built = [n for n, v in record["variants"].items() if v["exit"] == 0]
        specs = list(args.rows) + [f"{row}|models.student={work / n / 'turbo'}" for n in built for row in args.rows]
        left = args.budget_s - (time.perf_counter() - t0)
        print(f"students: {len(specs)}, {left:.0f} s left", flush=True)
        env = {**os.environ, "OUT": str(work)}
        subprocess.run([sys.executable, str(ROOT / "bench" / "miniworld_tune.py"), "--parallel", str(len(specs)),
                        "--timeout-s", str(max(30.0, left - 20)), "--steps", str(args.student_steps),
                        "--captions", str(args.captions), "--name", "students", "--variants", *specs],
                       cwd=ROOT, env=env, check=False)
        tune = work / "students.json"
        record["students"] = json.loads(tune.read_text()) if tune.exists() else None
    finally:
        if mps == "started":
            stop_mps()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        (work / "variants.json").write_text(json.dumps(record, indent=1))
        with tarfile.open(out / "variants.tar", "w") as tar:
            for f in sorted(work.glob("*.json")) + sorted(work.glob("*.log")):
                tar.add(f, arcname=f.name)
            for name, _ in variants:
                for f in ("card.json", "CARD.md", "turbo_samples.png"):
                    if (work / name / f).exists():
                        tar.add(work / name / f, arcname=f"{name}/{f}")
        for name, _ in variants:
            if record["variants"].get(name, {}).get("exit") == 0:
                with tarfile.open(out / f"turbo_{name}.tar", "w") as tar:
                    tar.add(work / name / "turbo", arcname="turbo")
    print(json.dumps({n: v["turbo"] and v["turbo"]["metrics"] for n, v in record["variants"].items()}), flush=True)
    for v in (record.get("students") or {}).get("variants", []):
        print("STUDENT", json.dumps(v), flush=True)


if __name__ == "__main__":
    main()
