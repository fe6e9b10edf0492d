"""Multi-process training through ``accelerate launch``.

The orchestrating process (a Prefect flow) builds the command with :func:`accelerate_command` and streams its
output; every rank runs ``python -m gmpipe.launch STAGE ...``, which calls the plain stage function. Rank 0 writes
the stage's summary to ``--summary`` for the flow to publish.

On CPU, ``accelerate launch --cpu --num_processes N`` silently starts ONE process; the flags that really start N are
``--multi_gpu`` with ``ACCELERATE_USE_CPU=true``. The stage double-checks: ``make_accelerator`` refuses a world
size that differs from ``compute``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gmpipe.config.compute import ComputeConfig


def accelerate_command(compute: ComputeConfig, stage: str, params_file: str, root: str,
                       summary_file: str) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and environment for one stage."""
    import torch  # here, not at module level: the orchestrating process should not pay for importing torch

    cpu = compute.device == "cpu" or (compute.device == "auto" and not torch.cuda.is_available())
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(compute.world_size),
        "--num_machines", str(compute.num_machines),
        "--machine_rank", str(compute.machine_rank),
        "--main_process_port", str(compute.main_process_port),
        "--mixed_precision", compute.mixed_precision,
        "--dynamo_backend", "no",
    ]
    if compute.world_size > 1:
        command.append("--multi_gpu")
    if compute.main_process_ip:
        command += ["--main_process_ip", compute.main_process_ip]
    command += ["-m", "gmpipe.launch", stage, "--params", params_file, "--root", root, "--summary", summary_file]
    env = dict(os.environ)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
        if compute.threads:
            env["OMP_NUM_THREADS"] = str(compute.threads)
    return command, env


def main(argv: list[str] | None = None) -> int:
    from gmpipe.config.params import load_params
    from gmpipe.errors import GmpipeError
    from gmpipe.paths import Paths
    from gmpipe.stages.runner import run_stage_function

    parser = argparse.ArgumentParser(prog="python -m gmpipe.launch", description="one rank of a training stage")
    parser.add_argument("stage")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--summary", required=True)
    args = parser.parse_args(argv)
    params = load_params(Path(args.root) / args.params)
    try:
        summary = run_stage_function(args.stage, params, Paths(Path(args.root)))
    except GmpipeError as exc:
        print(f"gmpipe: error: {exc}", file=sys.stderr)
        return 1
    if summary:  # only rank 0 returns one
        from gmpipe.artifacts import write_json

        summary["world_size"] = params.compute.world_size
        write_json(args.summary, json.loads(json.dumps(summary, default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
