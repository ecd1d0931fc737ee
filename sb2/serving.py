"""The merged student as an MLflow pyfunc: prompts (and optional seeds) in, base64 PNG images out.

Served with ``mlflow models serve -m models:/<name>@champion --env-manager local``. Bad requests (no prompts, too many,
non-string or absurdly long prompts, bad seeds) are rejected with HTTP 400 and a message; the server keeps serving.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import mlflow.pyfunc

MAX_BATCH = 16
MAX_PROMPT_CHARS = 2000


def _bad(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def validate_request(model_input: Any, max_batch: int = MAX_BATCH) -> tuple[list[str], list[int] | None]:
    """(prompts, seeds) from a DataFrame with a ``prompt`` column and an optional ``seed`` column."""
    import math

    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
        raise _bad("expected a table with a 'prompt' column (and optionally 'seed')")
    n = len(model_input)
    if n == 0:
        raise _bad("no prompts given")
    if n > max_batch:
        raise _bad(f"{n} prompts in one request; at most {max_batch}")
    prompts = model_input["prompt"].tolist()
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise _bad(f"prompt {i} is not a string ({type(p).__name__})")
        if len(p) > MAX_PROMPT_CHARS:
            raise _bad(f"prompt {i} has {len(p)} characters; at most {MAX_PROMPT_CHARS}")
    seeds = None
    if "seed" in model_input.columns:
        seeds = []
        for i, s in enumerate(model_input["seed"].tolist()):
            if s is None or (isinstance(s, float) and math.isnan(s)):
                seeds.append(i)
                continue
            if isinstance(s, bool) or not float(s).is_integer() or not 0 <= int(s) < 2 ** 63:
                raise _bad(f"seed {i} must be a non-negative integer, got {s!r}")
            seeds.append(int(s))
    return prompts, seeds


class OneStepImageModel(mlflow.pyfunc.PythonModel):
    """Loads the exported diffusers pipeline folder (the ``pipeline`` artifact) with sb2's one-step generator."""

    def load_context(self, context) -> None:
        import torch

        from sb2.generation.generator import OneStepGenerator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "float16" if device == "cuda" else "float32"
        self.generator = OneStepGenerator.from_pipeline(context.artifacts["pipeline"], device, dtype)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from sb2.generation.images import to_pil

        prompts, seeds = validate_request(model_input)
        images = to_pil(self.generator(prompts, seeds=seeds))
        out = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return pd.DataFrame({"image_png_base64": out})
