"""The compiled pipeline, read back from pipelines/sb2.yaml (not from our code): it is current; the GPU requests,
node selector, tolerations, /dev/shm, volume, secrets, retry and caching sit on the right tasks; the volume is the
named PVC or one the run creates (and may delete); train_nodes > 1 swaps the training tasks for multi-node jobs. And
the launcher that maps a TrainJob/PyTorchJob's injected variables to `accelerate launch`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sb2.kfp.launcher import accelerate_command

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "sb2.yaml"
GPU_TASKS = {"train-branch", "train-branch-2", "evaluate", "generate", "sweep-lambda"}
# on the default pool: the multi-node tasks only create and watch their jobs, whose pods get the GPUs
CPU_TASKS = {"build-prompts", "train-multinode", "train-multinode-2", "merge", "register"}
UNMOUNTED = {"named-volume", "resolve-config"}  # they run before the volume is known


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


def _source(ref: dict) -> str:
    """What a task input reads: a pipeline parameter (or a sub-DAG input) by name, `task.output`, or a constant."""
    if "componentInputParameter" in ref:
        return _param(ref)
    if "taskOutputParameter" in ref:
        return "{producerTask}.{outputParameterKey}".format(**ref["taskOutputParameter"])
    return repr(ref["runtimeValue"]["constant"])


def _condition(task: dict) -> str:
    """A condition's CEL without the pipelinechannel plumbing: `pvc_name == ''`."""
    return re.sub(r"inputs\.parameter_values\['pipelinechannel--(\w+)'\]", r"\1", task["triggerPolicy"]["condition"])


def _conditions_above(pipeline, name: str) -> list[str]:
    """The conditions a task runs under, innermost first."""
    tasks = _tasks(pipeline)
    parent = {t: comp for comp, c in [("root", pipeline["root"]), *pipeline["components"].items()]
              for t in c.get("dag", {}).get("tasks", {})}
    out, comp = [], parent[name]
    while comp != "root":
        (holder,) = [t for t, spec in tasks.items() if spec["componentRef"]["name"] == comp]
        if "triggerPolicy" in tasks[holder]:
            out.append(_condition(tasks[holder]))
        comp = parent[holder]
    return out


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
    for name in CPU_TASKS | UNMOUNTED:  # the default pool: no GPU, no selector, no toleration
        assert "resources" not in executors[f"exec-{name}"]["container"]
        assert not {"nodeSelector", "tolerations"} & set(k8s.get(f"exec-{name}", {}))


def test_every_task_mounts_the_run_volume_and_reads_secrets_from_kubernetes(spec):
    pipeline, k8s = spec
    text = COMMITTED.read_text()
    for name in GPU_TASKS | CPU_TASKS:
        e = k8s[f"exec-{name}"]
        (mount,) = e["pvcMount"]
        assert mount["mountPath"] == "/mnt/sb2"
        # the volume resolve-config hands on: read directly in the root DAG, as a sub-DAG input under a condition
        assert _source(mount["pvcNameParameter"]) in ("resolve-config.volume", "resolve-config-volume")
        (secret,) = e["secretAsEnv"]
        assert secret["secretName"] == "sb2-credentials"
        envs = {m["envVar"] for m in secret["keyToEnv"]}
        assert {"HF_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= envs
    for name in GPU_TASKS | CPU_TASKS | UNMOUNTED:
        assert pipeline["deploymentSpec"]["executors"][f"exec-{name}"]["container"]["image"] == \
            "{{$.inputs.parameters['pipelinechannel--image']}}"
    for name in UNMOUNTED:
        assert "pvcMount" not in k8s.get(f"exec-{name}", {})
    assert "env:" not in text and "hf_" not in text  # no values, only references to the Secret


def test_the_volume_is_the_named_pvc_or_one_the_run_creates(spec):
    pipeline, _ = spec
    tasks, params = _tasks(pipeline), pipeline["root"]["inputDefinitions"]["parameters"]
    assert [params[p]["defaultValue"] for p in ("pvc_name", "pvc_size", "pvc_storage_class", "delete_pvc")] == \
        ["sb2-data", "1Ti", "standard-rwx", False]
    # empty pvc_name: kfp-kubernetes' CreatePVC, ReadWriteMany (two branches and a job's nodes mount it at once)
    assert _conditions_above(pipeline, "createpvc") == ["pvc_name == ''"]
    created = {k: _source(v) for k, v in tasks["createpvc"]["inputs"]["parameters"].items()}
    assert created == {"access_modes": "['ReadWriteMany']", "size": "pvc_size",
                       "storage_class_name": "pvc_storage_class", "pvc_name_suffix": "'-sb2'"}
    assert pipeline["deploymentSpec"]["executors"]["exec-createpvc"]["container"]["image"] == "argostub/createpvc"
    # otherwise the named one; resolve-config takes whichever branch ran (dsl.OneOf) and hands it to every task
    assert _conditions_above(pipeline, "named-volume") == ["!(pvc_name == '')"]
    assert _source(tasks["named-volume"]["inputs"]["parameters"]["name"]) == "pvc_name"
    volume = tasks["resolve-config"]["inputs"]["parameters"]["volume"]["taskOutputParameter"]
    branches = pipeline["components"][f"comp-{volume['producerTask']}"]["dag"]["outputs"]["parameters"]
    selectors = branches[volume["outputParameterKey"]]["valueFromOneof"]["parameterSelectors"]
    assert [s["outputParameterKey"] for s in selectors] == ["pipelinechannel--createpvc-name",
                                                            "pipelinechannel--named-volume-Output"]
    # delete_pvc: the created volume goes once everything else is done (with or without the sweep); a named one never
    deletes = sorted(t for t in tasks if t.startswith("deletepvc"))
    assert len(deletes) == 2
    for name in deletes:
        assert _conditions_above(pipeline, name)[:2] == ["delete_pvc == true", "pvc_name == ''"]
        assert _source(tasks[name]["inputs"]["parameters"]["pvc_name"]) == "resolve-config-volume"
        assert tasks[name]["cachingOptions"].get("enableCache", False) is False
    sweep_branches = [t for t, spec in tasks.items() if t.startswith("condition-branches")
                      and {"generate", "register"} <= set(spec.get("dependentTasks", []))]
    assert len(sweep_branches) == 1  # the sweep's If/Else, holding the deletes, waits for generate and register
    assert sorted(_conditions_above(pipeline, d)[2] for d in deletes) == ["!(sweep == true)", "sweep == true"]
    (under_sweep,) = [t for t, spec in tasks.items() if "triggerPolicy" in spec
                      and _conditions_above(pipeline, t) == ["sweep == true"] and _condition(spec) == "pvc_name == ''"]
    assert tasks[under_sweep]["dependentTasks"] == ["sweep-lambda"]


def test_train_nodes_over_one_swaps_each_training_task_for_a_multinode_job(spec):
    pipeline, _ = spec
    tasks, params = _tasks(pipeline), pipeline["root"]["inputDefinitions"]["parameters"]
    assert (params["train_nodes"]["defaultValue"], params["multinode_kind"]["defaultValue"]) == (1, "TrainJob")
    for single, multi, scheme in (("train-branch", "train-multinode", "full"),
                                  ("train-branch-2", "train-multinode-2", "lora")):
        assert _conditions_above(pipeline, multi) == ["int(train_nodes) > 1"]
        assert _conditions_above(pipeline, single) == ["!(int(train_nodes) > 1)"]
        inputs = {k: _source(v) for k, v in tasks[multi]["inputs"]["parameters"].items()}
        assert {k: inputs[k] for k in ("scheme", "nodes", "kind", "image", "gpus_per_node", "pvc_name", "mount_path",
                                       "node_selector", "tolerations", "work_root")} == {
            "scheme": repr(scheme), "nodes": "train_nodes", "kind": "multinode_kind", "image": "image",
            "gpus_per_node": "gpus_per_train", "pvc_name": "resolve-config-volume", "mount_path": "'/mnt/sb2'",
            "node_selector": "gpu_node_selector", "tolerations": "gpu_tolerations", "work_root": "work_root"}
    # merge takes each branch's student from whichever of the two ran: a OneOf of their student's URI, re-imported
    # (not a OneOf over the artifacts: see the pipeline's comment)
    executors = pipeline["deploymentSpec"]["executors"]
    for arg, single, multi in (("a", "train-branch", "train-multinode"), ("b", "train-branch-2", "train-multinode-2")):
        importer = tasks["merge"]["inputs"]["artifacts"][arg]["taskOutputArtifact"]["producerTask"]
        assert executors[f"exec-{importer}"]["importer"]["artifactUri"] == {"runtimeParameter": "uri"}
        assert not executors[f"exec-{importer}"]["importer"].get("reimport", False)
        uri = tasks[importer]["inputs"]["parameters"]["uri"]["taskOutputParameter"]
        outputs = pipeline["components"][f"comp-{uri['producerTask']}"]["dag"]["outputs"]["parameters"]
        selectors = outputs[uri["outputParameterKey"]]["valueFromOneof"]["parameterSelectors"]
        assert [s["outputParameterKey"] for s in selectors] == [f"pipelinechannel--{multi}-Output",
                                                                f"pipelinechannel--{single}-Output"]


def test_retry_on_training_and_caching_off_only_for_registration_and_volumes(spec):
    pipeline, _ = spec
    tasks = _tasks(pipeline)
    training = {"train-branch", "train-branch-2", "train-multinode", "train-multinode-2"}
    for name in training:
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3
    assert {n for n, t in tasks.items() if "retryPolicy" in t} == training
    for name in ("register", "createpvc"):
        assert tasks[name]["cachingOptions"].get("enableCache", False) is False
    for name in (GPU_TASKS | CPU_TASKS | UNMOUNTED) - {"register"}:
        assert tasks[name]["cachingOptions"]["enableCache"] is True
    assert _conditions_above(pipeline, "sweep-lambda") == ["sweep == true"]


TRAIN = ["--scheme", "full", "-c", "/mnt/sb2/config.yaml", "--out", "/mnt/sb2/runs/x/full"]


def test_launcher_single_process_and_one_node_ddp():
    assert accelerate_command({}, 1, TRAIN) == [sys.executable, "-m", "sb2", "train", *TRAIN]
    cmd = accelerate_command({}, 4, TRAIN)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--num_machines") + 1] == "1"
    assert "--main_process_ip" not in cmd and cmd[-len(TRAIN) - 3:] == ["-m", "sb2", "train", *TRAIN]


@pytest.mark.parametrize("env, launcher_args", [
    # a TrainJob (Kubeflow Trainer v2)
    ({"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "sb2-train-node-0-0.sb2-train",
      "PET_MASTER_PORT": "29400", "PET_NPROC_PER_NODE": "4"}, []),
    # a PyTorchJob with a Master, Training Operator >= 1.7: WORLD_SIZE counts processes, PET_NNODES nodes
    ({"WORLD_SIZE": "12", "RANK": "2", "MASTER_ADDR": "sb2-train-node-0-0.sb2-train", "MASTER_PORT": "29400",
      "PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "4"}, ["--gpus", "4"]),
    # the same with an older operator: replicas are nodes, and the processes a node come from --gpus
    ({"WORLD_SIZE": "3", "RANK": "2", "MASTER_ADDR": "sb2-train-node-0-0.sb2-train", "MASTER_PORT": "29400"},
     ["--gpus", "4"]),
])
def test_launcher_script_maps_injected_variables_to_accelerate(env, launcher_args):
    """The TrainJob/PyTorchJob entrypoint, run as a script with the variables the operators inject."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("PET_")}
    r = subprocess.run([sys.executable, "-m", "sb2.kfp.launcher", "--print", *launcher_args, "--", *TRAIN],
                       capture_output=True, text=True, check=False, env={**clean, "PYTHONPATH": str(ROOT), **env})
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

    def fake_run(cmd, env):  # the training command: preempted, or run to its last step
        if finish["run"]:
            (work / "student").mkdir()
            (work / "train.json").write_text(json.dumps({"steps": 4}))

    monkeypatch.setattr(tasks, "run_forwarding_signals", fake_run)
    config = tasks.pipeline_config("tiny", ["train.steps=4"])
    with pytest.raises(RuntimeError, match="stopped before step 4 .*retried task resumes"):
        tasks.train_branch(config, "full", str(tmp_path), str(work), str(student), 1)
    assert not student.exists()
    finish["run"] = True
    assert tasks.train_branch(config, "full", str(tmp_path), str(work), str(student), 1) == student / "student"


def test_the_training_task_passes_sigterm_on_to_the_training_process(tmp_path):
    """Kubernetes signals the task's main process only; the training process must get the SIGTERM to checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    child = ("import signal, sys, time, pathlib\n"
             "def stop(s, f):\n"
             f"    pathlib.Path({str(tmp_path / 'got')!r}).write_text(str(s)); sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
             "time.sleep(60)\n")
    task = ("import sys; from sb2.kfp.tasks import run_forwarding_signals\n"
            f"run_forwarding_signals([sys.executable, '-c', {child!r}], {{}})\n"
            "print('task done')\n")
    proc = subprocess.Popen([sys.executable, "-c", task], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert (tmp_path / "got").read_text() == str(int(signal.SIGTERM))
    assert proc.returncode == 0 and "task done" in out
