import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """All tiny models are built once per session into a private cache, then loaded through the real loaders."""
    os.environ["SB2_CACHE"] = str(tmp_path_factory.mktemp("sb2cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_cfg():
    from sb2.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_world(tiny_cfg):
    from sb2.models.loading import resolve

    return {name: resolve(getattr(tiny_cfg.models, name)) for name in ("teacher", "student", "tiny_vae", "clip")}


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory):
    """Tracking goes to a private SQLite store unless a test starts its own server."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    yield
