"""Schema checks for the TrainJob and PyTorchJob objects, shared by the manifest and multi-node tests.

kubernetes-validate knows only the core API. The custom resources are checked against their own API models from
PyPI: kubeflow-trainer-api (pydantic models generated from the Kubeflow Trainer CRDs: strict types) and
kubeflow-training (the Training Operator SDK's kubeflow.org/v1 models). A model drops fields it does not know and
retypes values, so "parsed and written back unchanged" means every field exists with its type. The pods the
operators make from them are then validated by kubernetes-validate as core Pods.
"""

import kubernetes_validate

K8S = "1.33"


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S, strict=True)


def _pod(spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _roundtrip_trainjob(doc: dict) -> dict:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    return TrainerV1alpha1TrainJob.from_dict(doc).to_dict()


def _roundtrip_pytorchjob(doc: dict) -> dict:
    from kubeflow.training import ApiClient

    client = ApiClient()
    return client.sanitize_for_serialization(client._ApiClient__deserialize(doc, "KubeflowOrgV1PyTorchJob"))


def validate_training_job(doc: dict) -> list[dict]:
    """Validate a TrainJob/PyTorchJob; return the pod spec of each kind of node (TrainJob: one; PyTorchJob: Master,
    then Worker if any), as the operator would create it."""
    if doc["kind"] == "TrainJob":
        assert _roundtrip_trainjob(doc) == doc, "not a valid trainer.kubeflow.org/v1alpha1 TrainJob"
        t = doc["spec"]["trainer"]
        (patch,) = doc["spec"]["runtimePatches"]
        (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        assert node["name"] == "node"  # the torch-distributed runtime's trainer job and container
        p = node["template"]["spec"]["template"]["spec"]
        (c,) = p["containers"]
        assert c["name"] == "node"
        pods = [{**{k: v for k, v in p.items() if k != "containers"},
                 "containers": [{"name": "node", "image": t["image"], "command": t["command"], "args": t["args"],
                                 "env": t["env"], "resources": t["resourcesPerNode"],
                                 "volumeMounts": c["volumeMounts"]}]}]
        assert int(t["numProcPerNode"]) == int(t["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    else:
        assert doc["kind"] == "PyTorchJob"
        assert _roundtrip_pytorchjob(doc) == doc, "not a valid kubeflow.org/v1 PyTorchJob"
        replicas = doc["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] == 1 and set(replicas) <= {"Master", "Worker"}
        pods = [replicas[r]["template"]["spec"] for r in ("Master", "Worker") if r in replicas]
        for pod in pods:
            (c,) = pod["containers"]
            assert c["name"] == "pytorch"
            gpus = c["command"][c["command"].index("--gpus") + 1]
            assert gpus == doc["spec"]["nprocPerNode"] == c["resources"]["limits"]["nvidia.com/gpu"]
    for pod in pods:
        validate(_pod(pod, doc["metadata"]["name"]))
        (c,) = pod["containers"]
        assert c["command"][:3] == ["python", "-m", "sb2.kfp.launcher"] and c["command"][-1] == "--"
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert "claimName" in vols["data"]["persistentVolumeClaim"] and "data" in mounts
        assert (mounts["dshm"], vols["dshm"]["emptyDir"]["medium"]) == ("/dev/shm", "Memory")
        assert all("value" not in e for e in c["env"] if e["name"] in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"))
    return pods
