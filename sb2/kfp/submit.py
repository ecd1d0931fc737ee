"""`sb2 submit`: upload and run the compiled pipeline on a Kubeflow Pipelines endpoint with `kfp.Client`, for users
who prefer Python to `kfp run create -f pipelines/sb2.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def parse_params(pairs: list[str], package: str | Path) -> dict[str, Any]:
    """``name=value`` pairs → the run's arguments, each value parsed as YAML (``4``, ``true``, ``{a: b}``, ``[..]``)
    and checked against the compiled pipeline's parameter names."""
    known = yaml.safe_load(Path(package).read_text().split("\n---", 1)[0])["root"]["inputDefinitions"]["parameters"]
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param {pair!r}: expected name=value")
        if name not in known:
            raise ValueError(f"--param {name!r}: not a parameter of the pipeline (known: {', '.join(sorted(known))})")
        parsed = yaml.safe_load(value) if value else ""
        out[name] = value if known[name]["parameterType"] == "STRING" else parsed
    return out


def submit(host: str, package: str | Path, params: dict[str, Any], experiment: str = "sb2",
           run_name: str | None = None, namespace: str | None = None, upload_as: str | None = None,
           service_account: str = "") -> dict[str, str]:
    """Optionally upload the package as a pipeline (a new version if ``upload_as`` exists), then start a run, its
    pods running as ``service_account`` (empty: KFP's default, default-editor in a Kubeflow profile namespace, which
    manifests/base/rbac.yaml lets create PVCs and multi-node jobs)."""
    import kfp

    client = kfp.Client(host=host, namespace=namespace)
    if upload_as:
        pid = client.get_pipeline_id(upload_as)
        if pid is None:
            client.upload_pipeline(str(package), pipeline_name=upload_as)
        else:
            client.upload_pipeline_version(str(package), pipeline_version_name=f"{upload_as}-{Path(package).stat().st_mtime_ns}",
                                           pipeline_id=pid)
    run = client.create_run_from_pipeline_package(str(package), arguments=params, run_name=run_name,
                                                   experiment_name=experiment, namespace=namespace,
                                                   service_account=service_account or None)
    return {"run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}
