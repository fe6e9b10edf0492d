"""Multi-process training through ``accelerate launch``.

The orchestrating process (a Prefect flow, one per machine) builds the command with :func:`accelerate_command` and
streams its output; ``python -m gmpipe.rendezvous`` runs ``accelerate launch`` (binding the rendezvous store to
loopback when the main address is loopback), and every rank runs ``python -m gmpipe.launch STAGE ...``, which calls
the plain stage function. The global rank 0 (on machine 0) writes the stage's summary to ``--summary`` for the flow
to publish; the other machines write nothing. Which machine this is comes from the environment
(:func:`gmpipe.rendezvous.machine_rank`), never from the params file every machine shares.

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
from gmpipe.errors import GmpipeError
from gmpipe.rendezvous import LOOPBACK_DEFAULT, free_port, port_in_use


def rendezvous_port(compute: ComputeConfig, rank: int) -> int:
    """``compute.main_process_port``; on one machine a free port instead when that one is taken (as accelerate
    would, but choosing it here keeps the launch on the rendezvous that :mod:`gmpipe.rendezvous` binds)."""
    port = compute.main_process_port
    if rank != 0 or not port_in_use(LOOPBACK_DEFAULT, port):
        return port
    if compute.num_machines > 1:
        raise GmpipeError(f"compute.main_process_port: port {port} is already in use on the main machine; "
                          "choose a free one (the same on every machine)")
    chosen = free_port()
    print(f"compute.main_process_port {port} is in use on this machine; the processes meet on port {chosen}",
          flush=True)
    return chosen


def accelerate_command(compute: ComputeConfig, stage: str, params_file: str, root: str, summary_file: str,
                       rank: int = 0) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and environment for one stage on the machine of rank ``rank``."""
    # Imported here, not at module level: the orchestrating process should not pay for importing torch.
    from gmpipe.device import resolve_device
    from gmpipe.precision import resolve_mixed_precision

    device = resolve_device(compute.device)  # cuda without CUDA stops here, before any process starts
    cpu = device.type == "cpu"
    command = [
        sys.executable, "-m", "gmpipe.rendezvous",
        "--num_processes", str(compute.world_size),
        "--num_machines", str(compute.num_machines),
        "--machine_rank", str(rank),
        "--main_process_port", str(rendezvous_port(compute, rank)),
        "--mixed_precision", resolve_mixed_precision(compute.mixed_precision, device),
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
