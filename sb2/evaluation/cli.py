"""`sb2 evaluate`: the protocol on one model, the merge-λ sweep, inference timing, or the reference features. Each mode
resolves the validated config and calls one stage function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sb2.cli_options import ConfigFile, Profile

Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set evaluate.seed=1.")]
MaybePath = Optional[Path]
OUT_HELP = "Output folder (with --ref-stats: default evaluate.reference_dir)."
REF_HELP = "Compute the reference features of an image folder (--images, default evaluate.reference_images)."
CAPTIONS_HELP = "Number of captions: evaluate.num_captions (evaluate.sweep.num_captions with --sweep-lambda)."


def evaluate_command(
    out: Annotated[MaybePath, typer.Option("--out", "-o", help=OUT_HELP)] = None,
    model: Annotated[MaybePath, typer.Option(help="A UNet folder, LoRA student folder or pipeline.")] = None,
    sweep_lambda: Annotated[bool, typer.Option("--sweep-lambda", help="Evaluate merges of --a and --b over "
                                               "evaluate.sweep.lambdas.")] = False,
    a: Annotated[MaybePath, typer.Option("--a", help="Student A of the sweep (λ = 1).")] = None,
    b: Annotated[MaybePath, typer.Option("--b", help="Student B of the sweep (λ = 0).")] = None,
    timing: Annotated[bool, typer.Option("--timing", help="Time inference of --model (paper 7.5).")] = False,
    ref_stats: Annotated[bool, typer.Option("--ref-stats", help=REF_HELP)] = False,
    images: Annotated[MaybePath, typer.Option(help="Reference image folder for --ref-stats.")] = None,
    captions: Annotated[Optional[int], typer.Option("--captions", "-n", help=CAPTIONS_HELP)] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Sets = None,
):
    """Evaluate one-step models on the zero-shot COCO-2014 protocol (FID, precision/recall, CLIP score, HPSv2)."""
    from sb2.config import load_config

    modes = [m for m, on in (("--sweep-lambda", sweep_lambda), ("--timing", timing), ("--ref-stats", ref_stats)) if on]
    if len(modes) > 1:
        raise ValueError(f"choose one of {', '.join(modes)}")
    sets = list(set_ or [])
    if captions is not None:
        sets.append(f"evaluate.{'sweep.' if sweep_lambda else ''}num_captions={captions}")
    cfg = load_config(profile, sets, config)
    if ref_stats:
        return _ref_stats(cfg, images, out, device)
    if out is None:
        raise ValueError("--out is required")
    if sweep_lambda:
        if a is None or b is None:
            raise ValueError("--sweep-lambda needs --a and --b")
        from sb2.evaluation.sweep import sweep_lambda as run_sweep

        rec = run_sweep(a, b, cfg, out, device=device)
        chosen = rec["chosen"]
        typer.echo(_table_text(out / "sweep.md"))
        typer.echo(f"chosen lambda={chosen['lambda']} (FID {chosen['fid']:.4g}); merged UNet saved to {rec['merged']}; "
                   f"table, plot and sweep.json in {out}")
        return
    if model is None:
        raise ValueError("--model is required")
    if timing:
        from sb2.evaluation.timing import timing as run_timing

        rec = run_timing(model, cfg, out, device=device)
        typer.echo(f"{rec['mean_s'] * 1000:.2f} ± {rec['std_s'] * 1000:.2f} ms per call (batch {rec['batch_size']}, "
                   f"{rec['dtype']}, {rec['repeats']}×{rec['calls']} calls) on {rec['device']}; "
                   f"timing.json in {out}")
        return
    from sb2.evaluation.evaluate import evaluate

    rec = evaluate(model, cfg, out, device=device)
    shown = {k: rec[k] for k in ("fid", "precision", "recall", "clip_score") if k in rec}
    typer.echo("  ".join(f"{k}={v:.4f}" for k, v in shown.items()) + f"  ({rec['num_images']} images)")
    for style, s in rec.get("hps", {}).items():
        typer.echo(f"hps {style}: {s['mean']:.2f} ± {s['std']:.2f}")
    typer.echo(f"metrics.json written to {out}")


def _ref_stats(cfg, images: Path | None, out: Path | None, device: str | None) -> None:
    from sb2.evaluation.evaluate import default_device, load_judges
    from sb2.evaluation.reference import build_reference

    ecfg = cfg.evaluate
    device = default_device(device)
    judges = load_judges(ecfg, device, cfg.models.local_files_only, ["fid", "precision_recall"])
    target = out or Path(ecfg.reference_dir)
    ref = build_reference(images or ecfg.reference_images, judges, ecfg, target, device,
                          batch_size=ecfg.batch_size)
    typer.echo(f"reference features of {ref.info['num_images']} images written to {target}")


def _table_text(path: Path) -> str:
    return path.read_text().rstrip() if path.is_file() else ""
