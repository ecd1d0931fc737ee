"""Does `sb2 train` give the same student with ``train.cuda_graphs``? Trains each scheme twice through
the real loop (``sb2.train.loop.train``), from the same seed: eager (no compile: the reference, and no
minutes of compilation) and torch.compile per block with CUDA graphs; compares the saved students (one
relative error over all their tensors: on a GPU compiled kernels differ from eager ones at the bf16 level,
so expect ~1e-2, not equality; for the full scheme also the error of the two students' updates from their common
init, ``rel_err_of_update``, which the weights' own error understates at lr 1e-6), the final losses and the loop's own
throughput. ``--with-compiled`` adds
compile without graphs (a third run) and compares graphs against it: what the graphs alone change.
``--noise-floor`` adds a second eager run that differs from the first only in its kernels' order of summation (cuDNN
autotuning on, bf16 GEMMs' reduced-precision reduction flipped): two equally valid eager students, whose difference is
what rounding alone, carried through the steps, gives — the scale against which the compiled run's error is read.
(On an H200 the mini-world's eager student came out bit-identical with the two flags: no floor there.)
``--perturb-floor`` adds an eager run from the student's init with each weight w moved to w + w·2⁻²⁴·z, z ~ N(0, 1)
(``--perturb-seed``): about one fp32 rounding of each weight (a weight moves by one ulp where |z| is above 0.5–1,
else not at all). The bf16 matmuls and convolutions of autocast see it only where a weight sits at a bf16 rounding
boundary, there as one bf16 step; fp32 operations (norms, the optimizer) see it as it is. Its distance from the eager
run is how far the training carries that: a noise floor that does not depend on the library choosing other
kernels. One draw is one sample of that floor. (Its update is taken from the eager run's unperturbed init; the
init's own change, ~6e-8 of the weights, is ~3e-4 of a 30-step update at lr 1e-6.)

    python bench/cuda_graphs_check.py --schemes full        # GPU: mini-world profile, 30 steps x 64
                                                            # (the graphs run compiles for minutes: one scheme a call)
    python bench/cuda_graphs_check.py --schemes full --noise-floor   # + the eager-vs-eager floor (seconds more)
    python bench/cuda_graphs_check.py --schemes full --perturb-floor --eager-only  # the perturbed floor alone
    python bench/cuda_graphs_check.py --steps 2 --batch 2   # CPU smoke run (no compile or graphs)

Writes $OUT/cuda_graphs_check.json (or ./). A check, not a timing benchmark: the throughput is the
loop's own (windows of ``train.log_every`` steps after the first), from one run each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sb2.config import load_config  # noqa: E402
from sb2.train.loop import train  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from train_step import release_cuda_graphs  # noqa: E402  (the benchmark's reset, shared)


RUNS = (("eager", False, False), ("compiled", True, False), ("graphs", True, True))  # name, compile, cuda_graphs
NOISE_FLOOR = ("eager_reordered", False, False)
PERTURBED = ("eager_perturbed", False, False)
PERTURB_REL = 2.0**-24  # one fp32 rounding, relatively


def runs_of(with_compiled: bool, noise_floor: bool, perturb_floor: bool = False, eager_only: bool = False
            ) -> list[tuple[str, bool, bool]]:
    """The runs of one scheme, in order: eager, [eager reordered], [eager perturbed], [compiled], [graphs]."""
    return [RUNS[0], *([NOISE_FLOOR] if noise_floor else []), *([PERTURBED] if perturb_floor else []),
            *([RUNS[1]] if with_compiled and not eager_only else []), *([RUNS[2]] if not eager_only else [])]


def pairs_of(names) -> list[tuple[str, str]]:
    """The comparisons made of the runs present against eager (graphs, the floors, compiled), and graphs against
    compiled (what the graphs alone change)."""
    out = [("graphs", "eager")] if "graphs" in names else []
    for floor in (NOISE_FLOOR[0], PERTURBED[0]):
        if floor in names:
            out.append((floor, "eager"))
    if "compiled" in names:
        out += [("compiled", "eager")] + ([("graphs", "compiled")] if "graphs" in names else [])
    return out


def perturbed_student(cfg, folder: Path, rel: float = PERTURB_REL, seed: int = 1) -> str:
    """The student's init (``models.student``) with every floating weight w moved to w + w·rel·z, z ~ N(0, 1) of
    ``seed``, saved in fp32 to ``folder`` (a path ``models.student=`` takes); returns the folder."""
    from sb2.models.loading import load_unet

    unet = load_unet(cfg.models.student, cfg.models, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():  # w + w·rel·z, not w·(1 + rel·z): 1 + rel·z would round to steps of 2⁻²³
            p.add_(p * (rel * torch.randn(p.shape, generator=gen)))
    unet.save_pretrained(folder)
    return str(folder)


class reordered:
    """The eager run's kernels with another order of summation: cuDNN autotuning on (other convolution algorithms)
    and the bf16 GEMMs' reduced-precision reduction flipped (other split-K reductions). Both flags are restored."""

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.saved = (torch.backends.cudnn.benchmark, m.allow_bf16_reduced_precision_reduction)
        torch.backends.cudnn.benchmark = True
        m.allow_bf16_reduced_precision_reduction = not self.saved[1]
        return self

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self.saved
        return False


def student_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the saved student (the full UNet or the LoRA adapter), keyed by file and name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(path)}:{k}"] = v.float()
    if not out:
        raise FileNotFoundError(f"no .safetensors under {path}")
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor] | None = None
            ) -> dict:
    """Relative error of student ``a`` against ``b`` over all tensors; with ``init`` (the full scheme's starting
    UNet, keyed by parameter name) also of their updates ``a − init`` against ``b − init``: at lr 1e-6 the weights
    move little in 30 steps, so the first figure is small by construction and the second is the real check."""
    if a.keys() != b.keys():
        raise ValueError(f"the two students differ in their tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    out = {"tensors": len(a), "identical": all(torch.equal(a[k], b[k]) for k in a),
           "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
           "rel_err": (num / den) ** 0.5 if den else 0.0}
    if init is not None:
        missing = [k for k in a if k.split(":", 1)[1] not in init]
        if missing:
            raise ValueError(f"the init has no tensor for {missing[:5]}")
        upd = sum(float((b[k] - init[k.split(":", 1)[1]]).pow(2).sum()) for k in b)
        out["update_norm_rel"] = (upd / den) ** 0.5 if den else 0.0  # how far b moved from the init, relatively
        out["rel_err_of_update"] = (num / upd) ** 0.5 if upd else (0.0 if num == 0 else float("inf"))
    return out


def init_tensors(cfg) -> dict[str, torch.Tensor]:
    """The full scheme's starting student (``models.student``) by parameter name, fp32 on the CPU."""
    from sb2.models.loading import load_unet

    unet = load_unet(cfg.models.student, cfg.models, dtype=torch.float32)
    return {k: v.float() for k, v in unet.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="miniworld")
    ap.add_argument("--schemes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr-full", type=float, default=1e-6)  # the mini-world bench's rates
    ap.add_argument("--lr-lora", type=float, default=3e-4)
    ap.add_argument("--work", default="/tmp/sb2-cuda-graphs-check")
    ap.add_argument("--with-compiled", action="store_true", help="also compile without graphs (minutes more)")
    ap.add_argument("--noise-floor", action="store_true",
                    help="also a second eager run with another order of summation (seconds more)")
    ap.add_argument("--perturb-floor", action="store_true",
                    help="also an eager run from the init with each weight moved by 2^-24 of itself times N(0, 1) "
                         "(seconds more)")
    ap.add_argument("--perturb-seed", type=int, default=1, help="the perturbation's draw (several: one call each)")
    ap.add_argument("--eager-only", action="store_true", help="leave out the compiled and graphs runs")
    args = ap.parse_args()
    if args.eager_only and args.with_compiled:
        ap.error("--eager-only leaves out the compiled runs: not with --with-compiled")
    out = Path(os.environ.get("OUT", "."))
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    record = {"card": card, "torch": torch.__version__, "args": vars(args), "runs": [], "comparisons": {}}
    for scheme in args.schemes:
        students = {}
        for name, compiled, graphs in runs_of(args.with_compiled, args.noise_floor, args.perturb_floor,
                                              args.eager_only):
            overrides = [
                f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                f"train.log_every={max(1, args.steps // 3)}",
                f"optim.student_lr={args.lr_full if scheme == 'full' else args.lr_lora}",
                "train.seed=0", f"train.compile={str(compiled).lower()}", f"train.cuda_graphs={str(graphs).lower()}",
                "tracking.enabled=false", "tracking.image_every=0",
                f"checkpoint.every={max(1, args.steps // 2)}", "checkpoint.resume=false"]
            cfg = load_config(args.profile, overrides)
            if name == "eager":
                reference_cfg = cfg  # its models.student is the init every update is measured from
            if name == PERTURBED[0]:  # the same run's student, perturbed, in its place
                folder = perturbed_student(cfg, Path(args.work) / f"{scheme}_perturbed_init", seed=args.perturb_seed)
                cfg = load_config(args.profile, overrides + [f"models.student={folder}"])
            run_dir = Path(args.work) / f"{scheme}_{name}"
            t0 = time.perf_counter()
            with reordered() if name == NOISE_FLOOR[0] else contextlib.nullcontext():
                path = train(cfg, scheme, run_dir, progress=False)
            seconds = time.perf_counter() - t0
            final = json.loads((run_dir / "train.json").read_text())["final"]
            students[name] = student_tensors(path)
            run = {"scheme": scheme, "run": name, "compile": compiled, "cuda_graphs": graphs,
                   "seconds": round(seconds, 1), "final": final}
            if name == NOISE_FLOOR[0]:
                run["kernels"] = "cudnn.benchmark on, bf16 reduced-precision reduction flipped"
            if name == PERTURBED[0]:
                run["init"] = (f"every student weight w + w·{PERTURB_REL:.3g}·z, z ~ N(0, 1) of seed "
                               f"{args.perturb_seed} ({cfg.models.student})")
            if torch.cuda.is_available():
                run["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            record["runs"].append(run)
            print(f"{scheme:<4} {name:<8} {seconds:6.1f} s  "
                  + "  ".join(f"{k}={v:.4g}" for k, v in final.items()), flush=True)
            if torch.cuda.is_available():  # the next run's peak without this one's compiled graphs and pools
                release_cuda_graphs()
                torch.cuda.reset_peak_memory_stats()
            (out / "cuda_graphs_check.json").write_text(json.dumps(record, indent=1))  # each run as it ends
        pairs = pairs_of(students)
        # the eager run's (unperturbed) init; the LoRA adapter's init is not saved: none
        init = init_tensors(reference_cfg) if scheme == "full" else None
        record["comparisons"][scheme] = {f"{a} vs {b}": compare(students[a], students[b], init) for a, b in pairs}
        if init is not None:
            record.setdefault("updates_from", {})[scheme] = reference_cfg.models.student
        print(f"{scheme:<4} students compared: {record['comparisons'][scheme]}", flush=True)
        (out / "cuda_graphs_check.json").write_text(json.dumps(record, indent=1))
    print(f"card: {card}, torch {torch.__version__}", flush=True)


if __name__ == "__main__":
    main()
