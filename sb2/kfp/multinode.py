"""Multi-node training launched from the pipeline: the ``train_multinode`` task builds a Kubeflow Trainer ``TrainJob``
(or a legacy ``PyTorchJob``) from the same template that ``kubectl apply -k manifests/...`` applies
(``sb2/kfp/jobs/``), creates it with the Kubernetes API, waits for it and hands its student on as a Model artifact.

The parts a test can check without a cluster are pure: :func:`build_job` (template + image, command, nodes, GPUs, PVC,
node selector, tolerations → the object), :func:`job_state` (a status → Pending/Running/Succeeded/Failed) and
:func:`wait_for_job` (polling with a timeout, over any status reader). :func:`train_multinode` wires them to the
cluster: in-cluster credentials, the pod's namespace, create-or-reattach (a retried task finds its job by name),
delete on SIGTERM (a cancelled run stops its GPUs; the checkpoints stay on the volume) and on timeout.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

GPU = "nvidia.com/gpu"
LAUNCHER = ["python", "-m", "sb2.kfp.launcher"]
# kind → (API group, version, plural, template); the RBAC in manifests/base/rbac.yaml names the same resources.
KINDS = {"TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "trainjob.yaml"),
         "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs", "pytorchjob.yaml")}
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _kind(kind: str) -> tuple[str, str, str, str]:
    if kind not in KINDS:
        raise ValueError(f"multinode kind {kind!r}: expected one of {', '.join(KINDS)}")
    return KINDS[kind]


def load_template(kind: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files("sb2.kfp").joinpath("jobs", _kind(kind)[3]).read_text())


def job_name(run_id: str, scheme: str) -> str:
    """One name per (run, branch), so a retried task finds the job its first attempt created. A DNS-1035 label well
    under 63 characters: the operators derive pod and service names from it."""
    return f"sb2-{scheme}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def _named(items: list[dict], name: str) -> dict:
    (item,) = [i for i in items if i["name"] == name]
    return item


def _fill_pod(pod: dict, pvc_name: str, mount_path: str, node_selector: Mapping[str, str],
              tolerations: Sequence[Mapping], container: str) -> dict:
    pod["nodeSelector"] = dict(node_selector)
    pod["tolerations"] = [dict(t) for t in tolerations]
    _named(pod["volumes"], "data")["persistentVolumeClaim"]["claimName"] = pvc_name
    _named(_named(pod["containers"], container)["volumeMounts"], "data")["mountPath"] = mount_path
    return _named(pod["containers"], container)


def build_job(kind: str, *, name: str, namespace: str, image: str, train_args: Sequence[str], nodes: int,
              gpus_per_node: int, pvc_name: str, mount_path: str, node_selector: Mapping[str, str],
              tolerations: Sequence[Mapping], labels: Mapping[str, str] | None = None,
              template: dict | None = None) -> dict[str, Any]:
    """The job object for ``sb2 train <train_args>`` on ``nodes`` nodes of ``gpus_per_node`` GPUs each, every node
    mounting ``pvc_name`` at ``mount_path``: the template's fields replaced, nothing else changed."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"bad topology: {nodes} nodes of {gpus_per_node} GPUs")
    job = copy.deepcopy(template if template is not None else load_template(kind))
    job["metadata"] = {"name": name, "namespace": namespace, **({"labels": dict(labels)} if labels else {})}
    spec, gpus = job["spec"], str(gpus_per_node)
    if kind == "TrainJob":
        trainer = spec["trainer"]
        trainer.update(image=image, args=list(train_args), numNodes=nodes, numProcPerNode=gpus_per_node)
        trainer["resourcesPerNode"]["limits"][GPU] = gpus
        (patch,) = spec["runtimePatches"]
        (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        _fill_pod(node["template"]["spec"]["template"]["spec"], pvc_name, mount_path, node_selector, tolerations,
                  "node")
    elif kind == "PyTorchJob":
        spec["nprocPerNode"] = gpus
        replicas = spec["pytorchReplicaSpecs"]
        if nodes == 1:
            del replicas["Worker"]
        for role, spec_ in replicas.items():
            spec_["replicas"] = 1 if role == "Master" else nodes - 1
            c = _fill_pod(spec_["template"]["spec"], pvc_name, mount_path, node_selector, tolerations, "pytorch")
            c.update(image=image, command=[*LAUNCHER, "--gpus", gpus, "--"], args=list(train_args))
            c["resources"]["limits"][GPU] = gpus
    else:
        _kind(kind)
    return job


@dataclass(frozen=True)
class JobState:
    phase: str  # Pending | Running | Succeeded | Failed
    reason: str = ""
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def _true(conditions: list[dict], kind: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def job_state(kind: str, status: Mapping[str, Any] | None) -> JobState:
    """The phase of a job from its ``status``. TrainJob: conditions ``Complete``/``Failed`` (copied from its JobSet)
    and ``Suspended`` (e.g. queued by Kueue), else ``jobsStatus[].active`` tells running from pending. PyTorchJob:
    conditions ``Created``/``Running``/``Restarting``/``Succeeded``/``Failed``, the newest ones ``True``."""
    _kind(kind)
    status = status or {}
    conditions = list(status.get("conditions") or [])
    done = {"TrainJob": "Complete", "PyTorchJob": "Succeeded"}[kind]
    for phase, ctype in (("Failed", "Failed"), ("Succeeded", done)):
        if c := _true(conditions, ctype):
            return JobState(phase, c.get("reason", ""), c.get("message", ""))
    if kind == "TrainJob":
        if c := _true(conditions, "Suspended"):
            return JobState("Pending", c.get("reason", ""), c.get("message", ""))
        active = sum(int(j.get("active") or 0) for j in status.get("jobsStatus") or [])
        return JobState("Running" if active else "Pending")
    for ctype in ("Running", "Restarting"):
        if c := _true(conditions, ctype):
            return JobState("Running", c.get("reason", ""), c.get("message", ""))
    return JobState("Pending")


class JobFailed(RuntimeError):
    pass


def wait_for_job(read_status: Callable[[], Mapping | None], kind: str, name: str, timeout_s: float,
                 poll_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> JobState:
    """Poll until the job succeeds (returned), fails (:class:`JobFailed` with its reason and message) or
    ``timeout_s`` passes (:class:`TimeoutError`). Each change of phase is logged once."""
    deadline, last = clock() + timeout_s, None
    while True:
        state = job_state(kind, read_status())
        if state != last:
            log(f"{kind} {name}: {state.phase}" + (f" ({state.reason}: {state.message})" if state.reason else ""))
            last = state
        if state.phase == "Succeeded":
            return state
        if state.phase == "Failed":
            raise JobFailed(f"{kind} {name} failed: {state.reason or 'no reason given'}: {state.message} "
                            f"(kubectl describe {kind.lower()} {name}; its checkpoints stay on the volume)")
        if clock() >= deadline:
            raise TimeoutError(f"{kind} {name} did not finish in {timeout_s:.0f} s (last phase {state.phase})")
        sleep(poll_s)


class Jobs:
    """create/get/delete of one kind in one namespace through ``kubernetes.client.CustomObjectsApi``."""

    def __init__(self, api, kind: str, namespace: str):
        self.api, self.kind, self.namespace = api, kind, namespace
        self.group, self.version, self.plural, _ = _kind(kind)

    def _args(self):
        return self.group, self.version, self.namespace, self.plural

    def create(self, job: dict) -> bool:
        """Create the job; False if one of that name exists already."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.create_namespaced_custom_object(*self._args(), job)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def get(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(*self._args(), name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(*self._args(), name, propagation_policy="Foreground")
        except ApiException as e:
            if e.status != 404:
                raise


def submit(jobs: Jobs, job: dict, poll_s: float = 5.0, sleep: Callable[[float], None] = time.sleep,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """Create the job, or reattach to the one a previous attempt of this task created: a failed one is deleted and
    created again (it resumes from its checkpoints on the volume); a running or finished one is kept."""
    name = job["metadata"]["name"]
    if jobs.create(job):
        log(f"created {jobs.kind} {jobs.namespace}/{name}")
        return
    state = job_state(jobs.kind, (jobs.get(name) or {}).get("status"))
    if state.phase != "Failed":
        log(f"reattached to {jobs.kind} {jobs.namespace}/{name} ({state.phase})")
        return
    log(f"{jobs.kind} {name} had failed ({state.reason}); recreating it to resume from its checkpoints")
    jobs.delete(name)
    while jobs.get(name) is not None:
        sleep(poll_s)
    jobs.create(job)


@contextmanager
def _delete_on_sigterm(jobs: Jobs, name: str):
    """A cancelled KFP run stops its pods with SIGTERM: take the job (and its GPUs) with this task."""
    def stop(signum, frame):
        jobs.delete(name)
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no handler; the job then outlives a cancel
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stage_prompts(src: str | Path, dest: Path) -> Path:
    """The prompt set where every node can read it (the task's input artifact is local to its pod): copied once
    per run, atomically, so two branches or a retry never see half a copy."""
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{time.time_ns()}")
        (shutil.copytree if Path(src).is_dir() else shutil.copyfile)(src, tmp)
        try:
            tmp.rename(dest)
        except OSError:  # the other branch got there first
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return dest


def train_multinode(config: str, scheme: str, prompts: str, work_root: str, run_id: str, student_dir: str, *,
                    kind: str, image: str, nodes: int, gpus_per_node: int, pvc_name: str, mount_path: str,
                    node_selector: Mapping[str, str], tolerations: Sequence[Mapping], timeout_s: float,
                    delete_on_cancel: bool = True, api=None, namespace: str | None = None,
                    poll_s: float = 30.0) -> Path:
    """Train one branch as a multi-node job and copy its student into ``student_dir``. ``work_root`` is where this
    task mounts the volume, ``mount_path`` where the job's nodes mount it (the same path, so the paths agree)."""
    from sb2.kfp.tasks import copy_student, write_train_config

    run_dir = Path(work_root) / "runs" / run_id
    work = run_dir / scheme
    cfg_file = write_train_config(config, _stage_prompts(prompts, run_dir / f"prompts{Path(prompts).suffix}"), work)
    if api is None:
        from kubernetes import client, config as kube_config

        kube_config.load_incluster_config()
        api = client.CustomObjectsApi()
    namespace = namespace or Path(NAMESPACE_FILE).read_text().strip()
    name = job_name(run_id, scheme)
    job = build_job(kind, name=name, namespace=namespace, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
                    train_args=["--scheme", scheme, "-c", str(cfg_file), "--out", str(work)], pvc_name=pvc_name,
                    mount_path=mount_path, node_selector=node_selector, tolerations=tolerations,
                    labels={"app.kubernetes.io/part-of": "sb2", "sb2/scheme": scheme, "sb2/run-id": run_id})
    jobs = Jobs(api, kind, namespace)

    def status() -> dict | None:
        found = jobs.get(name)
        if found is None:
            raise JobFailed(f"{kind} {namespace}/{name} was deleted while the pipeline waited for it")
        return found.get("status")

    submit(jobs, job)
    with _delete_on_sigterm(jobs, name) if delete_on_cancel else nullcontext():
        try:
            wait_for_job(status, kind, name, timeout_s, poll_s)
        except TimeoutError:
            if delete_on_cancel:
                jobs.delete(name)
            raise
    # a job whose pods were preempted can end "Succeeded" (SIGTERM → checkpoint → exit 0): the step count decides
    return copy_student(work, student_dir, steps=yaml.safe_load(cfg_file.read_text())["train"]["steps"])
