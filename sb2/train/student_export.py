"""The student of any training checkpoint, saved as the run saves its final student (a diffusers UNet folder for the
full scheme, a LoRA adapter folder for the lora scheme): to keep an earlier, better point of a run that drifted, or
to score a run along its training."""

from __future__ import annotations

import json
from pathlib import Path


from sb2.config import Config, load_config
from sb2.train import checkpoint as ckpt

PROVENANCE = "sb2_checkpoint.json"  # beside the student: which run, checkpoint and step it is
# What building the student needs from the run's own config (the checkpoint keeps it flattened): the student's
# model and how to load it, and the LoRA student's shape. Not the teacher, TinyVAE or CLIP: they need not exist here.
_STUDENT_KEYS = ("models.student", "models.student_prediction_type", "models.revision", "models.local_files_only",
                 "student_lora.")


def checkpoint_config(shared: dict, overrides: list[str] | None = None) -> Config:
    """The run's config as far as the student goes (its profile, ``models.student`` and how it loads,
    ``student_lora.*``), then ``overrides`` (e.g. a model path that moved since)."""
    flat = json.loads(shared["config"])
    overrides = list(overrides or [])
    keys = [k for k in flat if k.startswith(_STUDENT_KEYS)]
    hidden = [k for k in keys if flat[k] == "***" and not any(o.split("=", 1)[0].strip() == k for o in overrides)]
    if hidden:
        raise ValueError(f"the checkpoint's config hides {hidden} (redacted as secret-looking): pass them with --set")
    sets = [f"{k}={json.dumps(flat[k])}" for k in keys if flat[k] != "***"]
    return load_config(flat.get("profile"), sets + overrides)


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The folder of the checkpoint at ``step`` of a run, verified against its manifest; by default the newest whose
    files verify (a corrupt newer one is reported and passed over, as training does)."""
    import sys

    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoints under {Path(run_dir) / ckpt.CKPT_DIR}")
    by_step = dict(found)
    if step is None:
        for _, path in reversed(found):
            try:
                ckpt.verify(path)
                return path
            except ckpt.CorruptCheckpoint as e:
                print(f"checkpoint {path} is unusable ({e}); trying the previous one", file=sys.stderr)
        raise ValueError(f"no usable checkpoint in {run_dir}: every one fails its manifest")
    if step not in by_step:
        raise FileNotFoundError(f"no checkpoint at step {step} in {run_dir}; there are: {sorted(by_step)}")
    try:
        ckpt.verify(by_step[step])
    except ckpt.CorruptCheckpoint as e:
        raise ValueError(f"checkpoint {by_step[step]} is unusable: {e}") from None
    return by_step[step]


def student_from_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None,
                            overrides: list[str] | None = None, ema: bool = True) -> Path:
    """Save the student of ``run_dir``'s checkpoint at ``step`` (default: the newest) to ``out``, in the format of
    the run's final student. With ``ema`` (the default) and an EMA in the checkpoint, the EMA weights are saved, as
    the run saves them at its end."""
    from sb2.atomic import atomic_dir
    from sb2.models.lora import save_lora
    from sb2.train.loop import _load_student_state
    from sb2.train.steps import build_student

    run, out = Path(run_dir).resolve(), Path(out).resolve()
    if out == run or run.is_relative_to(out):
        raise ValueError(f"--out {out} would replace the run {run} itself: pick another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty: pick a new folder (nothing is overwritten)")
    path = find_checkpoint(run_dir, step)
    # mapped: the student (and EMA) are loaded into memory, not the optimizers' moments
    shared = ckpt.load_checkpoint(path, 0, mmap=True).shared
    scheme = shared["scheme"]
    cfg = checkpoint_config(shared, overrides)
    student, params = build_student(cfg, scheme, "cpu")
    try:
        _load_student_state(student, scheme, shared["student"])
    except RuntimeError as e:  # shapes or keys of another architecture
        raise ValueError(f"{path}: the checkpoint's student does not fit {cfg.models.student} "
                         f"({str(e).splitlines()[0]}); pass the run's model with --set models.student=...") from None
    if ema and shared.get("ema") is not None:
        from diffusers.training_utils import EMAModel

        averaged = EMAModel(params)
        averaged.load_state_dict(shared["ema"])
        averaged.copy_to(params)
    used_ema = bool(ema and shared.get("ema") is not None)
    with atomic_dir(out) as tmp:
        if scheme == "full":
            student.save_pretrained(tmp)
        else:
            save_lora(student, tmp, cfg.models.student)
        (Path(tmp) / PROVENANCE).write_text(json.dumps(
            {"run": str(run_dir), "checkpoint": path.name, "step": int(shared["step"]), "scheme": scheme,
             "ema": used_ema}, indent=2))
    return Path(out)
