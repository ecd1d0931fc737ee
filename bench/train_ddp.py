"""Benchmark: data-parallel scaling of `sb2 train` itself (accelerate + DDP), one process per GPU.

Builds the SD2.1-base architecture with random weights as a diffusers pipeline folder (the teacher) and a UNet folder
(the student init), then runs the real command — ``accelerate launch -m sb2 train --scheme full`` — with 1 process and
with N processes on the same machine, batch B per GPU, and reads the throughput the loop logs itself
(``throughput/samples_per_s`` in ``logs/metrics.jsonl``, counted over all processes). Scaling efficiency =
throughput(N) / (N × throughput(1)).

One invocation can measure several N-process variants of the DDP settings (``train.ddp``) against the same
1-process baseline: ``--variants torch "bucket=100,view" "bucket=100,view,bf16"``. A variant is ``default`` (the
``sd21`` profile's ``train.ddp``: 100 MB buckets as gradient views since they were measured), ``torch`` (torch's own
DDP settings: 25 MB buckets, no views, no static graph, no hook) or a comma-separated list of
    bucket=MB     train.ddp.bucket_cap_mb=MB
    view          train.ddp.gradient_as_bucket_view=true
    static        train.ddp.static_graph=true
    fp16 | bf16   train.ddp.comm_hook=fp16 | bf16 (gradients all-reduced in 16 bits: lossy)
    KEY=VALUE     any other override, e.g. train.ddp.bucket_cap_mb=50
A run whose predicted end (1.3 × the previous run's wall time from now) falls after ``--budget-s`` is skipped, a run
still going at the budget is stopped, and one that fails is recorded and the next one runs; the JSON is rewritten
after every run, so whatever was measured survives the command being cut off.

    python bench/train_ddp.py [--gpus 2] [--steps 40] [--batch 16] [--variants default ...] [--budget-s 540]
    python bench/train_ddp.py --baseline bench/results/train_ddp_h200x2.json --variants ...  # reuse a 1-process run
    python bench/train_ddp.py --tiny [--variants ...]   # CPU smoke test: tiny models, gloo, 2 processes
    python bench/train_ddp.py --steps 30 --rounds 2 --budget-s 555   # 1, 2, 1, 2 processes: efficiency per round

``--rounds R`` alternates the 1-process run and the variants R times — 1, N, N, 1, 1, N, … — so that each efficiency
is against a 1-process run minutes apart on the same machine (and a drift within a pair of rounds falls on both): on
2 × H200 one 1-process and one 2-process run in sequence moved the efficiency by ±8% from one pair to the next
(BENCHMARKS.md), which a single pair cannot tell from the lever.

Under --tiny the comm hooks run over gloo, which all-reduces fp16 and bf16 tensors in torch 2.14; with a torch whose
gloo does not, that variant fails with gloo's message and the next one runs.

On 2 × H200 a run took 110 s (1 process) and 126 s (2 processes) at 30 steps, most of it start-up, model loading and
the two checkpoints every run writes (its first step and its last): one 512-s command ran the model build (25 s), the
baseline and three variants; more variants go to a second call with --baseline.

Prints a table; writes $OUT/train_ddp.json when OUT is set. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [f"a photo of subject {i} in a scene, highly detailed, {i % 7} lights" for i in range(512)]
SHORT = {"view": "train.ddp.gradient_as_bucket_view=true", "static": "train.ddp.static_graph=true",
         "fp16": "train.ddp.comm_hook=fp16", "bf16": "train.ddp.comm_hook=bf16"}


def variant_overrides(spec: str) -> list[str]:
    """``bucket=100,view,bf16`` → the ``--set`` overrides it stands for (``default``: none). Validated against the
    config schema here, so that a typo fails before any GPU time is spent."""
    from sb2.config import ConfigError, load_config

    if spec.strip() == "default":
        return []
    if spec.strip() == "torch":
        return ["train.ddp.bucket_cap_mb=25", "train.ddp.gradient_as_bucket_view=false",
                "train.ddp.static_graph=false", "train.ddp.comm_hook=none"]
    sets = []
    for token in (t.strip() for t in spec.split(",")):
        if token in SHORT:
            sets.append(SHORT[token])
        elif token.startswith("bucket="):
            sets.append(f"train.ddp.bucket_cap_mb={token.removeprefix('bucket=')}")
        elif "=" in token and "." in token.split("=", 1)[0]:
            sets.append(token)
        else:
            raise SystemExit(f"variant {spec!r}: unknown token {token!r} (bucket=MB, view, static, fp16, bf16, "
                             f"KEY=VALUE, default or torch)")
    try:
        load_config("tiny", sets)
    except ConfigError as e:
        raise SystemExit(f"variant {spec!r}: {e}") from None
    return sets


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


def run(n: int, args, teacher: str, student: str, prompts: Path, out: Path, extra: list[str],
        timeout: float | None) -> dict:
    """One `sb2 train` launch; its throughput, or why it has none (``error``)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
              "--dynamo_backend", "no"]
    if args.tiny:
        launch += ["--cpu", "--mixed_precision", "no"]
    else:
        launch += (["--multi_gpu"] if n > 1 else []) + ["--mixed_precision", "bf16"]
    sets = [f"models.teacher={teacher}", f"models.student={student}", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.prompts={prompts}", f"train.log_every={args.log_every}",
            "tracking.enabled=false", "tracking.image_every=0", f"checkpoint.every={10 * args.steps}",
            "train.gradient_checkpointing=false", "ema.enabled=false", *extra]
    cmd = launch + ["-m", "sb2", "train", "--scheme", "full", "--profile", "tiny" if args.tiny else "sd21",
                    "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    base = {"processes": n, "overrides": extra, "batch_per_process": args.batch, "steps": args.steps}
    t0 = time.perf_counter()
    # A session of its own: a run that hangs (a collective never matched) is stopped with all its processes.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {**base, "wall_s": time.perf_counter() - t0, "error": f"stopped at the budget after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(stdout[-2000:], stderr[-4000:], sep="\n")
        lines = [x.strip() for x in stderr.splitlines() if x.strip()]
        said = [x for x in lines if x.startswith("error:")] or lines[-1:]  # sb2's own one-line error first
        return {**base, "wall_s": wall, "error": f"exit code {proc.returncode}: {said[0] if said else ''}"[:300]}
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tput = [r["throughput/samples_per_s"] for r in rows if "throughput/samples_per_s" in r]
    steady = tput[2:] if len(tput) > 3 else tput[1:]  # the first windows hold cuDNN autotuning and allocator growth
    return {**base, "samples_per_s": statistics.median(steady), "windows": tput, "wall_s": wall}


def round_done(runs_of_round: list[dict], only_many: bool = False) -> bool:
    """A round is done when it gave a figure: an efficiency (its N-process run against its own 1-process run), or
    under ``--only-many`` (no 1-process run) an N-process rate. A round whose 1-process run or every N-process run
    was skipped or failed is not."""
    key = "samples_per_s" if only_many else "scaling_efficiency"
    return any(key in r for r in runs_of_round)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--work", default="/tmp/sb2-ddp-bench")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", nargs="+", default=["default"], metavar="SPEC",
                    help='N-process variants, e.g. default "bucket=100,view" "bucket=100,view,bf16"')
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole script ends by then: a variant predicted to end later is skipped")
    ap.add_argument("--baseline", default=None,
                    help="a train_ddp.json of an earlier call on the same card: its 1-process run is the baseline")
    ap.add_argument("--only-many", action="store_true", help="skip the 1-process baseline (smoke tests only)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat [1 process, each variant] this many times; each variant's efficiency is against the "
                         "1-process run of its own round, and the JSON holds every round's and their median")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.rounds > 1 and (args.baseline or args.only_many):
        ap.error("--rounds measures a 1-process run in every round: not with --baseline or --only-many")
    t_start = time.perf_counter()
    variants = [(spec, variant_overrides(spec)) for spec in args.variants]
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
    print(f"{card}; batch {args.batch} per process, {args.steps} steps a run; models ready after "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)

    def left() -> float | None:
        return None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_start)

    baselines, runs, done = [], [], [0]

    def report() -> None:
        if not os.environ.get("OUT"):
            return
        by_round: dict[str, dict[str, float]] = {}
        for r in runs:
            if "scaling_efficiency" in r:
                by_round.setdefault(r["variant"], {})[str(r["round"])] = r["scaling_efficiency"]
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "train_ddp.json").write_text(json.dumps(
            {"card": card, "rounds": args.rounds, "rounds_done": done[0], "runs": baselines + runs,
             "scaling_efficiency": {v: statistics.median(e.values()) for v, e in by_round.items()},
             "scaling_efficiency_by_round": by_round}, indent=2))

    estimate = None  # the last run's wall time: what the next one is predicted to take

    def fits(what: str) -> bool:
        remaining = left()
        if remaining is not None and (remaining <= 0 or (estimate is not None and 1.3 * estimate > remaining)):
            need = f", predicted {1.3 * estimate:.0f} s" if estimate is not None else ""
            print(f"{what}: skipped, {max(remaining, 0):.0f} s of --budget-s left{need}", flush=True)
            return False
        return True

    for rnd in range(args.rounds):
        tag = f" (round {rnd + 1} of {args.rounds})" if args.rounds > 1 else ""
        baseline, mine, stop = None, [], False
        # 1 process first in even rounds, last in odd ones (1, N, N, 1, ...): a drift of the machine within a pair
        # of rounds falls on both sides alike
        for part in ("one", "many") if rnd % 2 == 0 else ("many", "one"):
            if part == "one":
                if args.baseline:
                    baseline = next(r for r in json.loads(Path(args.baseline).read_text())["runs"]
                                    if r["processes"] == 1)
                    baseline = {**baseline, "from": args.baseline}
                    baselines.append(baseline)
                    print(f"1 process: {baseline['samples_per_s']:.1f} samples/s, from {args.baseline} (same card?)")
                elif not args.only_many:
                    if not fits(f"1 process{tag}"):
                        baselines.append({"processes": 1, "skipped": "budget", "round": rnd})
                        report()
                        stop = True
                        continue
                    out = work / f"run-1-{rnd}"
                    subprocess.run(["rm", "-rf", str(out)], check=False)
                    one = {**run(1, args, teacher, student, prompts, out, [], left()), "round": rnd}
                    baselines.append(one)
                    if "error" in one:
                        if rnd == 0:
                            raise SystemExit(f"1 process{tag}: sb2 train failed ({one['error']})")
                        print(f"1 process{tag}: failed ({one['error']}); this round has no efficiency", flush=True)
                        stop = True
                        continue
                    baseline, estimate = one, one["wall_s"]
                    print(f"1 process{tag}: {one['samples_per_s']:.1f} samples/s (windows "
                          f"{[round(x, 1) for x in one['windows']]}), wall {one['wall_s']:.0f} s", flush=True)
                    report()
                continue
            for spec, sets in variants:
                if not fits(f"{args.gpus} processes [{spec}]{tag}"):
                    runs.append({"variant": spec, "processes": args.gpus, "overrides": sets, "skipped": "budget",
                                 "round": rnd})
                    report()
                    continue
                out = work / f"run-{args.gpus}-{len(runs)}"
                subprocess.run(["rm", "-rf", str(out)], check=False)
                r = {"variant": spec, **run(args.gpus, args, teacher, student, prompts, out, sets, left()),
                     "round": rnd}
                estimate = r["wall_s"] if "error" not in r else estimate
                if "error" in r:
                    print(f"{args.gpus} processes [{spec}]{tag}: failed ({r['error']}); going on with the next "
                          "variant", flush=True)
                else:
                    print(f"{args.gpus} processes [{spec}]{tag}: {r['samples_per_s']:.1f} samples/s (windows "
                          f"{[round(x, 1) for x in r['windows']]}), wall {r['wall_s']:.0f} s", flush=True)
                runs.append(r)
                mine.append(r)
                report()
        if baseline:  # against the 1-process run of the same round
            for r in mine:
                if "samples_per_s" in r:
                    r["scaling_efficiency"] = r["samples_per_s"] / (args.gpus * baseline["samples_per_s"])
        if round_done(mine, args.only_many):
            done[0] = rnd + 1
        report()
        if stop:
            break

    print(f"\ncard: {card}; batch {args.batch} per process, full scheme, eager, bf16 on GPUs; total "
          f"{time.perf_counter() - t_start:.0f} s")
    for b in baselines:
        print(f"1 process{'' if args.rounds == 1 else ', round ' + str(b.get('round', 0) + 1)}: "
              + (f"{b['samples_per_s']:.1f} samples/s" if "samples_per_s" in b else
                 "skipped (budget)" if "skipped" in b else f"failed: {b.get('error')}"))
    print(f"| variant ({args.gpus} processes) | overrides | samples/s | scaling efficiency | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for r in runs:
        what = (f"{r['samples_per_s']:.1f} | {r['scaling_efficiency']:.3f}" if "scaling_efficiency" in r else
                f"{r['samples_per_s']:.1f} | –" if "samples_per_s" in r else
                f"{'skipped (budget)' if 'skipped' in r else 'failed: ' + r['error']} | –")
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "–"
        name = r["variant"] + (f" (round {r['round'] + 1})" if args.rounds > 1 else "")
        print(f"| {name} | {' '.join(r['overrides']) or '(defaults)'} | {what} | {wall} |")


if __name__ == "__main__":
    main()
