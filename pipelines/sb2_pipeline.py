"""The SwiftBrush v2 pipeline for Kubeflow Pipelines v2: prompts → two training branches in parallel on the GPU pool
→ merge (and, optionally, the λ sweep) → evaluate → generate → register.

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
    gpus_per_train: int = 4,
    gpu_node_selector: dict = GPU_POOL,
    gpu_tolerations: list = GPU_TOLERATIONS,
    image: str = stages.BASE_IMAGE,
    mlflow_tracking_uri: str = "http://mlflow.sb2.svc.cluster.local:5000",
    pvc_name: str = "sb2-data",
    work_root: str = MOUNT,
    sample_prompts: str = "data/samples/prompts.txt",
    overrides: list = [],  # noqa: B006 — a KFP parameter default, never mutated
):
    config = stages.resolve_config(
        profile=profile, teacher=teacher, student=student, clip=clip, steps=steps, lam=lam,
        prompt_sources=prompt_sources, tracking_uri=mlflow_tracking_uri, work_root=work_root, overrides=overrides)
    config.set_display_name("config")
    prompts = stages.build_prompts(config=config.output)
    branches = {}
    for scheme in ("full", "lora"):
        t = stages.train_branch(config=config.output, scheme=scheme, prompts=prompts.outputs["prompts"],
                                gpus_per_node=gpus_per_train, work_root=work_root,
                                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        # A preempted or failed pod is retried; the new one resumes from the newest checkpoint on the PVC.
        t.set_display_name(f"train-{scheme}").set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2.0)
        branches[scheme] = _on_gpus(t, gpus_per_train, gpu_node_selector, gpu_tolerations)
    a, b = branches["full"].outputs["student"], branches["lora"].outputs["student"]
    merged = stages.merge(config=config.output, a=a, b=b)
    evaluation = _on_gpus(stages.evaluate(config=config.output, model=merged.outputs["merged"]), 1,
                          gpu_node_selector, gpu_tolerations)
    images = _on_gpus(stages.generate(config=config.output, model=merged.outputs["merged"],
                                      prompt_file=sample_prompts), 1, gpu_node_selector, gpu_tolerations)
    reg = stages.register(config=config.output, model=merged.outputs["merged"],
                          evaluation=evaluation.outputs["evaluation"])
    reg.set_caching_options(False)  # a registration is an event (a new model version), never a cached result
    tasks = [config, prompts, *branches.values(), merged, evaluation, images, reg]
    with dsl.If(sweep == True):  # a KFP condition, compiled to CEL
        s = _on_gpus(stages.sweep_lambda(config=config.output, a=a, b=b), 1, gpu_node_selector, gpu_tolerations)
        tasks.append(s)
    for t in tasks:
        t.set_caching_options(t is not reg)
        _common(t, image, pvc_name)


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
