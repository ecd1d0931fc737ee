"""`sb2 miniworld …`: build the mini-world's pretrained models; benchmark distillation in it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The mini-world: a procedural text-to-image world with known ground truth.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Output folder (data/miniworld is the committed one).")],
    quick: Annotated[bool, typer.Option(help="Tiny sizes and step counts (CPU tests): nothing is any good.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    workers: Annotated[int, typer.Option(help="Processes rendering the world.")] = 1,
    keep: Annotated[list[str] | None, typer.Option(help="Reuse this model of an earlier run in --out "
                                                        "(repeatable): vae, tiny_vae, clip, judges/clip, judges, "
                                                        "teacher. Keeping all six retrains the Turbo analog "
                                                        "alone.")] = None,
    continue_teacher: Annotated[bool, typer.Option(help="Start the teacher from --out's teacher UNet.")] = False,
    turbo_pairs: Annotated[int | None, typer.Option(min=1, help="Teacher samples the Turbo analog is distilled "
                                                                "on (default 16,384).")] = None,
    seconds: Annotated[list[str] | None, typer.Option(help="Time cap of one trainer, NAME=SECONDS (repeatable): "
                                                           "vae, tiny_vae, clip, judge, judge_clip, teacher, turbo.")] = None,
    turbo: Annotated[list[str] | None, typer.Option(help="A setting of the Turbo analog, NAME=VALUE (repeatable): "
                                                         "steps, batch, lr, and its loss's regression_weight (1), "
                                                         "score_weight (0: ADD's score distillation off), "
                                                         "score_guidance (the sampling cfg, 4.5), adv_weight "
                                                         "(0.02).")] = None,
):
    """Train the VAE, TinyVAE, CLIP (its text tower is the teacher's text encoder), the teacher, the Turbo analog
    and the judges; write them and CARD.md/card.json to --out."""
    from sb2.miniworld.pretrain import PretrainConfig, check_keep, set_turbo
    from sb2.miniworld.pretrain import pretrain as run

    cfg = PretrainConfig.quick() if quick else PretrainConfig()
    try:
        check_keep(tuple(keep or ()), continue_teacher)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--keep") from None
    if turbo_pairs is not None:
        cfg.turbo_pairs = turbo_pairs
    try:
        set_turbo(cfg, turbo or ())
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--turbo") from None
    for item in seconds or ():
        name, _, value = item.partition("=")
        if name not in PretrainConfig().seconds or not value:
            raise typer.BadParameter(f"{item!r}: expected NAME=SECONDS with NAME one of "
                                     f"{', '.join(PretrainConfig().seconds)}", param_hint="--seconds")
        try:
            cfg.seconds[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r}: {value!r} is not a number", param_hint="--seconds") from None
    card = run(out, cfg, device=device, workers=workers, keep=tuple(keep or ()), continue_teacher=continue_teacher)
    typer.echo(f"mini-world models written to {out} in {card['total_seconds']} s (see CARD.md)")


@app.command()
def render(
    out: Annotated[Path, typer.Option(help="Folder for a sample grid and its captions.")],
    split: Annotated[str, typer.Option(help="train or eval.")] = "train",
    n: Annotated[int, typer.Option(help="Number of scenes.")] = 16,
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
):
    """Render n scenes of a split: grid.png and captions.txt."""
    import numpy as np
    import torch

    from sb2.generation.images import save_grid
    from sb2.miniworld.world import make_pairs

    images, captions, _ = make_pairs(seed, split, n)
    out.mkdir(parents=True, exist_ok=True)
    pixels = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 HWC → [-1, 1]
    save_grid(pixels, out / "grid.png", cols=8)
    (out / "captions.txt").write_text("\n".join(captions) + "\n")
    typer.echo(f"{n} {split} scenes written to {out}")


@app.command()
def prompts(
    out: Annotated[Path, typer.Option(help="Folder for prompts.txt and eval_captions.txt.")] = Path("data/miniworld"),
    num_prompts: Annotated[int, typer.Option(help="Distinct distillation prompts.")] = 8_000,
    num_eval: Annotated[int, typer.Option(help="Evaluation captions.")] = 2048,
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
):
    """Write the distillation prompts (training frames) and the evaluation captions (evaluation frames)."""
    from sb2.miniworld.captions import write_caption_files

    paths = write_caption_files(out, seed, num_prompts, num_eval)
    typer.echo(f"wrote {paths['prompts']} and {paths['eval_captions']}")


@app.command()
def reference(
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("local_outputs/miniworld/reference"),
    num_eval: Annotated[int, typer.Option(help="Evaluation scenes.")] = 2048,
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
):
    """Render the reference images of the evaluation captions (the FID / precision-recall reference set)."""
    from sb2.miniworld.captions import write_reference_images

    typer.echo(f"reference images written to {write_reference_images(out, seed, num_eval)}")


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Output folder: results.md/json, lambda_sweep.png, samples.png.")] = Path(
        "results/miniworld"),
    work: Annotated[Path | None, typer.Option(help="Folder for the students and reference images "
                                                   "(default: local_outputs/miniworld/bench).")] = None,
    quick: Annotated[bool, typer.Option(help="CPU smoke run: 16 captions, 1 training step; numbers mean nothing.")] = False,
    steps: Annotated[int | None, typer.Option(help="Training steps of each student (default 500).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size (default 64).")] = None,
    captions: Annotated[int | None, typer.Option(help="Evaluation captions (default 2048).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Evaluation (noise) seeds per model (default 3).")] = None,
    sweep_seeds: Annotated[int | None, typer.Option(help="Seeds per λ of the sweep (default 3).")] = None,
    sweep_split: Annotated[str, typer.Option(help="Captions the λ sweep is scored on and λ* picked on: validation "
                                                  "(the evaluation split's next scenes, default) or eval (the "
                                                  "evaluation captions themselves).")] = "validation",
    train_seeds: Annotated[int | None, typer.Option(min=1, help="Training seeds of A, B and their merges (default "
                                                                "3; every other student trains once).")] = None,
    budget_s: Annotated[float | None, typer.Option(help="Start no row past this many seconds.")] = None,
    select_step: Annotated[list[int] | None, typer.Option(help="Checkpoint selection: also save each student at "
                                                               "this step (repeat the option for several); the "
                                                               "candidate with the best FID on the validation "
                                                               "captions, the last step included, is the "
                                                               "student.")] = None,
    lr_full: Annotated[float | None, typer.Option(help="optim.student_lr of the full-scheme students "
                                                       "(default 1e-6, the paper's; 1e-5 collapsed).")] = None,
    lr_lora: Annotated[float | None, typer.Option(help="optim.student_lr of the LoRA students "
                                                       "(default 3e-4).")] = None,
    world: Annotated[Path | None, typer.Option(help="The mini-world's folder (default: data/miniworld of the "
                                                    "checkout, or SB2_MINIWORLD).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Train the students side by side in this many processes while "
                                                     "the teacher is scored (a GPU runs several tiny training loops "
                                                     "at once; on CPU keep 1).")] = 1,
):
    """Train every student of the paper's Tables 2, 5, 6 with the library's train(), merge, sweep λ, and score them
    and the teacher (cfg 2/4.5/7.5) and the Turbo analog with the mini-world judges (mean ± std over seeds)."""
    from sb2.miniworld.bench import Plan, run

    if sweep_split not in ("validation", "eval"):
        raise typer.BadParameter(f"--sweep-split is validation or eval, not {sweep_split!r}")
    plan = Plan.quick() if quick else Plan()
    plan.sweep_split = sweep_split
    for name, value in (("train_steps", steps), ("batch_size", batch_size), ("num_captions", captions),
                        ("sweep_seeds", sweep_seeds), ("budget_s", budget_s), ("full_lr", lr_full),
                        ("lora_lr", lr_lora), ("workers", workers)):
        if value is not None:
            setattr(plan, name, value)
    if select_step:
        plan.select_steps = tuple(select_step)
        from sb2.miniworld.bench import candidate_steps

        try:
            candidate_steps(plan)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    if seeds is not None:
        plan.seeds = tuple(range(seeds))
    if train_seeds is not None:
        plan.train_seeds = tuple(range(train_seeds))
    record = run(out, plan, device=device, work=work, world_dir=world)
    typer.echo(f"{len(record['rows'])} rows in {record['seconds']['total']:.0f} s written to {out / 'results.md'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("local_outputs/miniworld/demo"),
    steps: Annotated[int | None, typer.Option(help="Training steps of each branch (default 30).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size (default 16).")] = None,
    captions: Annotated[int | None, typer.Option(help="Evaluation captions (default 192).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cpu).")] = "cpu",
):
    """`make demo`: distill the committed teacher into both branches for a short schedule, merge (λ = 0.5), score
    teacher (cfg 4.5), Turbo analog, A, B and the merge with the judges; print the table, write samples.png."""
    from sb2.miniworld.bench import Plan, run
    from sb2.miniworld.report import KEYS

    plan = Plan.demo()
    for name, value in (("train_steps", steps), ("batch_size", batch_size), ("num_captions", captions)):
        if value is not None:
            setattr(plan, name, value)
    record = run(out, plan, device=device, work=out)
    typer.echo("")
    typer.echo(f"{'model':<36}" + "".join(f"{h:>14}" for _, h in KEYS))
    for label, r in record["rows"].items():
        typer.echo(f"{label:<36}" + "".join(f"{r[k]['mean']:>14.4g}" if k in r else f"{'—':>14}" for k, _ in KEYS))
    typer.echo(f"\n{record['seconds']['total']:.0f} s. Table: {out / 'results.md'}; teacher vs students: "
               f"{out / 'samples.png'} (captions in samples.txt)")
