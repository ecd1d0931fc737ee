"""Every manifest, the kustomize base and both overlays render and validate against the Kubernetes schemas offline
(kubernetes-validate, strict). kustomize itself is not installable with pip: `render` below applies the subset of
kustomize our files use (resources, namespace, strategic-merge patches by kind and name; lists of named items merged
by name, other lists replaced). The TrainJob and PyTorchJob are CRDs without published schemas, so their pod
template, containers and env are validated as the core objects the operators build from them."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1] / "manifests"
K8S = "1.33"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


def _merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        by_name = {x["name"]: x for x in base}
        merged = [_merge(by_name[x["name"]], x) if x["name"] in by_name else x for x in patch]
        return [x for x in base if x["name"] not in {p["name"] for p in patch}] + merged
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "targetJobs" in x for x in base + patch)):  # TrainJob podSpecOverrides
        return [_merge(b, p) for b, p in zip(base, patch)] + base[len(patch):]
    return patch


def render(folder: Path) -> list[dict]:
    kz = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in kz.get("resources", []):
        path = folder / res
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for p in kz.get("patches", []):
        patch = yaml.safe_load((folder / p["path"]).read_text())
        hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) ==
                (patch["kind"], patch["metadata"]["name"])]
        assert len(hits) == 1, f"patch {p['path']} matches {len(hits)} resources"
        docs[hits[0]] = _merge(docs[hits[0]], patch)
    if "namespace" in kz:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kz["namespace"]
    return docs


def _validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S, strict=True)


def _pod(spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _validate_training_job(doc: dict) -> dict:
    """A TrainJob/PyTorchJob's pod as the operator would create it; returns its one container."""
    if doc["kind"] == "PyTorchJob":
        pod = doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    else:
        t, (o,) = doc["spec"]["trainer"], doc["spec"]["podSpecOverrides"]
        (c,) = o["containers"]
        assert o["targetJobs"] == [{"name": "node"}] and c["name"] == "node"
        pod = {"nodeSelector": o["nodeSelector"], "tolerations": o["tolerations"], "volumes": o["volumes"],
               "containers": [{"name": "node", "image": t["image"], "command": t["command"], "args": t["args"],
                               "env": t["env"], "resources": t["resourcesPerNode"],
                               "volumeMounts": c["volumeMounts"]}]}
        assert int(t["numProcPerNode"]) == int(t["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    _validate(_pod(pod, doc["metadata"]["name"]))
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "sb2.kfp.launcher", "--"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/mnt/sb2"]]["persistentVolumeClaim"]["claimName"] == "sb2-data"
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert all("value" not in e for e in container["env"] if e["name"] in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"))
    return pod


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in ROOT.rglob("*.yaml")
                                        if p.name != "kustomization.yaml" and "overlays" not in p.parts),
                         ids=str)
def test_each_manifest_validates(path):
    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        if doc["kind"] in ("TrainJob", "PyTorchJob"):
            _validate_training_job(doc)
        else:
            _validate(doc)


def test_base_renders_and_validates():
    docs = render(ROOT / "base")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Namespace", "sb2"), ("PersistentVolumeClaim", "sb2-data"), ("Secret", "sb2-credentials"),
            ("Deployment", "mlflow"), ("Service", "mlflow"), ("ServiceAccount", "sb2-pipeline"),
            ("Role", "sb2-pipeline"), ("RoleBinding", "sb2-pipeline")} <= kinds
    for d in docs:
        _validate(d)
        assert d["kind"] == "Namespace" or d["metadata"]["namespace"] == "sb2"
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert set(secret["stringData"].values()) == {""}  # a template: keys only


@pytest.mark.parametrize("overlay, gpus, batch, pool", [("a100-40gb", 8, 4, "nvidia-tesla-a100"),
                                                         ("h100", 8, 16, "nvidia-h100-80gb")])
def test_overlay_renders_and_validates(overlay, gpus, batch, pool):
    docs = render(ROOT / "overlays" / overlay)
    jobs = {d["kind"]: d for d in docs if d["kind"] in ("TrainJob", "PyTorchJob")}
    assert set(jobs) == {"TrainJob", "PyTorchJob"}
    for d in docs:
        if d["kind"] in jobs:
            pod = _validate_training_job(d)
            (c,) = pod["containers"]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
            assert c["args"][-2:] == ["--set", f"train.batch_size={batch}"]
            assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == pool
            assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"  # kept from the base by the merge
        else:
            _validate(d)
    assert jobs["PyTorchJob"]["spec"]["elasticPolicy"]["nProcPerNode"] == gpus


def test_renderer_merges_named_lists_and_replaces_scalar_lists():
    base = {"c": [{"name": "a", "x": 1, "l": [1, 2]}, {"name": "b"}], "k": 1}
    assert _merge(base, {"c": [{"name": "a", "l": [3]}]}) == {"c": [{"name": "b"}, {"name": "a", "x": 1, "l": [3]}],
                                                            "k": 1}
