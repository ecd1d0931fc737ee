"""The SwiftBrush v2 pipeline for Kubeflow Pipelines v2: the volume (a named PVC, or one the run creates) →
config → prompts → two training branches in parallel, each a task on the GPU pool or, with train_nodes > 1, a
multi-node TrainJob/PyTorchJob the task launches and waits for → merge (and, optionally, the λ sweep) → evaluate
→ generate → register (→ the created volume deleted, with delete_pvc).

Compile: `python pipelines/sb2_pipeline.py` writes pipelines/sb2.yaml (committed; a test checks it is current).
Submit:  `kfp run create -f pipelines/sb2.yaml -e sb2 -r <run name>` or `sb2 submit --host <endpoint>`.
"""

import ast
import re
import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components import stages

YAML = Path(__file__).with_name("sb2.yaml")
# One Secret holds every credential; its keys become environment variables (manifests/base/secret.yaml has the keys).
SECRET = "sb2-credentials"
SECRET_ENV = {"hf-token": "HF_TOKEN", "mlflow-username": "MLFLOW_TRACKING_USERNAME",
              "mlflow-password": "MLFLOW_TRACKING_PASSWORD", "aws-access-key-id": "AWS_ACCESS_KEY_ID",
              "aws-secret-access-key": "AWS_SECRET_ACCESS_KEY"}
MOUNT = "/mnt/sb2"
GPU_POOL = {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
GPU_TOLERATIONS = [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
SCHEMES = ("full", "lora")


def _common(task, image, pvc_name):
    task.set_container_image(image)
    kubernetes.mount_pvc(task, pvc_name=pvc_name, mount_path=MOUNT)
    kubernetes.use_secret_as_env(task, SECRET, SECRET_ENV, optional=True)
    return task


def _on_gpus(task, gpus, node_selector, tolerations, shm="16Gi"):
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    # NCCL and DataLoader workers share memory through /dev/shm, 64 MiB by default in a pod.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=shm)
    return task


def _delete_created_volume(volume, pvc_name, delete_pvc, after):
    """With delete_pvc, the PVC the run created goes once everything else is done; a named one always stays."""
    with dsl.If(pvc_name == ""):
        with dsl.If(delete_pvc == True):  # noqa: E712 — a KFP condition, compiled to CEL
            kubernetes.DeletePVC(pvc_name=volume).after(*after).set_display_name("delete-volume") \
                .set_caching_options(False)


@dsl.pipeline(name="sb2-swiftbrush-v2", description="SwiftBrush v2 one-step text-to-image distillation.")
def sb2_pipeline(
    profile: str = "sd21",
    teacher: str = "",  # model ids or paths (on the PVC); empty: the profile's
    student: str = "",
    clip: str = "",
    prompt_sources: str = "",  # a YAML list of prompt sources (PromptSourceConfig); empty: the profile's
    steps: int = 0,  # 0: the profile's train.steps
    lam: float = 0.5,
    sweep: bool = False,
    gpus_per_train: int = 4,  # GPUs a training node
    train_nodes: int = 1,  # > 1: each branch is a multi-node job of that many nodes instead of a task
    multinode_kind: str = "TrainJob",  # or PyTorchJob (the legacy Training Operator)
    gpu_node_selector: dict = GPU_POOL,
    gpu_tolerations: list = GPU_TOLERATIONS,
    image: str = stages.BASE_IMAGE,
    mlflow_tracking_uri: str = "http://mlflow.sb2.svc.cluster.local:5000",
    pvc_name: str = "sb2-data",  # an existing PVC; empty: the run creates one
    pvc_size: str = "1Ti",  # of a PVC the run creates
    pvc_storage_class: str = "standard-rwx",  # of a PVC the run creates: it must offer ReadWriteMany
    delete_pvc: bool = False,  # delete a PVC the run created once it ends (never a named one)
    work_root: str = MOUNT,
    sample_prompts: str = "data/samples/prompts.txt",
    overrides: list = [],  # noqa: B006 — a KFP parameter default, never mutated
):
    # The volume: the named PVC, or a new ReadWriteMany one (both branches and a job's nodes mount it at once).
    with dsl.If(pvc_name == ""):
        created = kubernetes.CreatePVC(pvc_name_suffix="-sb2", access_modes=["ReadWriteMany"], size=pvc_size,
                                       storage_class_name=pvc_storage_class)
        created.set_display_name("create-volume").set_caching_options(False)
    with dsl.Else():
        named = stages.named_volume(name=pvc_name)
    run = stages.resolve_config(
        profile=profile, teacher=teacher, student=student, clip=clip, steps=steps, lam=lam,
        prompt_sources=prompt_sources, tracking_uri=mlflow_tracking_uri, work_root=work_root, overrides=overrides,
        volume=dsl.OneOf(created.outputs["name"], named.output))
    run.set_display_name("config")
    config, volume = run.outputs["config"], run.outputs["volume"]
    prompts = stages.build_prompts(config=config)
    train = dict(config=config, prompts=prompts.outputs["prompts"], gpus_per_node=gpus_per_train,
                 work_root=work_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    with dsl.If(train_nodes > 1):
        # A task on the default pool creates a TrainJob/PyTorchJob across nodes and waits; a retried one reattaches.
        multi = {s: stages.train_multinode(scheme=s, kind=multinode_kind, image=image, nodes=train_nodes,
                                           pvc_name=volume, mount_path=MOUNT, node_selector=gpu_node_selector,
                                           tolerations=gpu_tolerations, **train) for s in SCHEMES}
    with dsl.Else():
        single = {s: _on_gpus(stages.train_branch(scheme=s, **train).set_display_name(f"train-{s}"),
                              gpus_per_train, gpu_node_selector, gpu_tolerations) for s in SCHEMES}
    for s in SCHEMES:
        multi[s].set_display_name(f"train-{s}-multinode")
    for t in [*multi.values(), *single.values()]:
        # A preempted or failed pod is retried; the new one resumes from the newest checkpoint on the PVC.
        t.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2.0)
    # Each branch's student from whichever task ran. Not dsl.OneOf over the Model artifacts themselves: KFP backends
    # before the fix of kubeflow/pipelines#13436 always take the last branch's artifact, and kfp.local takes none;
    # a OneOf over the artifact's URI (a string) and an importer work on both. reimport=False: the same artifact.
    a, b = (dsl.importer(artifact_uri=dsl.OneOf(multi[s].outputs["Output"], single[s].outputs["Output"]),
                         artifact_class=dsl.Model, reimport=False).set_display_name(f"student-{s}").output
            for s in SCHEMES)
    merged = stages.merge(config=config, a=a, b=b)
    evaluation = _on_gpus(stages.evaluate(config=config, model=merged.outputs["merged"]), 1,
                          gpu_node_selector, gpu_tolerations)
    images = _on_gpus(stages.generate(config=config, model=merged.outputs["merged"], prompt_file=sample_prompts), 1,
                      gpu_node_selector, gpu_tolerations)
    reg = stages.register(config=config, model=merged.outputs["merged"], evaluation=evaluation.outputs["evaluation"])
    tasks = [prompts, *multi.values(), *single.values(), merged, evaluation, images, reg]
    with dsl.If(sweep == True):  # noqa: E712 — a KFP condition, compiled to CEL
        s = _on_gpus(stages.sweep_lambda(config=config, a=a, b=b), 1, gpu_node_selector, gpu_tolerations)
        tasks.append(s)
        _delete_created_volume(volume, pvc_name, delete_pvc, after=[s, images, reg])
    with dsl.Else():
        _delete_created_volume(volume, pvc_name, delete_pvc, after=[images, reg])
    for t in tasks:
        # a registration is an event (a new model version), never a cached result
        t.set_caching_options(t is not reg)
        _common(t, image, volume)
    for t in (named, run):  # they run before the volume is known: the image and the secrets, no mount
        t.set_container_image(image)


def compile_pipeline(path: str | Path = YAML) -> Path:
    compiler.Compiler().compile(sb2_pipeline, str(path))
    path = Path(path)
    # kfp's header comment prints dict defaults in protobuf map order, which changes from run to run: sort their keys
    # so the committed YAML is reproducible byte for byte (the YAML body is already sorted).
    path.write_text(re.sub(r"(?m)^(#    \w+: (?:dict|list) \[Default: )(.*)\]$",
                           lambda m: m[1] + repr(_sorted(ast.literal_eval(m[2]))) + "]", path.read_text()))
    return path


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return [_sorted(v) for v in value] if isinstance(value, list) else value


if __name__ == "__main__":
    print(f"compiled to {compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else YAML)}")
