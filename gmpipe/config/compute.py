"""``compute:`` where networks run: processes, machines, device and precision."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from gmpipe.config.base import Section

# Where networks run: auto (CUDA when present, else the CPU), cpu or cuda (gmpipe.device resolves it).
DEVICES = ("auto", "cpu", "cuda")


class ComputeConfig(Section):
    """With ``num_processes * num_machines > 1`` a training stage is started through ``accelerate launch``
    (data sharded across ranks, only the global rank 0 writes). ``device: auto`` uses CUDA when present; on CPU
    several processes are started with ``ACCELERATE_USE_CPU=true`` and ``--multi_gpu`` (the flags that really start
    N processes). ``threads`` sets torch's intra-op threads per process (null: torch's default).
    ``mixed_precision: auto`` is bf16 where the device computes it in hardware, else no (``gmpipe.precision``).

    Every machine reads the same params file, so a machine's rank is not a key here: it comes from the environment
    (``GMPIPE_MACHINE_RANK``, or what the scheduler sets; see :mod:`gmpipe.rendezvous`). ``main_process_ip`` is
    the address of machine 0 that the others reach; with one machine the processes meet on 127.0.0.1.
    """

    num_processes: Annotated[int, Field(ge=1, le=1024)] = 1
    num_machines: Annotated[int, Field(ge=1, le=1024)] = 1
    main_process_ip: str | None = None
    main_process_port: Annotated[int, Field(ge=1, le=65535)] = 29500
    device: Literal[DEVICES] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_machine_rank(cls, data: Any) -> Any:
        if isinstance(data, dict) and "machine_rank" in data:
            raise ValueError(
                "machine_rank is no longer a params key (every machine reads this same file): delete it and set "
                "GMPIPE_MACHINE_RANK in each machine's environment instead "
                f"(got machine_rank: {str(data['machine_rank'])[:40]})"
            )
        return data

    @model_validator(mode="after")
    def _machines_need_an_address(self):
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError(
                f"main_process_ip is required with num_machines > 1: the address of machine 0 that the other machines "
                f"reach (got num_machines: {self.num_machines})"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines
