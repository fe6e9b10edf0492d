"""``auto`` precision: bfloat16 where the hardware computes it, float32 (``no``) elsewhere, resolved on the machine
that runs the stage; an explicit ``bf16`` on hardware without it runs as asked, with one warning line naming the key.

The hardware probe is patched both ways, so each test means the same on a CPU with and without bfloat16 units (this
suite also runs on AVX2-only CPUs, where bf16 autocast is emulated)."""

from __future__ import annotations

import pytest
import torch

from gmpipe import precision
from gmpipe.config.compute import ComputeConfig


@pytest.fixture
def hardware(monkeypatch):
    """Set whether the CPU has bfloat16 units; the warnings already printed are forgotten."""
    monkeypatch.setattr(precision, "_warned", set())

    def set_fast(fast: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    return set_fast


@pytest.mark.parametrize("avx512_bf16, amx, fast", [(True, False, True), (False, True, True), (False, False, False)])
def test_a_cpu_computes_bf16_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, fast):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.fast_bf16("cpu") is fast


@pytest.mark.parametrize("fast, resolved, mixed", [(True, "bf16", "bf16"), (False, "fp32", "no")])
def test_auto_resolves_to_what_the_hardware_computes_and_never_warns(hardware, capsys, fast, resolved, mixed):
    hardware(fast)
    assert precision.resolve_precision("auto", "cpu", "evaluate.precision") == resolved
    assert precision.resolve_mixed_precision("auto", torch.device("cpu")) == mixed
    for setting in ("fp32", "bf16") if fast else ("fp32",):
        assert precision.resolve_precision(setting, "cpu", "evaluate.precision") == setting
    assert precision.resolve_mixed_precision("no", "cpu") == "no"
    assert capsys.readouterr().err == ""


def test_bf16_without_bf16_units_runs_as_asked_with_one_warning_per_key(hardware, capsys):
    hardware(False)
    for _ in range(3):
        assert precision.resolve_precision("bf16", "cpu", "cache_latents.precision") == "bf16"
        assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("cache_latents.precision: bf16 runs emulated here (this CPU has no bfloat16 units")
    assert "set cache_latents.precision: auto or fp32 in params.yaml" in lines[0]
    assert lines[1].startswith("compute.mixed_precision: bf16 runs emulated here")
    assert "set compute.mixed_precision: auto or no in params.yaml" in lines[1]


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "no")])
def test_training_stages_run_auto_as_resolved(hardware, fast, expected):
    """The accelerator a training stage gets, and the flag ``accelerate launch`` is given for several processes."""
    from gmpipe.launch import accelerate_command
    from gmpipe.train.loop import make_accelerator

    hardware(fast)
    compute = ComputeConfig(device="cpu", mixed_precision="auto")
    assert make_accelerator(compute).mixed_precision == expected
    command, _ = accelerate_command(compute.replace(num_processes=2), "train_ldm", "params.yaml", ".", "out.json")
    assert command[command.index("--mixed_precision") + 1] == expected


def test_params_take_auto_everywhere_a_precision_is_set():
    from gmpipe.config.cache_latents import CacheLatentsConfig
    from gmpipe.config.distill import DistillConfig
    from gmpipe.config.evaluate import EvaluateConfig

    assert ComputeConfig(mixed_precision="auto").mixed_precision == "auto"
    assert CacheLatentsConfig(precision="auto").precision == "auto"
    assert DistillConfig.model_validate({"reflow_precision": "auto"}).reflow_precision == "auto"
    evaluate = EvaluateConfig(precision="auto", classifier_precision="auto")
    assert (evaluate.precision, evaluate.classifier_precision) == ("auto", "auto")


def test_computes_in_half_reads_autocast_on_a_torch_without_the_device_argument(monkeypatch):
    """torch before 2.4 (gmpipe accepts 2.2 on) has no is_autocast_enabled(device): the per-device functions answer."""
    from gmpipe.precision import computes_in_half

    def old_is_autocast_enabled(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return False

    x = torch.zeros(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(torch, "is_autocast_enabled", old_is_autocast_enabled)
        assert computes_in_half(x)
    assert not computes_in_half(x)
    assert computes_in_half(x.bfloat16())
