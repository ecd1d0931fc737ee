"""``sb2 prompts``: build the prompt dataset, and optionally cache its text embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="The prompt dataset: build it from JourneyDB/LAION/your files; cache its embeddings.",
                  no_args_is_help=True)

# sb2.cli registers this app at its end: `app` exists before the shared options are imported back from it.
from sb2.cli_options import ConfigFile, Out, Profile, _cfg, _user_errors  # noqa: E402 I001

Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set prompts.workers=2.")]


@app.command()
@_user_errors
def build(out: Out, profile: Profile = None, config: ConfigFile = None, set_: Sets = None):
    """Read the configured sources (prompts.sources), normalize, filter, deduplicate, split and shard them."""
    from sb2.prompts.build import build_prompts

    cfg = _cfg(profile, config, set_)
    manifest = build_prompts(cfg.prompts, out, cfg.models)
    t = manifest["total"]
    typer.echo(f"{t['kept']} prompts (train {t['train']}, val {t['val']}) in {out}; manifest.json, stats.png; "
               f"content sha256 {manifest['content_sha256'][:16]}")


@app.command()
@_user_errors
def embed(
    prompts: Annotated[Path, typer.Option(help="A folder written by `sb2 prompts build`.")],
    out: Out,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    profile: Profile = None,
    config: ConfigFile = None,
    set_: Sets = None,
):
    """Precompute the teacher's text embeddings of every prompt (both splits) into shards training can read."""
    from sb2.prompts.embeddings import precompute_embeddings

    cfg = _cfg(profile, config, set_)
    meta = precompute_embeddings(prompts, out, cfg.models, cfg.prompts.embeddings, device=device)
    typer.echo(f"{meta['count']} embeddings {tuple(meta['shape'])} ({meta['dtype']}) written to {out}")
