"""The options and error handling every `sb2` command shares (its own module, so that the sub-command modules and
`sb2.cli` import it without importing each other)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

Profile = Annotated[Optional[str], typer.Option("--profile", "-p", help="Config profile: tiny or sd21 (default: the "
                                                                       "config file's profile, else sd21).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file merged over the profile.")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. --set train.steps=100.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def _user_errors(fn):
    """A user error (bad config, missing model or file) is one line on stderr and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sb2.config import ConfigError
        from sb2.models.loading import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, ModelLoadError, FileNotFoundError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _cfg(profile: str, config: Optional[Path], sets: Optional[list[str]]):
    from sb2.config import load_config

    return load_config(profile, sets or [], config)
