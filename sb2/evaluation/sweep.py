"""The merge-λ sweep (paper Figs. 3 and 7, supplement 7.1): θ = λ·θ_A + (1 − λ)·θ_B (eq. 6) merged in memory for each
λ of a grid, each merge evaluated by the protocol on a subset of the captions (5K by default); a table, the four
panels of FID, CLIP score, precision and recall against λ, and the λ of best FID, optionally among those whose CLIP
score reaches a floor (the paper picks for FID "while not trading off too much with other metrics"). The merge at
the chosen λ is saved as the merge stage saves one, with the choice recorded in its ``merge.json``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sb2.evaluation.captions import CAPTION_RULE, read_captions
from sb2.evaluation.evaluate import (REFERENCE_PARTS, default_device, load_generator, load_judges, protocol_metrics,
                                     write_json)
from sb2.evaluation.reference import reference_for
from sb2.evaluation.timing import PhaseTimer, device_name

COLUMNS = ("lambda", "fid", "clip_score", "precision", "recall")
PANELS = (("fid", "FID ↓"), ("clip_score", "CLIP score ↑"), ("precision", "Precision ↑"), ("recall", "Recall ↑"))


def pick_lambda(rows: list[dict[str, float]], clip_floor: float | None = None) -> dict[str, float]:
    """The row of lowest FID among those with ``clip_score ≥ clip_floor`` (all rows when the floor is None)."""
    candidates = [r for r in rows if clip_floor is None or r["clip_score"] >= clip_floor]
    if not candidates:
        best = max(r["clip_score"] for r in rows)
        raise ValueError(f"no lambda reaches the CLIP-score floor {clip_floor} (the best is {best:.4f})")
    return min(candidates, key=lambda r: r["fid"])


def write_table(rows: list[dict[str, float]], out_dir: Path, chosen: float | None) -> None:
    """``sweep.csv`` and ``sweep.md`` (the chosen λ in bold)."""
    columns = [c for c in COLUMNS if all(c in r for r in rows)]
    with (out_dir / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if c != "lambda" else f"{r[c]:.2f}" for c in columns]
        if r["lambda"] == chosen:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")


def plot_sweep(rows: list[dict[str, float]], path: Path, chosen: float | None) -> Path:
    """Four panels against λ (λ = 1 is model A), as the paper's Figs. 3 and 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    lams = [r["lambda"] for r in rows]
    for ax, (key, title) in zip(axes, PANELS):
        if all(key in r for r in rows):
            ax.plot(lams, [r[key] for r in rows], marker="o")
        if chosen is not None:
            ax.axvline(chosen, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("λ  (θ = λ·θ_A + (1−λ)·θ_B)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_lambda(a: str | Path, b: str | Path, cfg, out_dir: str | Path, device: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """The sweep stage: ``sweep.csv``, ``sweep.md``, ``lambda_sweep.png``, ``sweep.json`` and ``merged/`` (the merge
    at the chosen λ, its ``merge.json`` recording how λ was chosen)."""
    from sb2.merge import merge_students, merge_weights
    from sb2.models.loading import load_one_step_unet

    ecfg, scfg, device, out = cfg.evaluate, cfg.evaluate.sweep, default_device(device), Path(out_dir)
    metrics = [m for m in ecfg.metrics if m != "hps"]
    if "fid" not in metrics or (scfg.clip_floor is not None and "clip_score" not in metrics):
        raise ValueError("the sweep picks λ by FID (and CLIP score with a floor): keep them in evaluate.metrics")
    captions = read_captions(ecfg.captions, scfg.num_captions)
    gen = load_generator(a, cfg, device)
    state_a = load_one_step_unet(a, cfg.models).state_dict()
    state_b = load_one_step_unet(b, cfg.models).state_dict()
    judges = load_judges(ecfg, device, cfg.models.local_files_only, metrics)
    reference = reference_for(ecfg, judges, device, [p for p in REFERENCE_PARTS if p in metrics])
    unet = getattr(gen.unet, "_orig_mod", gen.unet)  # the module under torch.compile, if compiled
    rows, seconds = [], {}
    for lam in scfg.lambdas:
        unet.load_state_dict(merge_weights(state_a, state_b, lam))
        timer = PhaseTimer(device)
        rows.append({"lambda": lam, **protocol_metrics(gen, captions, judges, reference, ecfg, timer,
                                                       progress=progress)})
        seconds[str(lam)] = timer.summary()
    best = pick_lambda(rows, scfg.clip_floor)
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out, best["lambda"])
    plot_sweep(rows, out / "lambda_sweep.png", best["lambda"])
    selection = {"criterion": "lowest FID" + (f" with CLIP score >= {scfg.clip_floor}" if scfg.clip_floor else ""),
                 "sweep": str(out / "sweep.csv"), "num_captions": len(captions), "metrics": best}
    merged = merge_students(a, b, best["lambda"], out / "merged", cfg.models, extra={"selected_by": selection})
    record = {"a": str(a), "b": str(b), "lambdas": scfg.lambdas, "rows": rows, "chosen": best,
              "clip_floor": scfg.clip_floor, "merged": str(merged), "num_captions": len(captions),
              "caption_rule": CAPTION_RULE, "device": device_name(device), "seconds": seconds}
    write_json(out / "sweep.json", record)
    from sb2.evaluation.evaluate import log_to_tracking

    log_to_tracking(cfg, "sweep", out, {"chosen": best}, [out / "sweep.json", out / "sweep.csv",
                                                          out / "lambda_sweep.png"])
    return record
