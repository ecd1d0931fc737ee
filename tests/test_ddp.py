"""Two training processes on CPU, launched as in production (`accelerate launch --multi_gpu`, DDP over gloo here):
one shared state and one state per process in each checkpoint, exact resume after every process is SIGKILLed, a
change of world size, SIGTERM reaching only one of the processes, the `train.ddp` settings reaching both DDP wrappers
without changing a bit of the result, and a non-finite loss on one process skipping the step on both."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from sb2.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SETS = ("train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=3", "tracking.enabled=false")


# `sb2 train` with every process writing down its DDP wrappers as accelerate built them, and optionally a NaN loss on
# one process at one step (SB2_NAN_RANK, SB2_NAN_STEP).
RECORDING = """
import json, os, sys
from pathlib import Path

import accelerate
import torch

import sb2.train.loop as loop

prepare, student_step = accelerate.Accelerator.prepare, loop.student_step


def recording_prepare(self, *args, **kwargs):
    out = prepare(self, *args, **kwargs)
    wrappers = [{"bucket_bytes_cap": d.bucket_bytes_cap, "gradient_as_bucket_view": d.gradient_as_bucket_view,
                 "static_graph": d.static_graph, "comm_hooks": [h.__qualname__ for h, _ in d._comm_hooks]}
                for d in out if isinstance(d, torch.nn.parallel.DistributedDataParallel)]
    Path(os.environ["SB2_RECORD"], f"ddp-rank-{os.environ['RANK']}.json").write_text(json.dumps(wrappers))
    return out


def flaky(m, cfg, emb, null, prompts, step, autocast, reg=None):
    out = student_step(m, cfg, emb, null, prompts, step, autocast, reg=reg)
    if os.environ["RANK"] == os.environ.get("SB2_NAN_RANK") and step == int(os.environ["SB2_NAN_STEP"]):
        out = out._replace(loss=out.loss * float("nan"))
    return out


end_training = accelerate.Accelerator.end_training


def dumping_end_training(self):  # every process writes its LoRA weights down (SB2_DUMP_LORA set)
    if os.environ.get("SB2_DUMP_LORA"):
        for i, model in enumerate(self._models):
            inner = getattr(model, "module", model)
            lora = {k: v.detach().cpu() for k, v in inner.named_parameters() if "lora_" in k}
            torch.save(lora, Path(os.environ["SB2_RECORD"], f"lora-{i}-rank-{os.environ['RANK']}.pt"))
    return end_training(self)


accelerate.Accelerator.prepare, loop.student_step = recording_prepare, flaky
accelerate.Accelerator.end_training = dumping_end_training
from sb2.cli import main

main()
"""
OPTIONS = ("train.ddp.bucket_cap_mb=0.05", "train.ddp.gradient_as_bucket_view=true", "train.ddp.static_graph=true")


def _launch(out: Path, *sets: str, processes: int = 2, script: Path | None = None,
            scheme: str = "lora") -> list[str]:
    what = [str(script)] if script is not None else ["-m", "sb2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--num_processes", str(processes), "--main_process_port", "0", "--mixed_precision", "no",
           "--dynamo_backend", "no", *what, "train", "--scheme", scheme, "-p", "tiny", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env(**extra: str):
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: nobody reads it while the run goes on
        return subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared: "
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.02)


def _workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes under the launcher, by rank (torchrun starts each in a session of its own)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    return {int(k.environ()["RANK"]): k for k in kids if "RANK" in k.environ()}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{part}.{k}": v for part in ("student", "lora_teacher")
            for k, v in load_file(str(run / part / "adapter_model.safetensors")).items()}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_world):  # tiny_world: built before two processes look for it
    run = tmp_path_factory.mktemp("ddp") / "unbroken"
    _run(_launch(run, *SETS))
    return run


def test_each_checkpoint_holds_one_shared_state_and_one_state_per_process(unbroken):
    saved = ckpt.list_checkpoints(unbroken)
    assert [s for s, _ in saved] == [4, 5, 6]
    for step, path in saved:
        assert sorted(p.name for p in path.iterdir()) == ["MANIFEST.json", "rank-0.pt", "rank-1.pt", "state.pt"]
        assert ckpt.verify(path)["world_size"] == 2
    r0, r1 = (ckpt.load_checkpoint(saved[-1][1], k) for k in (0, 1))
    assert r0.shared["step"] == 6
    # each process draws its own noise and prompts (seed + rank): the same position, different random streams
    assert r0.rank["sampler"] == r1.rank["sampler"]
    assert not torch.equal(r0.rank["rng"]["torch"], r1.rank["rng"]["torch"])
    assert not torch.equal(r0.rank["rng"]["numpy"]["keys"], r1.rank["rng"]["numpy"]["keys"])
    assert r0.rank["rng"]["python"] != r1.rank["rng"]["python"]


def test_a_checkpoint_with_a_bad_process_state_is_skipped_for_the_previous(unbroken, tmp_path):
    shutil.copytree(unbroken / "checkpoints", tmp_path / "checkpoints")
    newest = ckpt.list_checkpoints(tmp_path)[-1][1]
    data = bytearray((newest / "rank-1.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "rank-1.pt").write_bytes(bytes(data))
    warnings = []
    assert ckpt.find_latest_good(tmp_path, warn=warnings.append).step == 5
    assert "rank-1.pt does not match its checksum" in warnings[0]
    (newest / "rank-1.pt").unlink()
    assert ckpt.find_latest_good(tmp_path, warn=warnings.append).step == 5
    assert "rank-1.pt is missing" in warnings[-1]


def test_sigkill_of_every_process_then_resume_is_bitwise_equal_to_an_unbroken_run(unbroken, tmp_path):
    kill_after = random.randint(1, 4)
    broken, log = tmp_path / "broken", tmp_path / "broken.log"
    proc = _start(_launch(broken, *SETS), log)
    _wait_for(broken / "checkpoints" / ckpt.checkpoint_name(kill_after), proc, log)
    everyone = [*_workers(proc).values(), psutil.Process(proc.pid)]
    for p in everyone:  # a node lost: every process at once, the launcher too
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(everyone, timeout=30)
    proc.wait()
    assert not (broken / "student").exists(), f"the run finished before SIGKILL (after step {kill_after})"
    r = _run(_launch(broken, *SETS))
    assert "resuming from" in r.stderr
    a, b = _weights(unbroken), _weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after SIGKILL at step {kill_after} and resume"


def test_a_different_world_size_is_refused_unless_asked_for(unbroken, tiny_cfg, tmp_path, capsys):
    from typer.testing import CliRunner

    from sb2.cli import app
    from sb2.train.loop import train

    shutil.copytree(unbroken / "checkpoints", tmp_path / "checkpoints")
    r = CliRunner().invoke(app, ["train", "--scheme", "lora", "-p", "tiny", "--out", str(tmp_path),
                                 "--set", "train.steps=7"])
    assert r.exit_code == 2, r.output
    line, = r.output.strip().splitlines()
    assert "written by 2 process(es), this run has 1: run with 2 processes" in line
    assert "checkpoint.world_size_change=resume" in line
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5, 6] and not (tmp_path / "student").exists()

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.steps, cfg.checkpoint.world_size_change, cfg.tracking.enabled = 7, "resume", False
    capsys.readouterr()
    train(cfg, "lora", tmp_path, progress=False)
    err = capsys.readouterr().err
    assert "resuming its models, optimizers and step" in err and "(step 6)" in err
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 7
    assert ckpt.verify(ckpt.list_checkpoints(tmp_path)[-1][1])["world_size"] == 1


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = _start(_launch(run, "train.steps=100000", "checkpoint.every=100000", "tracking.enabled=false"), log)
    _wait_for(run / "checkpoints" / ckpt.checkpoint_name(1), proc, log)
    t0 = time.monotonic()
    _workers(proc)[1].send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert time.monotonic() - t0 < 30  # checkpoint.grace_period_s
    out = log.read_text()
    assert "a signal to another process: checkpoint at step" in out
    step, path = ckpt.list_checkpoints(run)[-1]
    assert step >= 2 and ckpt.verify(path)["world_size"] == 2


def _recording(tmp_path: Path) -> Path:
    script = tmp_path / "recording_sb2.py"
    script.write_text(RECORDING)
    return script


def _script_env(folder: Path, **extra: str) -> dict[str, str]:
    # a script's own folder, not the working directory, heads its import path: name this checkout
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SB2_RECORD": str(folder), **extra}


def _recorded(folder: Path) -> list[list[dict]]:
    return [json.loads((folder / f"ddp-rank-{r}.json").read_text()) for r in (0, 1)]


def test_ddp_settings_reach_both_wrappers_change_no_bit_and_resume_exactly(unbroken, tmp_path):
    """bucket_cap_mb, gradient_as_bucket_view and static_graph on the student and the LoRA teacher: buckets of 50 KB
    (many, where the default makes one), gradients as views into them, zero_grad(set_to_none) between steps and a
    checkpoint at every step; the weights are those of the run with the defaults, and so is a resume."""
    script, run = _recording(tmp_path), tmp_path / "options"
    _run(_launch(run, *SETS, *OPTIONS, script=script), **_script_env(tmp_path))
    wrappers = _recorded(tmp_path)
    assert wrappers[0] == wrappers[1] and len(wrappers[0]) == 2  # the student and the LoRA teacher, on each process
    for w in wrappers[0]:
        assert w == {"bucket_bytes_cap": int(0.05 * 1024 * 1024), "gradient_as_bucket_view": True,
                     "static_graph": True, "comm_hooks": []}
    a, b = _weights(unbroken), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs with {OPTIONS}"

    # resume from step 4 with the same settings: the same weights again
    for step, path in ckpt.list_checkpoints(run):
        if step > 4:
            shutil.rmtree(path)
    for part in ("student", "lora_teacher"):
        shutil.rmtree(run / part)
    r = _run(_launch(run, *SETS, *OPTIONS))
    assert "resuming from" in r.stderr and "(step 4)" in r.stderr
    b = _weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a resume with {OPTIONS}"


def test_a_nan_loss_on_one_process_skips_the_step_on_both(tmp_path):
    """No collective before the backward: the NaN reaches the other process through the gradients' all-reduce
    (here compressed to bf16 by the comm hook, with static_graph on), and both skip the same step, both optimizers
    untouched, then go on together."""
    script, run = _recording(tmp_path), tmp_path / "nan"
    sets = ("train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=5", "tracking.enabled=false")
    r = _run(_launch(run, *sets, *OPTIONS, "train.ddp.comm_hook=bf16", script=script, scheme="full"),
             **_script_env(tmp_path, SB2_NAN_RANK="1", SB2_NAN_STEP="2"))
    for wrappers in _recorded(tmp_path):
        assert [w["comm_hooks"] for w in wrappers] == [["bf16_compress_hook"]] * 2
    out = r.stdout + r.stderr
    # each process prints its own warning: both took the skip
    assert out.count("warning: step 3: non-finite loss or gradient, update skipped (1 in a row)") == 2, out[-3000:]
    assert out.count("non-finite") == 2
    assert json.loads((run / "train.json").read_text())["nonfinite_skips"] == 1
    states = {s: ckpt.load_checkpoint(p, 0).shared for s, p in ckpt.list_checkpoints(run)}
    assert sorted(states) == [1, 2, 4]  # no checkpoint after a non-finite step
    assert states[4]["nonfinite_skips"] == 1

    def updates(state: dict, opt: str) -> int:
        return int(next(iter(state[opt]["state"].values()))["step"])

    for opt in ("opt_student", "opt_lora_teacher"):  # 3 updates in 4 steps, of both optimizers
        assert [updates(states[s], opt) for s in (1, 2, 4)] == [1, 2, 3], opt


def test_the_shared_lora_pass_all_reduces_the_lora_teachers_gradients(tmp_path):
    """vsd.shared_lora_pass under DDP: the LoRA teacher's pass runs through its DDP wrapper, so both processes (each
    with its own prompts) end with the same LoRA teacher; a pass around the wrapper would leave them apart."""
    script, run = _recording(tmp_path), tmp_path / "shared"
    sets = ("train.steps=3", "tracking.enabled=false", "vsd.shared_lora_pass=true")
    _run(_launch(run, *sets, script=script, scheme="full"), **_script_env(tmp_path, SB2_DUMP_LORA="1"))
    dumps = {r: torch.load(tmp_path / f"lora-1-rank-{r}.pt") for r in (0, 1)}
    assert dumps[0] and dumps[0].keys() == dumps[1].keys()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in dumps[0].items())  # it was trained
    for k in dumps[0]:
        assert torch.equal(dumps[0][k], dumps[1][k]), k
