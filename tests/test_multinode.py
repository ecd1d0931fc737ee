"""Multi-node training from the pipeline (sb2/kfp/multinode.py) without a cluster: the job built from the package's
template validates against the TrainJob/PyTorchJob API models with every field the pipeline sets; the phase read from
real status shapes (those the Trainer and Training Operator controllers write, checked against their status models);
the wait loop's success, failure and timeout; create-or-reattach for a retried task; and the task itself against a
fake Kubernetes API that plays the operator."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from training_jobs import validate_training_job

from sb2.kfp.multinode import (JobFailed, Jobs, JobState, build_job, job_name, job_state, load_template, submit,
                               train_multinode, wait_for_job)

TRAIN = ["--scheme", "lora", "-c", "/mnt/sb2/runs/r1/lora.config.yaml", "--out", "/mnt/sb2/runs/r1/lora"]
POOL = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _build(kind, nodes=3, gpus=8, **kw):
    return build_job(kind, name="sb2-lora-0123456789", namespace="team-a", image="registry.example.com/sb2:v2",
                     train_args=TRAIN, nodes=nodes, gpus_per_node=gpus, pvc_name="a1b2-sb2", mount_path="/mnt/sb2",
                     node_selector=POOL, tolerations=TOLERATIONS, labels={"sb2/scheme": "lora"}, **kw)


def test_trainjob_is_the_template_with_the_pipeline_fields_filled():
    job = _build("TrainJob")
    (pod,) = validate_training_job(job)
    assert job["metadata"] == {"name": "sb2-lora-0123456789", "namespace": "team-a", "labels": {"sb2/scheme": "lora"}}
    t = job["spec"]["trainer"]
    assert (t["image"], t["args"], t["numNodes"], t["numProcPerNode"]) == ("registry.example.com/sb2:v2", TRAIN, 3, 8)
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == "a1b2-sb2"
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["data"] == "/mnt/sb2"
    assert (pod["nodeSelector"], pod["tolerations"]) == (POOL, TOLERATIONS)
    # everything else comes from the template unchanged: one source of truth with manifests/
    template = load_template("TrainJob")
    assert job["spec"]["runtimeRef"] == template["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert t["command"] == template["spec"]["trainer"]["command"] and t["env"] == template["spec"]["trainer"]["env"]
    assert load_template("TrainJob") == template  # building did not touch the template


def test_pytorchjob_has_a_master_and_n_minus_one_workers():
    job = _build("PyTorchJob", nodes=3, gpus=8)
    pods = validate_training_job(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"], len(pods)) == (1, 2, 2)
    assert job["spec"]["nprocPerNode"] == "8"
    for pod in pods:
        (c,) = pod["containers"]
        assert (c["image"], c["args"]) == ("registry.example.com/sb2:v2", TRAIN)
        assert c["command"] == ["python", "-m", "sb2.kfp.launcher", "--gpus", "8", "--"]
        assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == "a1b2-sb2"
        assert pod["nodeSelector"] == POOL
    one = _build("PyTorchJob", nodes=1, gpus=2)
    assert set(one["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    validate_training_job(one)


def test_bad_kind_or_topology_is_refused():
    with pytest.raises(ValueError, match="TrainJob, PyTorchJob"):
        _build("MPIJob")
    with pytest.raises(ValueError, match="bad topology"):
        _build("TrainJob", nodes=0)


def test_job_names_are_stable_per_run_and_branch_and_valid_labels():
    run = "6f1c0a52-9b7e-4c1e-b0f5-7f0f5e1c9a11"  # a KFP run id
    a, b = job_name(run, "full"), job_name(run, "lora")
    assert a == job_name(run, "full") and a != b
    assert a != job_name("another-run", "full")
    for n in (a, b):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) and len(n) <= 40


def _cond(ctype, status="True", reason="", message=""):
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-05-13T10:26:00Z"}


def _node(active=0, ready=0, succeeded=0, failed=0):
    return {"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed, "suspended": 0}


# Status shapes as the controllers write them: TrainJob conditions are copied from its JobSet (reasons
# AllJobsCompleted / FailedJobs), jobsStatus from the JobSet's replicated jobs; PyTorchJob conditions carry
# lastUpdateTime too, and replicaStatuses per replica type.
TRAINJOB_STATUSES = [
    (None, "Pending", ""),
    ({"jobsStatus": [_node()]}, "Pending", ""),
    ({"conditions": [_cond("Suspended", reason="Suspended", message="TrainJob is suspended")]}, "Pending",
     "Suspended"),
    ({"conditions": [_cond("Suspended", "False", "Resumed", "TrainJob is resumed")],
      "jobsStatus": [_node(active=3, ready=3)]}, "Running", ""),
    ({"conditions": [_cond("Complete", reason="AllJobsCompleted", message="jobset completed successfully")],
      "jobsStatus": [_node(succeeded=1)]}, "Succeeded", "AllJobsCompleted"),
    ({"conditions": [_cond("Failed", reason="FailedJobs", message="jobset failed due to one or more job failures")],
      "jobsStatus": [_node(failed=1)]}, "Failed", "FailedJobs"),
]


def _ptj_cond(ctype, status="True", reason="", message=""):
    return {**_cond(ctype, status, reason, message), "lastUpdateTime": "2026-05-13T10:26:00Z"}


PYTORCHJOB_STATUSES = [
    ({}, "Pending", ""),
    ({"conditions": [_ptj_cond("Created", reason="PyTorchJobCreated", message="PyTorchJob sb2/x is created.")],
      "replicaStatuses": {"Master": {}, "Worker": {}}}, "Pending", ""),
    ({"conditions": [_ptj_cond("Created", reason="PyTorchJobCreated"),
                     _ptj_cond("Running", reason="PyTorchJobRunning", message="PyTorchJob sb2/x is running.")],
      "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 2}}, "startTime": "2026-05-13T10:27:00Z"},
     "Running", "PyTorchJobRunning"),
    ({"conditions": [_ptj_cond("Created", reason="PyTorchJobCreated"),
                     _ptj_cond("Running", "False", "PyTorchJobRunning"),
                     _ptj_cond("Restarting", reason="PyTorchJobRestarting",
                               message="PyTorchJob sb2/x is restarting because 1 Worker replica(s) failed.")],
      "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1, "failed": 1}}}, "Running",
     "PyTorchJobRestarting"),
    ({"conditions": [_ptj_cond("Created", reason="PyTorchJobCreated"),
                     _ptj_cond("Running", "False", "PyTorchJobRunning"),
                     _ptj_cond("Succeeded", reason="PyTorchJobSucceeded",
                               message="PyTorchJob sb2/x successfully completed.")],
      "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 2}},
      "completionTime": "2026-05-13T12:00:00Z"}, "Succeeded", "PyTorchJobSucceeded"),
    ({"conditions": [_ptj_cond("Created", reason="PyTorchJobCreated"),
                     _ptj_cond("Running", "False", "PyTorchJobRunning"),
                     _ptj_cond("Failed", reason="PyTorchJobFailed",
                               message="PyTorchJob sb2/x is failed because 1 Master replica(s) failed.")],
      "replicaStatuses": {"Master": {"failed": 1}, "Worker": {"active": 2}}}, "Failed", "PyTorchJobFailed"),
]


@pytest.mark.parametrize("status, phase, reason", TRAINJOB_STATUSES)
def test_trainjob_phase_from_its_status(status, phase, reason):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJobStatus

    if status:  # the fixture is a status the API accepts
        assert TrainerV1alpha1TrainJobStatus.from_dict(status) is not None
    state = job_state("TrainJob", status)
    assert (state.phase, state.reason) == (phase, reason)
    assert state.finished == (phase in ("Succeeded", "Failed"))


@pytest.mark.parametrize("status, phase, reason", PYTORCHJOB_STATUSES)
def test_pytorchjob_phase_from_its_status(status, phase, reason):
    from kubeflow.training import ApiClient

    client = ApiClient()
    if status:  # the fixture is a status the API accepts, field for field
        parsed = client._ApiClient__deserialize(status, "KubeflowOrgV1JobStatus")
        assert client.sanitize_for_serialization(parsed).keys() == status.keys()
    state = job_state("PyTorchJob", status)
    assert (state.phase, state.reason) == (phase, reason)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def _waiter(statuses, timeout_s=1000.0):
    seq, clock, log = iter(statuses), Clock(), []
    result = lambda: wait_for_job(lambda: next(seq), "TrainJob", "sb2-x", timeout_s, poll_s=30,  # noqa: E731
                                  sleep=clock.sleep, clock=clock, log=log.append)
    return result, clock, log


def test_wait_returns_on_success_and_logs_each_phase_once():
    pending, running, done = (s for s, _, _ in (TRAINJOB_STATUSES[1], TRAINJOB_STATUSES[3], TRAINJOB_STATUSES[4]))
    wait, clock, log = _waiter([pending, running, running, running, done])
    assert wait() == JobState("Succeeded", "AllJobsCompleted", "jobset completed successfully")
    assert clock.t == 120 and len(log) == 3 and log[-1].startswith("TrainJob sb2-x: Succeeded (AllJobsCompleted")


def test_wait_raises_the_failure_reason():
    wait, _, _ = _waiter([TRAINJOB_STATUSES[3][0], TRAINJOB_STATUSES[5][0]])
    with pytest.raises(JobFailed, match="sb2-x failed: FailedJobs: jobset failed due to one or more job failures"):
        wait()


def test_wait_times_out():
    running = TRAINJOB_STATUSES[3][0]
    wait, clock, _ = _waiter([running] * 100, timeout_s=100)
    with pytest.raises(TimeoutError, match="did not finish in 100 s .last phase Running"):
        wait()
    assert clock.t == 120  # polled at 0, 30, 60, 90, 120


class FakeApi:
    """CustomObjectsApi in memory; ``play`` stands in for the operator when a job is read."""

    def __init__(self, play=None):
        self.objects, self.created, self.deleted, self.play = {}, [], [], play

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        key = (plural, namespace, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[key] = copy.deepcopy(body)
        self.created.append(key)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if (plural, namespace, name) not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        obj = self.objects[(plural, namespace, name)]
        if self.play:
            self.play(obj)
        return obj

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        if self.objects.pop((plural, namespace, name), None) is None:
            raise ApiException(status=404, reason="NotFound")
        self.deleted.append((plural, namespace, name))


@pytest.mark.parametrize("existing, recreated", [(None, True), (TRAINJOB_STATUSES[3][0], False),
                                                 (TRAINJOB_STATUSES[4][0], False), (TRAINJOB_STATUSES[5][0], True)])
def test_a_retried_task_reattaches_to_its_job_unless_it_failed(existing, recreated):
    api, job = FakeApi(), _build("TrainJob")
    jobs = Jobs(api, "TrainJob", "team-a")
    if existing is not None:
        api.objects[("trainjobs", "team-a", job["metadata"]["name"])] = {**copy.deepcopy(job), "status": existing}
    submit(jobs, job, sleep=lambda s: None, log=lambda s: None)
    assert (len(api.created) == 1) == recreated
    assert bool(api.deleted) == (existing is not None and recreated)
    assert jobs.get(job["metadata"]["name"]) is not None


def test_train_multinode_writes_config_and_prompts_to_the_volume_and_collects_the_student(tmp_path):
    """The task against a fake cluster whose 'operator' runs the job by writing what `sb2 train --out` would. The
    volume is a folder here, mounted at the same path in the task and in the job's nodes."""
    from sb2.kfp.tasks import pipeline_config

    volume = tmp_path / "pvc"
    prompts = tmp_path / "artifact" / "prompts"
    (prompts / "train").mkdir(parents=True)
    (prompts / "train" / "part-0.txt").write_text("a cat\n")
    seen = {}

    def operator(obj):
        if "status" not in obj:  # first read: running; the next: done, with the branch written on the volume
            obj["status"] = TRAINJOB_STATUSES[3][0]
            return
        args = obj["spec"]["trainer"]["args"]
        seen.update(obj=copy.deepcopy(obj), config=yaml.safe_load(open(args[args.index("-c") + 1])))
        out = Path(args[args.index("--out") + 1])
        (out / "student").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "step-00000004").mkdir(parents=True, exist_ok=True)
        (out / "train.json").write_text(json.dumps({"steps": seen["config"]["train"]["steps"]}))  # a finished run
        obj["status"] = TRAINJOB_STATUSES[4][0]

    student = train_multinode(pipeline_config("tiny", []), "lora", str(prompts), str(volume), "run-1",
                              str(tmp_path / "student"), kind="TrainJob", image="sb2:test", nodes=2, gpus_per_node=4,
                              pvc_name="vol", mount_path=str(volume), node_selector=POOL, tolerations=TOLERATIONS,
                              timeout_s=60, api=FakeApi(operator), namespace="team-a", poll_s=0)
    assert student == tmp_path / "student" / "student" and student.is_dir()
    assert not (tmp_path / "student" / "checkpoints").exists()  # the checkpoints stay on the volume
    job = seen["obj"]
    assert job["metadata"]["name"] == job_name("run-1", "lora") and job["metadata"]["namespace"] == "team-a"
    assert job["spec"]["trainer"]["args"][-2:] == ["--out", str(volume / "runs" / "run-1" / "lora")]
    # the nodes read the prompt set from the volume, not from the task's local artifact
    assert seen["config"]["train"]["prompts"] == str(volume / "runs" / "run-1" / "prompts")
    assert (volume / "runs" / "run-1" / "prompts" / "train" / "part-0.txt").read_text() == "a cat\n"
    validate_training_job({k: v for k, v in job.items() if k != "status"})


def test_a_cancelled_task_deletes_its_job(tmp_path):
    """KFP stops a cancelled run's pods with SIGTERM: the job and its GPUs go with the waiting task."""
    import os
    import signal

    from sb2.kfp.multinode import _delete_on_sigterm

    api, job = FakeApi(), _build("TrainJob")
    jobs = Jobs(api, "TrainJob", "team-a")
    jobs.create(job)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        with _delete_on_sigterm(jobs, job["metadata"]["name"]):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 5)  # not reached: the handler raises first
    assert stopped.value.code == 128 + signal.SIGTERM
    assert api.deleted == [("trainjobs", "team-a", job["metadata"]["name"])]
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_job_past_its_timeout_is_deleted_and_the_task_fails(tmp_path):
    from sb2.kfp.tasks import pipeline_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    api = FakeApi(lambda obj: obj.setdefault("status", TRAINJOB_STATUSES[3][0]))  # runs forever
    with pytest.raises(TimeoutError, match="did not finish in 0 s"):
        train_multinode(pipeline_config("tiny", []), "full", str(prompts), str(tmp_path), "run-1",
                        str(tmp_path / "student"), kind="TrainJob", image="sb2:test", nodes=2, gpus_per_node=1,
                        pvc_name="vol", mount_path=str(tmp_path), node_selector={}, tolerations=[], timeout_s=0,
                        api=api, namespace="team-a", poll_s=0)
    assert api.deleted == [("trainjobs", "team-a", job_name("run-1", "full"))] and not api.objects
    # the prompt file was staged next to the run, where the nodes read it
    assert (tmp_path / "runs" / "run-1" / "prompts.txt").read_text() == "a cat\n"


def test_a_job_deleted_under_the_task_fails_it_clearly(tmp_path):
    from sb2.kfp.tasks import pipeline_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    api = FakeApi()
    api.play = lambda obj: api.objects.clear()  # someone runs kubectl delete after the first look
    with pytest.raises(JobFailed, match="was deleted while the pipeline waited for it"):
        train_multinode(pipeline_config("tiny", []), "full", str(prompts), str(tmp_path), "run-1",
                        str(tmp_path / "student"), kind="PyTorchJob", image="sb2:test", nodes=2, gpus_per_node=1,
                        pvc_name="vol", mount_path=str(tmp_path), node_selector={}, tolerations=[], timeout_s=60,
                        api=api, namespace="team-a", poll_s=0)
