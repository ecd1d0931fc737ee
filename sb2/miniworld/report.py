"""The mini-world benchmark's outputs: the table (results.md) with its target section, the λ-sweep plot and the
sample grid."""

from __future__ import annotations

from pathlib import Path

import torch

KEYS = (("fid", "FID ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"), ("clip_score", "CLIP ↑"),
        ("alignment", "alignment ↑"), ("count", "right count ↑"))
# "count" (the share of images with as many objects as the caption names) was added after results of earlier runs
# were written: a record without it shows "—" there and leaves its plot panel out.


def _several_seeds(record_or_row: dict) -> bool:
    """Whether a results record (or one of its rows) was trained at more than one training seed."""
    return len(record_or_row.get("train_seeds") or [0]) > 1


def _cell(m: dict | None) -> str:
    return "—" if m is None else f"{m['mean']:.4g} ± {m['std']:.2g}"


def keys_of(rows) -> tuple[tuple[str, str], ...]:
    """The KEYS that every one of ``rows`` (score dicts) has: the plot's panels."""
    rows = list(rows)
    return tuple((k, h) for k, h in KEYS if all(k in r for r in rows))


def results_markdown(record: dict) -> str:
    title = {"bench": "Mini-world benchmark", "quick": "Mini-world benchmark, QUICK (CPU smoke run: the numbers "
             "mean nothing)", "demo": "Mini-world demo (CPU, a short schedule)"}[record["plan"]]
    lines = [f"# {title}", "",
             (f"{record['num_captions']} evaluation captions (one image each), evaluation seeds {record['seeds']}: "
             f"mean ± std over those noise seeds; "
             + (f"**rows marked ‡ (A, B and their merges) are trained once per training seed "
                f"{record['train_seeds']}: mean ± std over the training seeds** of each one's mean over the noise "
                f"seeds; every other student is trained once, at seed 0 (all: "
                if _several_seeds(record) else "**each student is trained once** (seed 0, ")
             + f"{record['train_steps']} steps × batch {record['batch_size']}, "
             f"student lr {record['student_lr']['full']} (full) / "
             f"{record['student_lr']['lora']} (LoRA), "
             + (f"VSD guidance {record['vsd_guidance']}, " if record.get("vsd_guidance") is not None else "")
             + (f"CLIP-loss τ {record['clip_tau']}, " if record.get("clip_tau") is not None else "")
             + "`sb2.train.loop.train` on the "
             f"`miniworld` profile plus the row's overrides; see `students` in results.json). Teacher: "
             f"{record['teacher_steps']} DDIM steps. FID is in the units of the mini-world feature judge "
             "(data/miniworld/CARD.md), comparable only within this table. Device: "
             f"{record['device']}; {record['seconds']['total']:.0f} s in all."), ""]
    picked = {n: t["selection"]["step"] for n, t in record["students"].items() if "selection" in t}
    if record.get("select_steps") and picked:
        lines += [f"**Checkpoint selection**: each student was also saved at steps {record['select_steps']}; of those "
                  f"and the last step, the one with the lowest FID on the {record['num_captions']} validation "
                  "captions (noise seed 0) is the student of its rows — picked on held-out captions, not on the "
                  "evaluation captions that score them. Steps picked: "
                  + ", ".join(f"{n} {k}" for n, k in sorted(picked.items())) + ".", ""]
    rows = record["rows"]
    table = None
    for tname, label in record["tables"]:
        if tname != table:
            table = tname
            lines += ["", f"## {tname}", "", "| model | " + " | ".join(h for _, h in KEYS) + " |",
                      "| --- |" + " --- |" * len(KEYS)]
        r = rows[label]
        name = label + (f" (λ* = {r['lambda']})" if "lambda" in r else "") + (
            " ‡" if _several_seeds(r) or r.get("failed_train_seeds") else "") + (
            f" (training seeds {r['train_seeds']} only; {', '.join(r['failed_train_seeds'])} failed to train)"
            if r.get("failed_train_seeds") else "")
        lines.append(f"| {name} | " + " | ".join(_cell(rows[label].get(k)) for k, _ in KEYS) + " |")
    if record["sweep"]:
        lines += ["", "## λ sweep: θ = λ·θ_A + (1 − λ)·θ_B (A = full VSD, B = LoRA + clamped CLIP + schedule)", "",
                  (f"Noise seeds {record['sweep_seeds']}"
                   + (", the students of training seed 0" if _several_seeds(record) else "")
                   + "; plot: [lambda_sweep.png](lambda_sweep.png). " + _sweep_split_note(record)
                   + " λ = 0.5 is fixed in advance."), "",
                  "| λ | " + " | ".join(h for _, h in KEYS) + " |", "| --- |" + " --- |" * len(KEYS)]
        for r in record["sweep"]:
            lines.append(f"| {r['lambda']:.1f} | " + " | ".join(_cell(r.get(k)) for k, _ in KEYS) + " |")
    if record["skipped"]:
        lines += ["", f"Not run (past the time budget): {', '.join(record['skipped'])}."]
    for label, error in record.get("failed", {}).items():
        lines += ["", f"**Failed: {label}** — {error}"]
    lines += ["", "Samples (same captions and noise seeds per column): [samples.png](samples.png)."]
    lines += target_section(rows)
    if record["plan"] == "quick":
        lines += ["", "_Quick mode: 1 training step, a handful of captions — a test of the plumbing only._"]
    return "\n".join(lines) + "\n"


def target_section(rows: dict) -> list[str]:
    """Issue #3's target, stated per merged row: FID below the teacher's best 25-step FID, alignment at least the
    teacher's at cfg 4.5, recall above the Turbo analog's (means over seeds)."""
    teachers = {k: r for k, r in rows.items() if k.startswith("teacher")}
    merged = {k: r for k, r in rows.items() if k.startswith("merged")}
    lines = ["", "## Target", ""]
    if not teachers or not merged:
        return lines + ["Not enough rows ran to check the target."]
    best_name = min(teachers, key=lambda k: teachers[k]["fid"]["mean"])
    best = teachers[best_name]["fid"]["mean"]
    t45 = rows.get("teacher, cfg 4.5")
    turbo = rows.get("Turbo analog (1 step)")
    seeded = any(_several_seeds(r) for r in merged.values())
    for name, r in merged.items():
        once = seeded and not _several_seeds(r)  # beside means over training seeds: say so
        checks = [(r["fid"]["mean"] < best, (f"FID {r['fid']['mean']:.4g}{' (training seed 0 only)' if once else ''}"
                                            f" < teacher's best 25-step FID {best:.4g} ({best_name})"))]
        if t45:
            a, ta = r["alignment"]["mean"], t45["alignment"]["mean"]
            checks.append((a >= ta, f"alignment {a:.3f} ≥ teacher cfg 4.5's {ta:.3f}"))
        if turbo:
            rc, tr = r["recall"]["mean"], turbo["recall"]["mean"]
            checks.append((rc > tr, f"recall {rc:.3f} > Turbo analog's {tr:.3f}"))
        held = all(ok for ok, _ in checks)
        lines.append(f"- **{name}: {'met' if held else 'NOT met'}** — " +
                     "; ".join(f"{'yes' if ok else 'no'}: {text}" for ok, text in checks))
    return lines


def _sweep_split_note(record: dict) -> str:
    if record.get("sweep_split", "eval") == "validation":
        return (f"Scored on the {record['num_captions']} validation captions (the evaluation split's next "
                f"{record['num_captions']} scenes: other scenes, same templates), where λ* is picked; the λ* row above "
                "is scored on the evaluation captions, which did not pick it (at the training seed the sweep ran on, "
                "λ* is still chosen with that seed's students).")
    return ("λ* is picked on these same captions (no held-out split), so its row is optimistic (at the training seed "
            "the sweep ran on).")


def plot_sweep(sweep: list[dict], path: Path, rows: dict, split: str = "eval") -> Path:
    """FID, precision, recall, CLIP, alignment and right count against λ (mean ± std), the teacher at cfg 4.5 and
    the Turbo analog as horizontal lines (paper Figs. 3, 7); a score the sweep's records lack gets no panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys_of(sweep)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    lams = [r["lambda"] for r in sweep]
    for ax, (key, title) in zip(axes, keys):
        ax.errorbar(lams, [r[key]["mean"] for r in sweep], yerr=[r[key]["std"] for r in sweep], marker="o",
                    capsize=3, label="merged A+B")
        for label, style in (("teacher, cfg 4.5", "--"), ("Turbo analog (1 step)", ":")):
            if label in rows and key in rows[label]:
                ax.axhline(rows[label][key]["mean"], color="gray", linestyle=style, linewidth=1, label=label)
        ax.set_title(title)
        ax.set_xlabel("λ  (θ = λ·θ_A + (1−λ)·θ_B)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if split == "validation":
        fig.suptitle("merged A+B scored on the validation captions; the lines on the evaluation captions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_samples(rows: list[tuple[str, torch.Tensor]], captions: list[str], path: Path, scale: int = 2) -> Path:
    """One row per model (uint8 images (N, 3, H, W), the same captions and seeds per column), labelled on the left;
    the captions go to ``<path>.txt``."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 11)  # has λ; PIL's default font does not
    n, _, h, w = rows[0][1].shape
    h, w, pad, left = h * scale, w * scale, 2, 120
    grid = Image.new("RGB", (left + n * (w + pad), len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, images) in enumerate(rows):
        y = i * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
        for j, im in enumerate(images):
            tile = Image.fromarray(im.permute(1, 2, 0).numpy()).resize((w, h), Image.NEAREST)
            grid.paste(tile, (left + j * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    path.with_suffix(".txt").write_text("".join(f"{j}: {c}\n" for j, c in enumerate(captions)))
    return path
