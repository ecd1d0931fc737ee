"""The `sb2` command line. Each command resolves the validated config and calls one stage function of the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="SwiftBrush v2: one-step text-to-image distillation.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

from sb2.cli_options import ConfigFile, Out, Profile, Sets, _cfg, _user_errors  # noqa: E402,F401


@app.command()
@_user_errors
def train(
    scheme: Annotated[str, typer.Option(help="full (branch A, VSD only) or lora (branch B, VSD + clamped CLIP).")],
    out: Out,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set train.steps=100.")] = None,
):
    """Train one branch of SwiftBrush v2 and save the student."""
    from sb2.train.loop import TrainingDiverged, train as run

    if scheme not in ("full", "lora"):
        raise ValueError(f"--scheme must be full or lora, not {scheme!r}")
    cfg = _cfg(profile, config, set_)
    try:
        path = run(cfg, scheme, out)
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    typer.echo(f"student saved to {path}")


@app.command("student-from-checkpoint")
@_user_errors
def student_from_checkpoint(
    run: Annotated[Path, typer.Argument(help="A training run's output folder (the --out of sb2 train).")],
    out: Out,
    step: Annotated[Optional[int], typer.Option(help="The checkpoint's step (default: the newest).")] = None,
    ema: Annotated[bool, typer.Option(help="Save the EMA weights where the checkpoint has them, as the run's end "
                                           "does.")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override the run's own settings, e.g. "
                                                                         "--set models.student=PATH.")] = None,
):
    """Save the student of one of a run's checkpoints, as the run saves its final student (UNet or LoRA folder)."""
    from sb2.train.student_export import student_from_checkpoint as run_export

    import json

    from sb2.train.student_export import PROVENANCE

    path = run_export(run, out, step=step, overrides=set_, ema=ema)
    info = json.loads((path / PROVENANCE).read_text())
    typer.echo(f"student of {run} at step {info['step']} ({info['scheme']}{', EMA' if info['ema'] else ''}) "
               f"saved to {path}")


@app.command()
@_user_errors
def regpairs(
    prompts: Annotated[Path, typer.Option(help="Prompts: a text file (one a line), or Parquet/CSV with a prompt column.")],
    out: Out,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Only the first N prompts.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Sets = None,
):
    """Generate DMD's regression pairs with the teacher (DDIM, regularization.pairs) for regularization.kind=dmd_pairs."""
    from sb2.train.regpairs import generate_regpairs

    rec = generate_regpairs(_cfg(profile, config, set_), prompts, out, limit=num, device=device)
    typer.echo(f"{rec['count']} noise–teacher pairs ({rec['steps']} DDIM steps, cfg {rec['guidance_scale']}) "
               f"written to {out}")


@app.command()
@_user_errors
def merge(
    a: Annotated[Path, typer.Argument(help="Student A (e.g. the full branch).")],
    b: Annotated[Path, typer.Argument(help="Student B (e.g. the lora branch; its LoRA is folded first).")],
    out: Out,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="θ = λ·θ_A + (1−λ)·θ_B; default merge.lam.")] = None,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set train.steps=100.")] = None,
):
    """Merge two one-step students by linear weight interpolation (paper eq. 6)."""
    from sb2.merge import merge_students

    cfg = _cfg(profile, config, (set_ or []) + ([f"merge.lam={lam}"] if lam is not None else []))
    path = merge_students(a, b, cfg.merge.lam, out, cfg.models)
    typer.echo(f"merged UNet (lambda={cfg.merge.lam}) saved to {path}")


@app.command()
@_user_errors
def generate(
    model: Annotated[Path, typer.Option(help="A UNet folder, LoRA student folder or exported pipeline.")],
    out: Out,
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="File with one prompt a line.")] = None,
    seed: Annotated[Optional[list[int]], typer.Option(help="Seeds, one per prompt (default generate.seed+i).")] = None,
    interpolate: Annotated[Optional[str], typer.Option(help="noise or prompt (slerp, paper 8.3/8.4).")] = None,
    steps: Annotated[int, typer.Option(help="Frames of an interpolation.")] = 8,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set train.steps=100.")] = None,
):
    """Generate images in one step: PNGs, a grid and generate.json."""
    from sb2.generation.generator import generate as run, read_prompt_args

    cfg = _cfg(profile, config, set_)
    ps = read_prompt_args(prompts, str(prompt_file) if prompt_file else None)
    rec = run(model, ps, out, cfg, device=device, seeds=seed, interpolate=interpolate, steps=steps)
    typer.echo(f"{rec['count']} images and grid.png written to {out}")


@app.command()
@_user_errors
def export(
    model: Annotated[Path, typer.Option(help="A UNet folder or LoRA student folder.")],
    out: Out,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set train.steps=100.")] = None,
):
    """Export a student as a complete diffusers StableDiffusionPipeline folder (1 step, t = 999)."""
    from sb2.generation.export import export_pipeline

    path = export_pipeline(model, _cfg(profile, config, set_), out)
    typer.echo(f"pipeline saved to {path}; load with StableDiffusionPipeline.from_pretrained and run "
               f"num_inference_steps=1, guidance_scale=0")


@app.command()
@_user_errors
def register(
    model: Annotated[Path, typer.Option(help="The merged student (UNet folder) or an exported pipeline.")],
    out: Out,
    metrics: Annotated[Optional[Path], typer.Option(help="metrics.json of the evaluate stage.")] = None,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set train.steps=100.")] = None,
):
    """Log the student as an MLflow model, register a version (alias challenger), promote to champion if better."""
    from sb2.registry import register as run

    rec = run(model, metrics, _cfg(profile, config, set_), out)
    verdict = "promoted to champion" if rec["promoted"] else "not promoted"
    typer.echo(f"{rec['model_name']} version {rec['version']}: {verdict} ({rec['reason']})")


@app.command()
@_user_errors
def submit(
    host: Annotated[str, typer.Option(help="The Kubeflow Pipelines endpoint, e.g. http://localhost:8080.")],
    package: Annotated[Path, typer.Option(help="The compiled pipeline.")] = Path("pipelines/sb2.yaml"),
    param: Annotated[Optional[list[str]], typer.Option("--param", help="A pipeline parameter, e.g. "
                                                       "--param profile=sd21 --param gpus_per_train=8.")] = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment.")] = "sb2",
    run_name: Annotated[Optional[str], typer.Option(help="Run name.")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Kubeflow profile namespace (multi-user).")] = None,
    upload_as: Annotated[Optional[str], typer.Option(help="Also upload the package as this pipeline.")] = None,
    service_account: Annotated[str, typer.Option(help="Run the pods as this service account; empty: KFP's "
                                                 "default (default-editor in a profile namespace).")] = "",
):
    """Upload and run the compiled Kubeflow pipeline with kfp.Client (the same as `kfp run create -f`)."""
    from sb2.kfp.submit import parse_params, submit as run

    if not package.is_file():
        raise FileNotFoundError(f"{package}: no compiled pipeline (python pipelines/sb2_pipeline.py writes it)")
    rec = run(host, package, parse_params(param or [], package), experiment, run_name, namespace, upload_as,
              service_account)
    typer.echo(f"run {rec['run_id']} started: {rec['url']}")


@app.command("config")
@_user_errors
def show_config(profile: Profile = None, config: ConfigFile = None, set_: Sets = None):
    """Print the resolved, validated config as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(_cfg(profile, config, set_).model_dump(mode="json"), sort_keys=False))


from sb2.evaluation.cli import evaluate_command  # noqa: E402  (its own module: four modes, one stage each)

app.command("evaluate")(_user_errors(evaluate_command))
from sb2.prompts.cli import app as prompts_app  # noqa: E402  (it imports the options above)

app.add_typer(prompts_app, name="prompts")
from sb2.miniworld.cli import app as miniworld_app  # noqa: E402

app.add_typer(miniworld_app, name="miniworld")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
