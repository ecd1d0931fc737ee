"""Training inside a container: one process, ``accelerate launch`` over the node's GPUs (DDP), or one node of a
multi-node Kubeflow ``TrainJob``/``PyTorchJob``.

The Kubeflow training operators inject the rendezvous as environment variables: ``PET_NNODES``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR``, ``PET_MASTER_PORT`` and ``PET_NPROC_PER_NODE`` (Trainer v2 and PyTorchJob with elastic policy);
a legacy PyTorchJob sets ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``/``MASTER_PORT`` counting replicas (= nodes).
:func:`accelerate_command` maps them to accelerate's ``--num_machines``, ``--machine_rank``, ``--main_process_ip``
and ``--main_process_port``; it is pure so a test can check the command it builds.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence

DEFAULT_PORT = 29500


def _int(env: Mapping[str, str], *keys: str, default: int) -> int:
    for k in keys:
        if env.get(k, "").strip():
            try:
                return int(env[k])
            except ValueError:
                raise ValueError(f"{k}={env[k]!r} is not an integer") from None
    return default


def accelerate_command(env: Mapping[str, str], gpus_per_node: int | None, train_args: Sequence[str],
                       mixed_precision: str | None = None) -> list[str]:
    """The command that runs ``sb2 train <train_args>`` on this node: plain Python on one GPU of one node, else
    ``accelerate launch`` with DDP across ``gpus_per_node × nodes`` processes."""
    nodes = _int(env, "PET_NNODES", "WORLD_SIZE", default=1)
    rank = _int(env, "PET_NODE_RANK", "RANK", default=0)
    per_node = gpus_per_node or _int(env, "PET_NPROC_PER_NODE", default=1)
    if nodes < 1 or per_node < 1 or not 0 <= rank < nodes:
        raise ValueError(f"bad topology: {nodes} nodes, node rank {rank}, {per_node} processes a node")
    train = ["-m", "sb2", "train", *train_args]
    if nodes == 1 and per_node == 1:
        return [sys.executable, *train]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_machines", str(nodes), "--machine_rank", str(rank), "--num_processes", str(nodes * per_node)]
    if nodes > 1:
        addr = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")
        if not addr:
            raise ValueError("multi-node training needs PET_MASTER_ADDR (or MASTER_ADDR)")
        port = _int(env, "PET_MASTER_PORT", "MASTER_PORT", default=DEFAULT_PORT)
        cmd += ["--main_process_ip", addr, "--main_process_port", str(port)]
    if mixed_precision:
        cmd += ["--mixed_precision", mixed_precision]
    return cmd + train


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sb2.kfp.launcher [--print] [--gpus N] -- <sb2 train args>``: the entrypoint of the
    TrainJob/PyTorchJob; ``--print`` writes the command instead of running it."""
    args = list(sys.argv[1:] if argv is None else argv)
    gpus, dry = None, args[:1] == ["--print"]
    args = args[1:] if dry else args
    if args[:1] == ["--gpus"]:
        gpus, args = int(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    cmd = accelerate_command(os.environ, gpus, args)
    if dry:
        print(json.dumps(cmd))
        return
    print("launch:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
