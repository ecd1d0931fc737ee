"""One KFP component per sb2 stage: each resolves the run's config and calls the same stage function as the CLI and
DVC. No stage logic here: a component only maps its artifacts' paths to the function's arguments.

Lightweight Python components: the function source is embedded in the compiled YAML and runs in the sb2 image
(the `image` pipeline parameter overrides BASE_IMAGE per task), which already has kfp, so nothing is pip-installed.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

BASE_IMAGE = "ghcr.io/sb2-project/sb2:latest"


def _component(fn):
    return dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(fn)


@_component
def named_volume(name: str) -> str:
    """The PVC the user named (the other branch creates one; dsl.OneOf takes one output from each)."""
    return name


@_component
def resolve_config(profile: str, teacher: str, student: str, clip: str, steps: int, lam: float,
                   prompt_sources: str, tracking_uri: str, work_root: str, overrides: list,
                   volume: str) -> NamedTuple("Run", [("config", str), ("volume", str)]):
    """The validated config of this run (YAML text) that every other task reads, and the PVC every task mounts."""
    from typing import NamedTuple

    from sb2.kfp.tasks import pipeline_config

    config = pipeline_config(profile, overrides, {"teacher": teacher, "student": student, "clip": clip}, steps, lam,
                             prompt_sources, tracking_uri, work_root)
    return NamedTuple("Run", [("config", str), ("volume", str)])(config, volume)


@_component
def build_prompts(config: str, prompts: Output[Dataset], report: Output[Markdown]):
    """sb2.prompts.build.build_prompts → the prompt set (shards, manifest.json, stats.png)."""
    import json

    from sb2.kfp.tasks import config_from_yaml
    from sb2.prompts.build import build_prompts as run

    cfg = config_from_yaml(config)
    manifest = run(cfg.prompts, prompts.path, cfg.models)
    with open(report.path, "w") as f:
        f.write("# Prompt set\n\n```json\n" + json.dumps(manifest["total"], indent=1) + "\n```\n")


@_component
def train_branch(config: str, scheme: str, prompts: Input[Dataset], gpus_per_node: int, work_root: str,
                 run_id: str, student: Output[Model]) -> str:
    """sb2.train.loop.train through accelerate (DDP over the task's GPUs); checkpoints on the PVC. Returns the
    student's URI, which the pipeline re-imports after the single-/multi-node choice (see sb2_pipeline.py)."""
    from sb2.kfp.tasks import train_branch as run

    run(config, scheme, prompts.path, f"{work_root}/runs/{run_id}/{scheme}", student.path, gpus_per_node)
    return student.uri


@_component
def train_multinode(config: str, scheme: str, prompts: Input[Dataset], kind: str, image: str, nodes: int,
                    gpus_per_node: int, pvc_name: str, mount_path: str, work_root: str, run_id: str,
                    node_selector: dict, tolerations: list, student: Output[Model], timeout_hours: float = 72.0,
                    delete_on_cancel: bool = True) -> str:
    """sb2.kfp.multinode.train_multinode: a TrainJob (or PyTorchJob) of `nodes` nodes built from sb2/kfp/jobs/,
    created, waited for and its student copied here; checkpoints on the PVC. Returns the student's URI."""
    from sb2.kfp.multinode import train_multinode as run

    run(config, scheme, prompts.path, work_root, run_id, student.path, kind=kind, image=image, nodes=nodes,
        gpus_per_node=gpus_per_node, pvc_name=pvc_name, mount_path=mount_path, node_selector=node_selector,
        tolerations=tolerations, timeout_s=timeout_hours * 3600, delete_on_cancel=delete_on_cancel)
    return student.uri


@_component
def merge(config: str, a: Input[Model], b: Input[Model], merged: Output[Model]):
    """sb2.merge.merge_students at merge.lam (paper eq. 6)."""
    from sb2.kfp.tasks import config_from_yaml
    from sb2.merge import merge_students

    cfg = config_from_yaml(config)
    merge_students(f"{a.path}/student", f"{b.path}/student", cfg.merge.lam, merged.path, cfg.models)


@_component
def evaluate(config: str, model: Input[Model], evaluation: Output[Dataset], metrics: Output[Metrics]):
    """sb2.evaluation.evaluate.evaluate → metrics.json and scores.json; the headline numbers as KFP metrics."""
    import json

    from sb2.evaluation.evaluate import evaluate as run
    from sb2.kfp.tasks import config_from_yaml

    run(f"{model.path}/unet", config_from_yaml(config), evaluation.path)
    with open(f"{evaluation.path}/scores.json") as f:
        for k, v in json.load(f).items():
            metrics.log_metric(k, v)


@_component
def sweep_lambda(config: str, a: Input[Model], b: Input[Model], sweep: Output[Dataset], table: Output[Markdown]):
    """sb2.evaluation.sweep.sweep_lambda → the λ table, plot and the merge at the chosen λ."""
    import shutil

    from sb2.evaluation.sweep import sweep_lambda as run
    from sb2.kfp.tasks import config_from_yaml

    run(f"{a.path}/student", f"{b.path}/student", config_from_yaml(config), sweep.path)
    shutil.copyfile(f"{sweep.path}/sweep.md", table.path)


@_component
def generate(config: str, model: Input[Model], prompt_file: str, images: Output[Dataset], grid: Output[HTML]):
    """sb2.generation.generator.generate → PNGs and a grid of one-step images."""
    import base64

    from sb2.generation.generator import generate as run
    from sb2.generation.generator import read_prompt_args
    from sb2.kfp.tasks import config_from_yaml

    run(f"{model.path}/unet", read_prompt_args(None, prompt_file), images.path, config_from_yaml(config))
    with open(f"{images.path}/grid.png", "rb") as f:
        png = base64.b64encode(f.read()).decode()
    with open(grid.path, "w") as f:
        f.write(f'<img src="data:image/png;base64,{png}">')


@_component
def register(config: str, model: Input[Model], evaluation: Input[Dataset], registration: Output[Dataset]) -> str:
    """sb2.registry.register: an MLflow model version (alias challenger), promoted to champion if it is better."""
    import json

    from sb2.kfp.tasks import config_from_yaml
    from sb2.registry import register as run

    rec = run(f"{model.path}/unet", f"{evaluation.path}/scores.json", config_from_yaml(config), registration.path)
    return json.dumps({k: rec[k] for k in ("model_name", "version", "promoted", "reason")})
