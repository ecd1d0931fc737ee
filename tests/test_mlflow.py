"""MLflow tracking, the registry's promotion gate and serving, against real processes on 127.0.0.1."""

import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sb2.registry import promotion_decision


def test_gate_decisions_by_hand():
    assert promotion_decision({"fid": 10.0, "clip_score": 0.3}, None, 0.005).promote
    assert promotion_decision({"fid": 9.0, "clip_score": 0.30}, {"fid": 10.0, "clip_score": 0.302}, 0.005).promote
    assert not promotion_decision({"fid": 11.0, "clip_score": 0.4}, {"fid": 10.0, "clip_score": 0.3}, 0.005).promote
    assert not promotion_decision({"fid": 10.0}, {"fid": 10.0}, 0.005).promote  # equal is not better
    worse_clip = promotion_decision({"fid": 9.0, "clip_score": 0.29}, {"fid": 10.0, "clip_score": 0.30}, 0.005)
    assert not worse_clip.promote and "CLIP" in worse_clip.reason
    for bad in (None, {}, {"fid": float("nan")}, {"fid": "x"}, {"fid": float("inf")}, {"clip_score": 0.4}):
        assert not promotion_decision(bad, {"fid": 10.0}, 0.005).promote
        assert not promotion_decision(bad, None, 0.005).promote
    assert not promotion_decision({"fid": 5.0}, {"fid": 10.0, "clip_score": 0.3}, 0.005).promote  # CLIP missing
    assert promotion_decision({"fid": 5.0}, {"fid": float("nan")}, 0.005).promote


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0, log: Path | None = None) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-5000:] if log else ''}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout}s")


def _start_server(root: Path):
    port = _free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    # Output goes to a file: a pipe nobody reads fills up and blocks the server mid-request.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    _wait_http(f"{uri}/health", proc, log=log)
    return proc, uri


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, uri = _start_server(tmp_path_factory.mktemp("mlflow-server"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
        _stop(proc)


def test_training_logs_params_metrics_and_images(mlflow_server, tiny_cfg, tmp_path):
    from mlflow import MlflowClient

    from sb2.train.loop import train

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps, cfg.tracking.image_every = 4, 2
    train(cfg, "lora", tmp_path, progress=False)
    pointer = json.loads((tmp_path / "mlflow_run.json").read_text())
    assert pointer["tracking_uri"] == mlflow_server
    assert json.loads((tmp_path / "train.json").read_text())["mlflow_run_id"] == pointer["run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(pointer["run_id"])
    for key in ("loss.vsd", "loss.lora_teacher", "loss.clip", "clip.weight", "lr.student", "grad_norm.student",
                "throughput.samples_per_s"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "loss.vsd")) == 4
    assert run.data.params["vsd.guidance_scale"] == "4.5" and run.data.params["scheme"] == "lora"
    assert run.data.tags["sb2.stage"] == "train_lora"
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum("samples" in p and p.endswith(".png") for p in images) >= 2  # step 2 and the final grid


def test_secrets_never_reach_params_or_files(mlflow_server, tiny_cfg, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from sb2.train.loop import train

    secret = "hf_TOPSECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps = 1
    cfg.tracking.experiment = "sb2-secrets"
    cfg.registry.model_name = secret  # a user who pasted a token into a config by mistake
    train(cfg, "full", tmp_path, progress=False)
    run_id = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    params = MlflowClient(mlflow_server).get_run(run_id).data.params
    assert params["registry.model_name"] == "***"
    assert all(secret not in v for v in params.values())
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.suffix == ".pt" for f in files) and any(f.name == "params.json" for f in files)
    for f in files:
        assert secret.encode() not in f.read_bytes(), f


def _register(uri: str, model: str, metrics: dict | None, out: Path, name: str) -> dict:
    mpath = out.parent / f"{out.name}-metrics.json"
    if metrics is not None:
        mpath.write_text(json.dumps(metrics))
    cmd = [sys.executable, "-m", "sb2.cli", "register", "--model", model, "--out", str(out), "-p", "tiny",
           "--set", f"registry.model_name={name}"]
    if metrics is not None:
        cmd += ["--metrics", str(mpath)]
    r = subprocess.run(cmd, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "registration.json").read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_cfg):
    from sb2.generation.export import export_pipeline
    from sb2.models.loading import resolve

    return str(export_pipeline(Path(resolve("tiny:student")) / "unet", tiny_cfg, tmp_path_factory.mktemp("exp") / "p"))


def test_gate_both_ways_and_the_pyfunc_predicts(mlflow_server, exported, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from PIL import Image

    name = "sb2-gate"
    first = _register(mlflow_server, exported, {"fid": 20.0, "clip_score": 0.30}, tmp_path / "r1", name)
    assert first["promoted"] and first["version"] == 1
    worse = _register(mlflow_server, exported, {"fid": 25.0, "clip_score": 0.35}, tmp_path / "r2", name)
    assert not worse["promoted"] and "does not beat" in worse["reason"]
    missing = _register(mlflow_server, exported, None, tmp_path / "r3", name)
    assert not missing["promoted"]
    nan = _register(mlflow_server, exported, {"fid": math.nan, "clip_score": 0.3}, tmp_path / "r4", name)
    assert not nan["promoted"]
    better = _register(mlflow_server, exported, {"fid": 15.0, "clip_score": 0.299}, tmp_path / "r5", name)
    assert better["promoted"] and better["champion_before"] == 1
    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(name, "champion").version == str(better["version"])
    assert client.get_model_version_by_alias(name, "challenger").version == str(better["version"])
    v2 = client.get_model_version(name, str(worse["version"]))
    assert v2.tags["gate.promoted"] == "false" and v2.tags["metric.fid"] == "25.0"

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a red fox", "a snowy owl"], "seed": [1, 2]}))
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in out["image_png_base64"]]
    assert [im.size for im in images] == [(64, 64), (64, 64)]


def test_concurrent_registrations_cannot_both_become_champion(exported, tmp_path):
    """Two processes register models with the same, better FID at once: exactly one is promoted (on a fresh server,
    so that no earlier test's registry state is involved)."""
    server, uri = _start_server(tmp_path / "server")
    try:
        _race(uri, exported, tmp_path)
    finally:
        _stop(server)


def _race(mlflow_server, exported, tmp_path):
    name = "sb2-race"
    _register(mlflow_server, exported, {"fid": 30.0, "clip_score": 0.3}, tmp_path / "base", name)
    procs = []
    for i in range(2):
        (tmp_path / f"m{i}.json").write_text(json.dumps({"fid": 10.0, "clip_score": 0.3}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sb2.cli", "register", "--model", exported, "--out", str(tmp_path / f"c{i}"),
             "-p", "tiny", "--set", f"registry.model_name={name}", "--metrics", str(tmp_path / f"m{i}.json")],
            env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, PYTHONFAULTHANDLER="1"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)  # faulthandler prints where it hung
            _, err = p.communicate()
            start = err.find("Fatal Python error")
            raise AssertionError(f"registration hung: {err[start:start + 6000]}")
        assert p.returncode == 0, err
    recs = [json.loads((tmp_path / f"c{i}" / "registration.json").read_text()) for i in range(2)]
    assert sorted(r["promoted"] for r in recs) == [False, True]


def test_served_champion_answers_and_rejects_bad_requests(mlflow_server, exported, tmp_path):
    name = "sb2-serve"
    _register(mlflow_server, exported, {"fid": 12.0, "clip_score": 0.3}, tmp_path / "r", name)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        # the scoring server is started as `uvicorn` from PATH: the environment's bin folder must be on it
        env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server,
                 PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"),
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def post(payload):
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    try:
        _wait_http(f"{url}/ping", proc, timeout=180, log=tmp_path / "serve.log")
        status, body = post({"dataframe_split": {"columns": ["prompt", "seed"], "data": [["a cat", 3]]}})
        assert status == 200, body
        png = base64.b64decode(body["predictions"][0]["image_png_base64"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        for bad, words in [
            ({"dataframe_split": {"columns": ["prompt"], "data": []}}, "no prompts"),
            ({"dataframe_split": {"columns": ["prompt"], "data": [["x"]] * 17}}, "at most 16"),
            ({"dataframe_split": {"columns": ["prompt"], "data": [["a" * 5000]]}}, "characters"),
            ({"dataframe_split": {"columns": ["prompt", "seed"], "data": [["a cat", -4]]}}, "seed"),
        ]:
            status, body = post(bad)
            assert 400 <= status < 500, (bad, status, body)
            assert words in json.dumps(body), body
        status, body = post({"dataframe_split": {"columns": ["prompt"], "data": [[1234]]}})
        assert 400 <= status < 500, body
        status, _ = post({"dataframe_split": {"columns": ["prompt"], "data": [["still serving"]]}})
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
