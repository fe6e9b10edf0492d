"""``compute:`` where training runs: processes, machines, device and precision, for every training stage."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gmpipe.config.base import Section


class ComputeConfig(Section):
    """With ``num_processes * num_machines > 1`` a training stage is started through ``accelerate launch``
    (data sharded across ranks, only rank 0 writes). ``device: auto`` uses CUDA when present; on CPU several
    processes are started with ``ACCELERATE_USE_CPU=true`` and ``--multi_gpu`` (the flags that really start N
    processes). ``threads`` sets torch's intra-op threads per process (null: torch's default)."""

    num_processes: Annotated[int, Field(ge=1, le=1024)] = 1
    num_machines: Annotated[int, Field(ge=1, le=1024)] = 1
    machine_rank: Annotated[int, Field(ge=0)] = 0
    main_process_ip: str | None = None
    main_process_port: Annotated[int, Field(ge=1, le=65535)] = 29500
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines
