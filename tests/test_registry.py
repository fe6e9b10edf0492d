"""The registries drive the code: every entry resolves, params and the command line accept exactly the registered
names (with the names in the error), and the names are known without importing torch."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from gmpipe import registry
from gmpipe.config.compute import DEVICES, ComputeConfig
from gmpipe.config.distill import DistillConfig
from gmpipe.config.evaluate import EvaluateConfig
from gmpipe.config.objective import ObjectiveConfig
from gmpipe.config.params import ParamsError, parse_params
from gmpipe.config.train_ar import AR_CONDITIONINGS, TrainARConfig
from gmpipe.config.train_gan import GAN_CONDITIONINGS, TrainGANConfig
from gmpipe.config.train_ldm import TrainLDMConfig
from gmpipe.nn.presets import AR_PRESETS, DENOISER_PRESETS, GAN_PRESETS
from tests.conftest import REPO

REGISTRIES = [value for value in vars(registry).values() if isinstance(value, registry.Registry)]


def allowed(model, field: str) -> tuple:
    """The values a Literal field (or the items of a list of one) accepts."""
    annotation = model.model_fields[field].annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return typing.get_args(annotation)


@pytest.mark.parametrize("table", REGISTRIES, ids=lambda table: table.kind)
def test_every_entry_resolves_and_knows_its_name(table):
    assert len(table) >= 1
    for name in table:
        implementation = table[name]
        assert table.module_of(name) == implementation.__module__
        assert table.name_of(implementation) == name
    with pytest.raises(ValueError, match=f"unknown {table.kind} 'nonsense'; choose one of"):
        table.lookup("nonsense")


def test_params_accept_exactly_the_registered_names():
    assert allowed(TrainLDMConfig, "sampler") == registry.SAMPLERS.names
    assert allowed(TrainLDMConfig, "conditioning") == registry.CONDITIONINGS.names
    assert allowed(TrainLDMConfig, "preset") == tuple(DENOISER_PRESETS)
    assert allowed(ObjectiveConfig, "schedule") == registry.SCHEDULES.names
    assert allowed(ObjectiveConfig, "target") == registry.TARGETS.names
    assert allowed(ObjectiveConfig, "time_density") == registry.TIME_DENSITIES.names
    assert allowed(ObjectiveConfig, "weighting") == registry.WEIGHTINGS.names
    assert allowed(DistillConfig, "methods") == registry.DISTILL_METHODS.names
    assert allowed(DistillConfig, "reflow_sampler") == registry.DETERMINISTIC_SAMPLERS
    assert set(registry.DETERMINISTIC_SAMPLERS) < set(registry.SAMPLERS)
    assert allowed(EvaluateConfig, "sweep_samplers") == registry.SAMPLERS.names
    assert allowed(ComputeConfig, "device") == DEVICES
    assert allowed(TrainARConfig, "preset") == tuple(AR_PRESETS)
    assert allowed(TrainGANConfig, "preset") == tuple(GAN_PRESETS)
    assert allowed(TrainGANConfig, "loss") == registry.GAN_LOSSES.names
    for model in (TrainARConfig, TrainGANConfig):  # the families refuse text conditioning with their own line
        assert allowed(model, "conditioning") == registry.CONDITIONINGS.names
    assert set(AR_CONDITIONINGS) == set(GAN_CONDITIONINGS) == set(registry.CONDITIONINGS) - {"text"}
    with pytest.raises(ParamsError) as caught:
        parse_params({"train_ldm": {"sampler": "warp"}, "distill": {"methods": ["magic"]}})
    names = "', '".join(registry.SAMPLERS.names[:-1])
    last = registry.SAMPLERS.names[-1]
    assert f"train_ldm.sampler: must be one of '{names}' or '{last}' (got 'warp')" in str(caught.value)
    assert "distill.methods.0: must be one of 'progressive', 'reflow', 'consistency' or 'guidance'" in str(caught.value)


def test_the_command_line_offers_the_registered_names():
    from gmpipe.cli import build_parser

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    choices = {action.dest: action.choices for action in sample._actions if action.choices}
    assert tuple(choices["sampler"]) == registry.SAMPLERS.names and tuple(choices["device"]) == DEVICES


def test_the_families_names_that_are_not_a_registry_match_the_library():
    """The tokenizer's spacings and the posterior choice are typed in the train_ar section (the library that
    defines them imports torch); they must stay the library's."""
    from gmpipe.ar.data import Posterior
    from gmpipe.ar.tokenizer import SPACINGS
    from gmpipe.gan.losses import D_LOSSES, G_LOSSES, LOSS_KINDS

    assert allowed(TrainARConfig, "spacing") == SPACINGS
    assert allowed(TrainARConfig, "posterior") == typing.get_args(Posterior)
    assert registry.GAN_LOSSES.names == LOSS_KINDS
    for kind in LOSS_KINDS:
        game = registry.GAN_LOSSES[kind]
        assert game.discriminator is D_LOSSES[kind] and game.generator is G_LOSSES[kind]


def test_the_consistency_sampler_is_registered_like_the_others():
    from gmpipe.diffusion import get_sampler
    from gmpipe.diffusion.consistency import consistency_sample

    assert get_sampler("consistency") is consistency_sample


def test_names_are_known_without_torch():
    """Checking params (and building the command line) imports no torch: the registries name, they do not load."""
    code = ("import sys, gmpipe.config.params, gmpipe.cli; gmpipe.config.params.parse_params({}); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
