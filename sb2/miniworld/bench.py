"""`sb2 miniworld bench` and `sb2 miniworld demo`: the paper's tables in miniature, in the committed mini-world.

Every student is trained by the library's own :func:`sb2.train.loop.train` on the ``miniworld`` profile plus the
overrides of its row (no training code here), merged by :func:`sb2.merge.merge_weights`, and scored by the evaluation
stage's own code with the mini-world judges: FID, precision, recall, CLIP score, and alignment accuracy from the
attribute judge, on the evaluation captions, mean ± std over evaluation (noise) seeds. The branches A and B and
their merges are trained once per training seed (``Plan.train_seeds``; a student's FID moves far more with its training
seed than with the noise seeds it is scored on): their rows are mean ± std over the training seeds of each seed's mean
over the noise seeds. Every other student is trained once (training seed 0).

Rows (``ROWS``), grouped as the paper's tables: the teacher at 25 DDIM steps with cfg 2, 4.5, 7.5 (Table 1); the
Turbo analog, SwiftBrush from the teacher, SwiftBrush from the Turbo analog (Table 2); branch A (full, VSD) and
branch B (LoRA) with no, naive, clamped, and clamped + scheduled CLIP loss (Tables 5, 6); A+B merged at λ = 0.5 (the
paper's choice), at the λ of best FID in the sweep, and both branches with real-image regularization (Figs. 3, 7).
Rows run in an order that finishes the target's rows first, and the table is rewritten after each, so a run cut by
a time limit still leaves one (``--budget-s`` skips what would start past it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sb2.miniworld import world

SWEEP = tuple(round(0.1 * i, 1) for i in range(11))

# name → (group, scheme, config overrides); the B rows differ only in clip_loss (paper Table 6).
STUDENTS: dict[str, tuple[str, str, list[str]]] = {
    "A": ("full", "full", []),
    "B": ("lora", "lora", []),  # clamped + linear schedule to 0: the config's default CLIP loss
    "sb_teacher_init": ("full", "full", ["models.student={teacher}/unet"]),
    "B_no_clip": ("lora", "lora", ["clip_loss.enabled=false"]),
    "B_naive": ("lora", "lora", ["clip_loss.clamp=false", "clip_loss.schedule=constant"]),
    "B_clamped": ("lora", "lora", ["clip_loss.schedule=constant"]),
    "A_reg": ("full", "full", ["regularization.enabled=true", "regularization.source={reg}"]),
    "B_reg": ("lora", "lora", ["regularization.enabled=true", "regularization.source={reg}"]),
}

# Students trained once per training seed (``Plan.train_seeds``): the target's branches. Student "A" is training
# seed 0; "A@1" the same row's student at train.seed=1.
SEEDED = ("A", "B")


def spec_of(name: str) -> tuple[str, list[str]]:
    """(scheme, overrides) of student ``name``: ``STUDENTS[name]``, or for ``"A@1"`` A's with ``train.seed=1``."""
    base, _, seed = name.partition("@")
    _, scheme, overrides = STUDENTS[base]
    return scheme, list(overrides) + ([f"train.seed={int(seed)}"] if seed else [])


def seeded(what: str, seed: int) -> str:
    """A row's ``what`` for training seed ``seed``: its students of ``SEEDED`` renamed ("student:A" → "student:A@1")."""
    if seed == 0:
        return what
    return ":".join(f"{part}@{seed}" if part in SEEDED else part for part in what.split(":"))


def train_seeded(what: str, train_seeds: tuple[int, ...]) -> bool:
    """Whether a row is scored per training seed: there are several, and every student it needs is one of
    ``SEEDED``."""
    if len(train_seeds) < 2 or what == "sweep":
        return False
    need = students_of(what)  # with one seed: no recursion back here
    return bool(need) and all(n in SEEDED for n in need)


# Table rows: (table, label, what is scored). Labels are the keys of results.json's "rows".
ROWS: list[tuple[str, str, str]] = [
    ("Table 1: the teacher (multi-step, DDIM)", "teacher, cfg 2", "teacher:2.0"),
    ("Table 1: the teacher (multi-step, DDIM)", "teacher, cfg 4.5", "teacher:4.5"),
    ("Table 1: the teacher (multi-step, DDIM)", "teacher, cfg 7.5", "teacher:7.5"),
    ("Table 2: initialization", "Turbo analog (1 step)", "turbo"),
    ("Table 2: initialization", "SwiftBrush (VSD, teacher init)", "student:sb_teacher_init"),
    ("Table 2: initialization", "SwiftBrush (VSD, Turbo init) = A", "student:A"),
    ("Tables 5, 6: the two branches", "A: full, VSD", "student:A"),
    ("Tables 5, 6: the two branches", "B: LoRA, no CLIP loss", "student:B_no_clip"),
    ("Tables 5, 6: the two branches", "B: LoRA, naive CLIP loss", "student:B_naive"),
    ("Tables 5, 6: the two branches", "B: LoRA, clamped CLIP loss", "student:B_clamped"),
    ("Tables 5, 6: the two branches", "B: LoRA, clamped + schedule (B)", "student:B"),
    ("Merged (eq. 6, Figs. 3, 7)", "merged A+B, λ = 0.5", "merge:A:B:0.5"),
    ("Merged (eq. 6, Figs. 3, 7)", "merged A+B, λ* (best sweep FID)", "merge:A:B:best"),
    ("Merged (eq. 6, Figs. 3, 7)", "merged A+B with regularization, λ = 0.5", "merge:A_reg:B_reg:0.5"),
]
DEMO_ROWS = ["teacher, cfg 4.5", "Turbo analog (1 step)", "A: full, VSD", "B: LoRA, clamped + schedule (B)",
             "merged A+B, λ = 0.5"]
# The order of work: the target's rows first, then the sweep, then the ablations.
ORDER = ["teacher, cfg 4.5", "teacher, cfg 2", "teacher, cfg 7.5", "Turbo analog (1 step)", "A: full, VSD",
         "B: LoRA, clamped + schedule (B)", "merged A+B, λ = 0.5", "sweep", "merged A+B, λ* (best sweep FID)",
         "SwiftBrush (VSD, teacher init)", "SwiftBrush (VSD, Turbo init) = A", "B: LoRA, no CLIP loss", "B: LoRA, naive CLIP loss",
         "B: LoRA, clamped CLIP loss", "merged A+B with regularization, λ = 0.5"]


@dataclass
class Plan:
    """Sizes of one bench run; ``full()`` for a GPU, ``quick()`` for tests, ``demo()`` for `make demo` on CPU."""

    num_captions: int = 2048
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_steps: int = 25
    # 500, not 1,000: training seed 1's A student got worse from step 250 on (FID 1,269 / 1,490 / 1,965 / 2,256 at
    # 250 / 500 / 750 / 1,000 steps) and the whole table at 500 steps has a lower, far steadier mean over training
    # seeds (merged λ = 0.5: 1,466 ± 91 against 1,676 ± 478; results/miniworld/TUNING.md, fifth round)
    train_steps: int = 500
    batch_size: int = 64
    lambdas: tuple[float, ...] = SWEEP
    sweep_seeds: int = 3  # the first this many of ``seeds`` score each λ of the sweep
    # The captions the λ sweep is scored on, and λ* picked on: "validation" = the next ``num_captions`` scenes of the
    # evaluation split (same templates and held-out combinations, other scenes), so the λ* row, scored on the
    # evaluation captions, is not picked on the captions that score it; "eval" = the evaluation captions themselves.
    sweep_split: Literal["validation", "eval"] = "validation"
    # training seeds of the students of SEEDED (A, B) and of their rows (the sweep and samples use seed 0's)
    train_seeds: tuple[int, ...] = (0, 1, 2)
    # Checkpoint selection on the validation captions: every student is also saved at these steps, each candidate
    # (and the last step) is scored there (FID, the first noise seed) and the best is the student its rows use —
    # early stopping on held-out captions, not on the evaluation captions that score the rows. Empty: the last step.
    select_steps: tuple[int, ...] = ()
    reg_pairs: int = 4000  # real training-split pairs rendered for the regularization (share 5% of the steps)
    grid_captions: int = 8
    rows: list[str] = field(default_factory=lambda: [label for _, label, _ in ROWS])
    sweep: bool = True
    budget_s: float | None = None  # no new row starts past this many seconds
    # optim.student_lr of the full-scheme and of the LoRA-scheme students (null: the profile's): all weights of a
    # small UNet move far faster than a LoRA, so the two branches want different rates (measured: README, benchmark;
    # full VSD collapsed at the profile's 1e-5 and worked at the paper's 1e-6)
    full_lr: float | None = 1e-6
    lora_lr: float | None = 3e-4  # 1,441 against 2,728 at 1e-4 (800 steps, seed 0; results/miniworld/TUNING.md)
    name: str = "bench"
    # Students trained side by side in this many processes (spawned, one CUDA context each) while the main process
    # scores the teacher and the Turbo analog; 1 trains each when a row first needs it, in the main process.
    workers: int = 1

    @classmethod
    def quick(cls) -> Plan:
        return cls(num_captions=16, seeds=(0, 1), teacher_steps=1, train_steps=1, batch_size=2,
                   lambdas=(0.0, 0.5, 1.0), sweep_seeds=1, reg_pairs=8, grid_captions=4, train_seeds=(0, 1),
                   name="quick")

    @classmethod
    def demo(cls) -> Plan:
        return cls(num_captions=192, seeds=(0,), teacher_steps=25, train_steps=30, batch_size=16, sweep=False,
                   rows=list(DEMO_ROWS), grid_captions=8, full_lr=1e-6, lora_lr=None, train_seeds=(0,), name="demo")


@dataclass
class MultiStepGenerator:
    """The teacher behind the one-step generator's interface (``encode``, ``noise``, ``latents``, ``decoder``), so
    the evaluation streams its images exactly as a student's: DDIM with classifier-free guidance."""

    base: object  # a OneStepGenerator loaded from the teacher pipeline (its UNet, text encoder, VAE)
    steps: int
    guidance: float

    def __getattr__(self, name):
        return getattr(self.base, name)

    @torch.no_grad()
    def latents(self, text_emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        from sb2.miniworld.teacher import sample

        uncond = self.base.encode([""])
        return sample(self.base.unet, text_emb.float(), uncond.float(), z.float(), self.steps, self.guidance)


class _Collector:
    """An ``ImageWriter`` stand-in that keeps the generated uint8 images (for the alignment judge)."""

    def __init__(self):
        self.images: list[torch.Tensor] = []

    def write(self, start, captions, images):
        self.images.append(images.cpu())


def write_regularization_folder(out: Path, n: int, seed: int = 0) -> Path:
    """``n`` real training-split pairs as ``000000.png`` + ``000000.txt``: the regularization source."""
    from PIL import Image

    from sb2.atomic import atomic_dir

    images, captions, _ = world.make_pairs(seed, "train", n)
    with atomic_dir(out) as tmp:  # a folder that exists is complete
        for i, (im, c) in enumerate(zip(images, captions)):
            Image.fromarray(im).save(tmp / f"{i:06d}.png")
            (tmp / f"{i:06d}.txt").write_text(c)
    return out


def fill_placeholders(override: str, **values) -> str:
    """``{teacher}`` and ``{reg}`` of a row's override replaced by their paths; every other brace kept, so that an
    override may carry a YAML mapping (``optim.student_lr_scale={attn2: 10}``)."""
    for key, value in values.items():
        override = override.replace("{" + key + "}", str(value))
    left = re.findall(r"\{[A-Za-z_]\w*\}", override)
    if left:  # a misspelt placeholder would otherwise reach the config as text
        raise ValueError(f"override {override!r}: unknown placeholder(s) {left}; known: "
                         + ", ".join("{" + k + "}" for k in values))
    return override


def train_student(name: str, plan: Plan, root: Path, work: Path, base_overrides: list[str],
                  spec: tuple[str, list[str]] | None = None) -> tuple[Path, dict]:
    """Train student ``name`` (the library's train() on the ``miniworld`` profile + the plan's sizes + the row's own
    overrides, which win) into ``work/students/<name>``; returns its folder and what it trained with. ``spec`` is
    (scheme, overrides), by default ``spec_of(name)`` — passed explicitly to worker processes, which import this
    module afresh."""
    from sb2.config import load_config
    from sb2.train.loop import train

    scheme, extra = spec if spec is not None else spec_of(name)
    reg = work / f"regularization_{plan.reg_pairs}"
    if _needs_regularization(extra) and not reg.is_dir():
        write_regularization_folder(reg, plan.reg_pairs)
    extra = [fill_placeholders(o, teacher=root / "teacher", reg=reg) for o in extra]
    candidates = candidate_steps(plan)
    every = math.gcd(*candidates)
    overrides = base_overrides + [
        f"train.steps={plan.train_steps}", f"train.batch_size={plan.batch_size}", "tracking.enabled=false",
        "tracking.image_every=0", f"checkpoint.every={every}", f"checkpoint.keep_last={plan.train_steps // every}",
        "checkpoint.resume=false"]
    lr = plan.full_lr if scheme == "full" else plan.lora_lr
    if lr is not None:
        overrides.append(f"optim.student_lr={lr}")
    overrides += extra  # last: a row's own settings win over the plan's
    cfg = load_config("miniworld", overrides)
    run_dir = work / "students" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t = time.perf_counter()
    path = train(cfg, scheme, run_dir, progress=False)
    seconds = time.perf_counter() - t
    final = json.loads((run_dir / "train.json").read_text()).get("final", {})
    selection = {}
    if len(candidates) > 1:  # the earlier candidates' students, saved as the final one is (the last is the run's)
        from sb2.train.student_export import student_from_checkpoint

        found, missing = {}, []
        for k in candidates[:-1]:
            try:
                student_from_checkpoint(run_dir, run_dir / f"student_at_{k}", step=k)
                found[str(k)] = str(run_dir / f"student_at_{k}")  # as the run's own path is written (not resolved)
            except FileNotFoundError:  # no checkpoint at a step the loop skipped as non-finite
                missing.append(k)
        selection = {"candidates": found | {str(plan.train_steps): str(path)},
                     **({"missing_candidates": missing} if missing else {})}
    return path, {"scheme": scheme, "overrides": extra, "steps": plan.train_steps, "student_lr": cfg.optim.student_lr,
                  "vsd_guidance": cfg.vsd.guidance_scale,
                  "clip_tau": cfg.clip_loss.tau if scheme == "lora" and cfg.clip_loss.enabled else None,
                  "batch_size": plan.batch_size, "seconds": round(seconds, 1),
                  "final": {k: v for k, v in final.items() if k.startswith(("loss/", "throughput"))}, **selection}


def candidate_steps(plan: Plan) -> list[int]:
    """The steps whose students checkpoint selection compares (``Plan.select_steps`` and the last), in order."""
    bad = [k for k in plan.select_steps if not 0 < k <= plan.train_steps]
    if bad:
        raise ValueError(f"select_steps {bad}: each must lie in 1 … train_steps ({plan.train_steps})")
    steps = sorted({*plan.select_steps, plan.train_steps})
    every = math.gcd(*steps)  # the loop checkpoints every this many steps and keeps them all
    if plan.train_steps // every > MAX_SELECT_CHECKPOINTS:
        raise ValueError(f"select_steps {list(plan.select_steps)} with {plan.train_steps} steps: a checkpoint every "
                         f"{every} steps, {plan.train_steps // every} a student (at most {MAX_SELECT_CHECKPOINTS}); "
                         "pick steps with a larger common divisor with the step count")
    return steps


MAX_SELECT_CHECKPOINTS = 20


def _needs_regularization(overrides: list[str]) -> bool:
    return any("{reg}" in o for o in overrides)


def students_of(what: str, train_seeds: tuple[int, ...] = (0,)) -> list[str]:
    """The students a row's ``what`` (or "sweep") needs trained; with ``train_seeds``, those of each seed for a row
    scored per training seed."""
    if train_seeded(what, train_seeds):
        return [n for s in train_seeds for n in students_of(seeded(what, s))]
    kind, *args = what.split(":")
    if what == "sweep":
        return ["A", "B"]
    if kind == "student":
        return [args[0]]
    if kind == "merge":
        return args[:2]
    return []


def _train_student_worker(name: str, plan: Plan, root: Path, work: Path, base_overrides: list[str],
                          spec: tuple[str, list[str]], threads: int) -> tuple[Path, dict]:
    if threads:
        torch.set_num_threads(threads)
    path, info = train_student(name, plan, root, work, base_overrides, spec)
    return path, {**info, "worker": True}


class Bench:
    """The state of one run: judges, reference, trained students, scores; ``record()`` is results.json."""

    def __init__(self, out: Path, work: Path, plan: Plan, device: str, root: Path):
        import os

        from sb2.config import load_config
        from sb2.evaluation.evaluate import load_judges
        from sb2.evaluation.reference import reference_for
        from sb2.miniworld.captions import write_reference_images
        from sb2.miniworld.judges import load_judge

        self.out, self.work, self.plan, self.device, self.root = out, work, plan, device, root
        self.t0 = time.perf_counter()
        n = plan.num_captions
        ref_images = work / f"reference_{n}"
        if not ref_images.is_dir():
            write_reference_images(ref_images, num_eval=n)
        models = [f"models.{k}={root / v}" for k, v in (("teacher", "teacher"), ("student", "turbo"),
                                                         ("tiny_vae", "tiny_vae"), ("clip", "clip"))]
        self.base_overrides = models + [f"train.prompts={root / 'prompts.txt'}"]
        self.cfg = load_config("miniworld", self.base_overrides + [
            f"evaluate.num_captions={n}", f"evaluate.reference_images={ref_images}",
            f"evaluate.reference_dir={work / f'reference_features_{n}'}", "evaluate.dtype=float32",
            f"evaluate.clip_score.model={root / 'judges' / 'clip'}", "evaluate.batch_size=256"])
        os.environ["SB2_MINIWORLD"] = str(root)  # where the feature judge (kind: module) loads from
        self.judges = load_judges(self.cfg.evaluate, device, metrics=["fid", "precision_recall", "clip_score"])
        self.reference = reference_for(self.cfg.evaluate, self.judges, device, ["fid", "precision_recall"])
        self.attributes = load_judge(root / "judges" / "attributes").to(device)
        self.scenes = world.sample_scenes(0, "eval", n)
        self.captions = world.captions(self.scenes)
        self._validation = None  # (scenes, captions, reference) of the sweep's validation captions, when first needed
        self.students: dict[str, Path] = {}
        self.pending: dict = {}  # student name → Future of its worker (Plan.workers > 1)
        self.pool = None  # a ProcessPoolExecutor while workers train
        self.rows: dict[str, dict] = {}
        self.train_info: dict[str, dict] = {}
        self.sweep: list[dict] = []
        self.skipped: list[str] = []
        self.failed: dict[str, str] = {}
        self.failed_students: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.setup_s = time.perf_counter() - self.t0

    # --- models -----------------------------------------------------------------------------------------------
    def student(self, name: str) -> Path:
        """Train the student of ``STUDENTS[name]`` once (the library's train(), the profile + the row's overrides), or
        wait for the worker process training it (``Plan.workers``)."""
        if name in self.students:
            return self.students[name]
        if name in self.failed_students:
            raise RuntimeError(f"student {name} failed to train: {self.failed_students[name]}")
        try:
            if name in self.pending:
                # a worker that dies (out of memory, a crash) breaks the pool: its students fail, nothing hangs
                path, info = self.pending.pop(name).result()
            else:
                path, info = train_student(name, self.plan, self.root, self.work, self.base_overrides)
            where = "in a worker process " if info.get("worker") else ""
            print(f"[{self.elapsed():6.0f} s] trained {name} ({info['scheme']}, {info['steps']} steps × "
                  f"{info['batch_size']}) {where}in {info['seconds']:.1f} s", flush=True)
            if len(info.get("candidates", {})) > 1:
                path = self.select(name, info)
        except Exception as e:  # a failed selection fails the student too: not retrained by the next row
            self.failed_students[name] = f"{type(e).__name__}: {e}"
            raise
        self.students[name], self.train_info[name] = Path(path), info
        return self.students[name]

    def select(self, name: str, info: dict) -> Path:
        """Checkpoint selection: each candidate step's student scored on the validation captions (FID, the first
        noise seed); the lowest is kept, and what was compared is recorded in ``info["selection"]``."""
        from sb2.generation.generator import OneStepGenerator

        fids = {}
        for step, path in info["candidates"].items():
            gen = OneStepGenerator.load(path, self.cfg, device=self.device)
            fids[step] = self.score(gen, self.plan.seeds[:1], "validation")["fid"]["mean"]
        best = min(fids, key=lambda k: (fids[k], -int(k)))  # a tie keeps the later step
        info["selection"] = {"validation_fid": fids, "step": int(best)}
        print(f"[{self.elapsed():6.0f} s] {name}: step {best} picked on the validation captions (FID "
              + ", ".join(f"{k}: {v:.4g}" for k, v in fids.items()) + ")", flush=True)
        return Path(info["candidates"][best])

    def start_workers(self, names: list[str]) -> None:
        """Train ``names`` in ``Plan.workers`` processes (spawned: each has its own CUDA context) while this process
        scores the rows that need no student. A tiny UNet's training loop is bound by the CPU's kernel launches, so
        on a GPU machine several students train side by side at almost the speed of one."""
        import multiprocessing as mp

        names = [n for n in dict.fromkeys(names) if n not in self.students]
        if not names:
            return
        if any(_needs_regularization(spec_of(n)[1]) for n in names):  # written once, here, not by two workers
            reg = self.work / f"regularization_{self.plan.reg_pairs}"
            if not reg.is_dir():
                write_regularization_folder(reg, self.plan.reg_pairs)
        threads = 0
        if torch.device(self.device).type == "cuda":  # one process a core or so: the loops are single-threaded
            import os

            threads = max(1, (os.cpu_count() or 1) // self.plan.workers)
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(min(self.plan.workers, len(names)), mp_context=mp.get_context("spawn"),
                                        max_tasks_per_child=1)
        for n in names:
            self.pending[n] = self.pool.submit(_train_student_worker, n, self.plan, self.root, self.work,
                                               self.base_overrides, spec_of(n), threads)

    def stop_workers(self) -> None:
        """Stop students still training (a row past the budget will not need them): SIGKILL, not SIGTERM, which
        train() would take for a preemption and answer with a checkpoint."""
        if self.pool is not None:
            procs = list((getattr(self.pool, "_processes", None) or {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            for proc in procs:
                proc.join(timeout=30)
            self.pool = None
        self.pending.clear()

    def generator(self, what: str):
        """A generator for a row's ``what``: teacher:<cfg>, turbo, student:<name>, merge:<a>:<b>:<λ>."""
        from sb2.generation.generator import OneStepGenerator

        kind, *args = what.split(":")
        if kind == "teacher":
            base = OneStepGenerator.from_pipeline(self.root / "teacher", device=self.device)
            return MultiStepGenerator(base, self.plan.teacher_steps, float(args[0]))
        if kind == "turbo":
            return OneStepGenerator.load(self.root / "turbo", self.cfg, device=self.device)
        if kind == "student":
            return OneStepGenerator.load(self.student(args[0]), self.cfg, device=self.device)
        a, b, lam = args
        lam = self.best_lambda() if lam == "best" else float(lam)
        gen = OneStepGenerator.load(self.student(a), self.cfg, device=self.device)
        gen.unet.load_state_dict(self.merged_state(a, b, lam))
        return gen

    def merged_state(self, a: str, b: str, lam: float) -> dict:
        from sb2.merge import merge_weights
        from sb2.models.loading import load_one_step_unet

        key = (a, b)
        if getattr(self, "_states", (None,))[0] != key:
            self._states = (key, load_one_step_unet(self.student(a), self.cfg.models).state_dict(),
                            load_one_step_unet(self.student(b), self.cfg.models).state_dict())
        return merge_weights(self._states[1], self._states[2], lam)

    def best_lambda(self) -> float:
        if not self.sweep:
            raise RuntimeError("λ* needs the sweep")
        return min(self.sweep, key=lambda r: r["fid"]["mean"])["lambda"]

    # --- scoring ----------------------------------------------------------------------------------------------
    def validation(self) -> tuple:
        """The validation captions (the evaluation split's scenes n … 2n − 1: disjoint from the evaluation
        captions' scenes 0 … n − 1), their scenes and the judges' reference features of their images."""
        if self._validation is None:
            from sb2.evaluation.reference import reference_for
            from sb2.miniworld.captions import write_reference_images

            n = self.plan.num_captions
            images = self.work / f"reference_val_{n}"
            if len(list(images.glob("*.png"))) != n:  # none yet, or a write cut short
                shutil.rmtree(images, ignore_errors=True)
                write_reference_images(images, num_eval=n, start=n)
            ecfg = self.cfg.evaluate.model_copy(update={"reference_images": str(images),
                                                        "reference_dir": str(self.work / f"reference_features_val_{n}")})
            scenes = world.sample_scenes(0, "eval", n, start=n)
            self._validation = (scenes, world.captions(scenes),
                                reference_for(ecfg, self.judges, self.device, ["fid", "precision_recall"]))
        return self._validation

    def score(self, gen, seeds, split: str = "eval") -> dict:
        """Scores over the noise ``seeds`` on the evaluation captions, or on the validation captions."""
        from sb2.evaluation.evaluate import protocol_metrics
        from sb2.evaluation.timing import PhaseTimer
        from sb2.miniworld.judges import alignment_breakdown

        if split not in ("eval", "validation"):
            raise ValueError(f"split is eval or validation, not {split!r}")
        scenes, captions, reference = (self.scenes, self.captions, self.reference) if split == "eval" \
            else self.validation()
        ecfg, runs = self.cfg.evaluate, []
        for s in seeds:
            ecfg.seed = 100_000 * s
            collector = _Collector()
            m = protocol_metrics(gen, captions, self.judges, reference, ecfg, PhaseTimer(self.device),
                                 collector, progress=False)
            # alignment, and the share with the right number of objects (which every statement presupposes: the
            # one-step models' largest loss, results/miniworld/TUNING.md)
            judged = alignment_breakdown(self.attributes, torch.cat(collector.images), scenes)
            m["alignment"], m["count"] = judged["alignment"], judged["count"]
            runs.append(m)
        return {k: {"mean": statistics.fmean(r[k] for r in runs),
                    "std": statistics.pstdev([r[k] for r in runs]) if len(runs) > 1 else 0.0,
                    "runs": [r[k] for r in runs]} for k in runs[0]}

    def score_train_seeds(self, what: str) -> dict:
        """Score a row's students of every training seed (each over the noise seeds): per metric, the mean and std
        over the training seeds of each one's mean; ``runs`` holds those per-seed means, ``noise_std`` the mean of
        their std over the noise seeds, ``per_train_seed`` each seed's full scores. A seed whose student failed is
        left out and named in ``failed_train_seeds``; the row fails only when every seed did."""
        per, failed = {}, {}
        for s in self.plan.train_seeds:
            try:
                per[s] = self.score(self.generator(seeded(what, s)), self.plan.seeds)
            except Exception as e:  # noqa: BLE001 — a seed whose student failed costs that seed, not the row
                traceback.print_exc()
                failed[str(s)] = f"{type(e).__name__}: {e}"
        if not per:
            raise RuntimeError(f"no training seed of {what} could be scored: {failed}")
        first = next(iter(per.values()))
        out = {k: {"mean": statistics.fmean(per[s][k]["mean"] for s in per),
                   "std": statistics.pstdev([per[s][k]["mean"] for s in per]),
                   "runs": [per[s][k]["mean"] for s in per],
                   "noise_std": statistics.fmean(per[s][k]["std"] for s in per)} for k in first}
        return {**out, "train_seeds": list(per), "per_train_seed": {str(s): per[s] for s in per},
                **({"failed_train_seeds": failed} if failed else {})}

    def run_row(self, label: str) -> None:
        what = {lab: w for _, lab, w in ROWS}[label]
        t = time.perf_counter()
        same = [lab for lab, r in self.rows.items() if r["what"] == what]
        if same:  # one model in two tables (SwiftBrush from Turbo is branch A): scored once
            self.rows[label] = dict(self.rows[same[0]])
        elif train_seeded(what, self.plan.train_seeds):
            self.rows[label] = {"what": what, **self.score_train_seeds(what)}
        else:
            gen = self.generator(what)
            self.rows[label] = {"what": what, **self.score(gen, self.plan.seeds)}
        if what.endswith(":best") and not same:
            self.rows[label]["lambda"] = self.best_lambda()
        self.timings[label] = round(time.perf_counter() - t, 1)
        r = self.rows[label]
        print(f"[{self.elapsed():6.0f} s] {label}: FID {r['fid']['mean']:.4g}, precision {r['precision']['mean']:.3f}, "
              f"recall {r['recall']['mean']:.3f}, CLIP {r['clip_score']['mean']:.4f}, alignment "
              f"{r['alignment']['mean']:.3f} ({self.timings[label]} s with training)", flush=True)

    def run_sweep(self) -> None:
        t = time.perf_counter()
        gen = self.generator("student:A")
        seeds = self.plan.seeds[:self.plan.sweep_seeds]
        for lam in self.plan.lambdas:
            gen.unet.load_state_dict(self.merged_state("A", "B", lam))
            self.sweep.append({"lambda": lam, **self.score(gen, seeds, self.plan.sweep_split)})
            print(f"[{self.elapsed():6.0f} s] sweep λ = {lam}: FID {self.sweep[-1]['fid']['mean']:.4g}", flush=True)
        self.timings["sweep"] = round(time.perf_counter() - t, 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def record(self) -> dict:
        p = self.plan
        from sb2.evaluation.timing import device_name

        return {"plan": p.name, "num_captions": p.num_captions, "seeds": list(p.seeds),
                "device": device_name(self.device),
                "teacher_steps": p.teacher_steps, "train_steps": p.train_steps, "batch_size": p.batch_size,
                "student_lr": {scheme: next((t["student_lr"] for t in self.train_info.values()
                                             if t["scheme"] == scheme), None) for scheme in ("full", "lora")},
                "vsd_guidance": next((t.get("vsd_guidance") for t in self.train_info.values()), None),
                "clip_tau": next((t["clip_tau"] for t in self.train_info.values() if t.get("clip_tau") is not None),
                                 None),
                "sweep_seeds": list(p.seeds[:p.sweep_seeds]), "sweep_split": p.sweep_split,
                "select_steps": list(p.select_steps),
                "train_seeds": list(p.train_seeds),
                "world": str(self.root),
                "rows": self.rows, "tables": [[t, lab] for t, lab, _ in ROWS if lab in self.rows],
                "sweep": self.sweep, "students": self.train_info, "skipped": self.skipped, "failed": self.failed,
                "seconds": {"setup": round(self.setup_s, 1), **self.timings, "total": round(self.elapsed(), 1)}}


def grid_images(gen, captions: list[str], seeds: list[int]) -> torch.Tensor:
    from sb2.evaluation.stream import generate_uint8

    return torch.cat([im.cpu() for _, _, im in generate_uint8(gen, captions, seeds, len(captions))])


def run(out: str | Path, plan: Plan, device: str | None = None, work: str | Path | None = None,
        world_dir: str | Path | None = None) -> dict:
    """Run ``plan``: results.json, results.md, lambda_sweep.png and samples.png in ``out``; the students and the
    reference images in ``work``."""
    from sb2.evaluation.evaluate import default_device, write_json
    from sb2.miniworld.judges import world_root
    from sb2.miniworld.report import results_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(world_dir).resolve() if world_dir else world_root().resolve()
    work = Path(work) if work else Path("local_outputs/miniworld") / plan.name  # git-ignored: students, references
    b = Bench(out, work, plan, default_device(device), root)
    print(f"[{b.elapsed():6.0f} s] set up (reference features, judges) on {b.device}", flush=True)

    def save() -> dict:
        record = b.record()
        write_json(out / "results.json", record)
        (out / "results.md").write_text(results_markdown(record))
        return record

    assert set(ORDER) == {label for _, label, _ in ROWS} | {"sweep"}
    whats = {label: what for _, label, what in ROWS} | {"sweep": "sweep"}
    if plan.workers > 1:
        b.start_workers([n for label in ORDER if planned(label, plan)
                         for n in students_of(whats[label], plan.train_seeds)])
    try:
        _run_rows(b, plan, out, save)
    finally:
        b.stop_workers()
    return save()


def planned(label: str, plan: Plan) -> bool:
    """Whether ``plan`` runs a row (or "sweep"): λ* needs the sweep."""
    if label == "sweep":
        return plan.sweep
    return label in plan.rows and (plan.sweep or not label.startswith("merged A+B, λ*"))


def _run_rows(b: Bench, plan: Plan, out: Path, save) -> None:
    from sb2.miniworld.report import plot_sweep, save_samples

    for label in ORDER:
        wanted = planned(label, plan)
        if label.startswith("merged A+B, λ*") and not b.sweep:
            wanted = False  # the sweep failed: there is no λ*
        if not wanted:
            continue
        if plan.budget_s is not None and b.elapsed() > plan.budget_s:
            b.skipped.append(label)
            print(f"[{b.elapsed():6.0f} s] skipped {label}: past the budget of {plan.budget_s} s", flush=True)
            continue
        try:
            if label == "sweep":
                b.run_sweep()
                plot_sweep(b.sweep, out / "lambda_sweep.png", b.rows, plan.sweep_split)
            else:
                b.run_row(label)
        except Exception as e:  # noqa: BLE001 — one failed row (a diverged student, say) must not cost the rest
            traceback.print_exc()
            b.failed[label] = f"{type(e).__name__}: {e}"
            save()
            continue
        if label == "merged A+B, λ = 0.5":
            captions = b.captions[:plan.grid_captions]
            seeds = list(range(len(captions)))
            rows = [(lab, what) for lab, what in (("teacher, cfg 4.5", "teacher:4.5"), ("Turbo analog", "turbo"),
                                                   ("A", "student:A"), ("B", "student:B"),
                                                   ("merged λ = 0.5", "merge:A:B:0.5"))
                    if plan.name == "demo" or lab in ("teacher, cfg 4.5", "Turbo analog", "merged λ = 0.5")]
            save_samples([(lab, grid_images(b.generator(what), captions, seeds)) for lab, what in rows], captions,
                         out / "samples.png")
        save()
