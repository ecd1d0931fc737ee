"""The compiled pipeline, read back from pipelines/sb2.yaml (not from our code): it is current, and the GPU requests,
node selector, tolerations, /dev/shm, PVC, secrets, retry and caching sit on the right tasks. And the launcher that
maps a TrainJob/PyTorchJob's injected variables to `accelerate launch`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sb2.kfp.launcher import accelerate_command

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "sb2.yaml"
GPU_TASKS = {"train-branch", "train-branch-2", "evaluate", "generate", "sweep-lambda"}
CPU_TASKS = {"resolve-config", "build-prompts", "merge", "register"}


@pytest.fixture(scope="module")
def spec():
    pipeline, platform = yaml.safe_load_all(COMMITTED.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(pipeline) -> dict[str, dict]:
    """Every task of the DAG (conditions included) by its name, as compiled."""
    out = {}
    for comp in [pipeline["root"], *pipeline["components"].values()]:
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def _param(ref: dict) -> str:
    """The pipeline parameter a field reads (inside a condition's sub-DAG it is passed on as pipelinechannel--x)."""
    return ref["componentInputParameter"].removeprefix("pipelinechannel--")


def test_committed_yaml_is_what_the_compiler_produces(tmp_path):
    fresh = tmp_path / "sb2.yaml"
    subprocess.run([sys.executable, str(ROOT / "pipelines" / "sb2_pipeline.py"), str(fresh)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
    assert fresh.read_text() == COMMITTED.read_text(), "pipelines/sb2.yaml is stale: run python pipelines/sb2_pipeline.py"


def test_gpu_tasks_request_gpus_on_the_gpu_pool(spec):
    pipeline, k8s = spec
    executors = pipeline["deploymentSpec"]["executors"]
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["gpus_per_train"]["defaultValue"] == 4
    for name in ("train-branch", "train-branch-2"):
        acc = executors[f"exec-{name}"]["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu"
        assert acc["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus_per_train']}}"
    for name in ("evaluate", "generate", "sweep-lambda"):
        assert executors[f"exec-{name}"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    for name in GPU_TASKS:
        e = k8s[f"exec-{name}"]
        assert _param(e["nodeSelector"]["nodeSelectorJson"]) == "gpu_node_selector"
        assert _param(e["tolerations"][0]["tolerationJson"]) == "gpu_tolerations"
        shm = e["emptyDirMounts"][0]
        assert (shm["mountPath"], shm["medium"]) == ("/dev/shm", "Memory")
    assert params["gpu_tolerations"]["defaultValue"][0]["key"] == "nvidia.com/gpu"
    for name in CPU_TASKS:  # the default pool: no GPU, no selector, no toleration
        assert "resources" not in executors[f"exec-{name}"]["container"]
        assert not {"nodeSelector", "tolerations"} & set(k8s[f"exec-{name}"])


def test_every_task_mounts_the_pvc_and_reads_secrets_from_kubernetes(spec):
    pipeline, k8s = spec
    text = COMMITTED.read_text()
    for name in GPU_TASKS | CPU_TASKS:
        e = k8s[f"exec-{name}"]
        assert e["pvcMount"][0]["mountPath"] == "/mnt/sb2"
        assert _param(e["pvcMount"][0]["pvcNameParameter"]) == "pvc_name"
        (secret,) = e["secretAsEnv"]
        assert secret["secretName"] == "sb2-credentials"
        envs = {m["envVar"] for m in secret["keyToEnv"]}
        assert {"HF_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= envs
        assert pipeline["deploymentSpec"]["executors"][f"exec-{name}"]["container"]["image"] == \
            "{{$.inputs.parameters['pipelinechannel--image']}}"
    assert "env:" not in text and "hf_" not in text  # no values, only references to the Secret


def test_retry_on_training_and_caching_off_only_for_registration(spec):
    pipeline, _ = spec
    tasks = _tasks(pipeline)
    for name in ("train-branch", "train-branch-2"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3
    assert {n for n, t in tasks.items() if "retryPolicy" in t} == {"train-branch", "train-branch-2"}
    assert tasks["register"]["cachingOptions"].get("enableCache", False) is False
    for name in GPU_TASKS | CPU_TASKS - {"register"}:
        assert tasks[name]["cachingOptions"]["enableCache"] is True
    assert "condition-1" in tasks and "sweep == true" in tasks["condition-1"]["triggerPolicy"]["condition"].replace(
        "inputs.parameter_values['pipelinechannel--", "").replace("']", "")


TRAIN = ["--scheme", "full", "-c", "/mnt/sb2/config.yaml", "--out", "/mnt/sb2/runs/x/full"]


def test_launcher_single_process_and_one_node_ddp():
    assert accelerate_command({}, 1, TRAIN) == [sys.executable, "-m", "sb2", "train", *TRAIN]
    cmd = accelerate_command({}, 4, TRAIN)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--num_machines") + 1] == "1"
    assert "--main_process_ip" not in cmd and cmd[-len(TRAIN) - 3:] == ["-m", "sb2", "train", *TRAIN]


@pytest.mark.parametrize("env", [
    {"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "sb2-train-node-0-0.sb2-train",
     "PET_MASTER_PORT": "29400", "PET_NPROC_PER_NODE": "4"},
    # a legacy PyTorchJob without elasticPolicy: replicas are nodes
    {"WORLD_SIZE": "3", "RANK": "2", "MASTER_ADDR": "sb2-train-node-0-0.sb2-train", "MASTER_PORT": "29400",
     "PET_NPROC_PER_NODE": "4"},
])
def test_launcher_script_maps_injected_variables_to_accelerate(env):
    """The TrainJob/PyTorchJob entrypoint, run as a script with the variables the operators inject."""
    r = subprocess.run([sys.executable, "-m", "sb2.kfp.launcher", "--print", "--", *TRAIN], capture_output=True,
                       text=True, check=False, env={**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
                                       "PYTHONPATH": str(ROOT), **env})
    assert r.returncode == 0, r.stderr
    cmd = json.loads(r.stdout)
    opt = {k: cmd[cmd.index(k) + 1] for k in ("--num_machines", "--machine_rank", "--num_processes",
                                              "--main_process_ip", "--main_process_port")}
    assert opt == {"--num_machines": "3", "--machine_rank": "2", "--num_processes": "12",
                   "--main_process_ip": "sb2-train-node-0-0.sb2-train", "--main_process_port": "29400"}
    assert "--multi_gpu" in cmd and cmd[-len(TRAIN) - 3:] == ["-m", "sb2", "train", *TRAIN]


def test_launcher_rejects_a_broken_topology():
    with pytest.raises(ValueError, match="PET_MASTER_ADDR"):
        accelerate_command({"PET_NNODES": "2", "PET_NODE_RANK": "0"}, 4, TRAIN)
    with pytest.raises(ValueError, match="bad topology"):
        accelerate_command({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "a"}, 4, TRAIN)
    with pytest.raises(ValueError, match="not an integer"):
        accelerate_command({"PET_NNODES": "two"}, 4, TRAIN)


def test_submit_parameters_are_typed_by_the_compiled_pipeline():
    """`sb2 submit --param`: values parsed by the compiled YAML's parameter types. (The kfp.Client call itself needs a
    Kubeflow Pipelines API server and is not tested here.)"""
    from sb2.kfp.submit import parse_params

    got = parse_params(["profile=tiny", "gpus_per_train=8", "sweep=true", "lam=0.25", "teacher=123",
                        "gpu_node_selector={pool: h100}", "overrides=[train.batch_size=4]"], COMMITTED)
    assert got == {"profile": "tiny", "gpus_per_train": 8, "sweep": True, "lam": 0.25, "teacher": "123",
                   "gpu_node_selector": {"pool": "h100"}, "overrides": ["train.batch_size=4"]}
    with pytest.raises(ValueError, match="not a parameter"):
        parse_params(["gpus=4"], COMMITTED)
    with pytest.raises(ValueError, match="name=value"):
        parse_params(["profile"], COMMITTED)


def test_a_preempted_training_fails_the_task_so_that_kfp_retries_it(tmp_path, monkeypatch):
    """On SIGTERM `sb2 train` checkpoints and exits 0 before its last step; the task must not pass that on as done."""
    import sb2.kfp.tasks as tasks

    work, student = tmp_path / "work", tmp_path / "student"
    finish = {"run": False}

    def fake_run(cmd, check, env):  # the training command: preempted, or run to its last step
        if finish["run"]:
            (work / "student").mkdir()
            (work / "train.json").write_text(json.dumps({"steps": 4}))

    monkeypatch.setattr(tasks.subprocess, "run", fake_run)
    config = tasks.pipeline_config("tiny", ["train.steps=4"])
    with pytest.raises(RuntimeError, match="stopped before step 4 .*retried task resumes"):
        tasks.train_branch(config, "full", str(tmp_path), str(work), str(student), 1)
    assert not student.exists()
    finish["run"] = True
    assert tasks.train_branch(config, "full", str(tmp_path), str(work), str(student), 1) == student / "student"
