"""Every extension point of gmpipe, by name: each registry maps a name to the place its implementation lives.

The names are what params are checked against (``train_ldm.sampler: must be one of ...``) and what the command
line offers; they are known without importing torch, so ``gmpipe check-params`` stays light. An implementation is
imported the first time it is used. Adding a sampler, a schedule, a distillation method or a whole model family
is: write it in its own module, add one line here.

An entry is ``"package.module:attribute"``: a function (a sampler), a class (a schedule, a conditioning, a
model family) or a constant (a GAN loss pair). Value objects (schedules, targets, time densities, weightings) are
frozen dataclasses whose config is ``{"name": <registered name>, **fields}`` (:meth:`Registry.config_of`), so an
objective can be written next to a trained model and rebuilt from it (:meth:`Registry.from_config`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any


class Registry(Mapping[str, Any]):
    """A read-only mapping from names to implementations of one kind (e.g. "sampler"), imported on first use."""

    def __init__(self, kind: str, entries: Mapping[str, str]) -> None:
        self.kind = kind
        self._entries = dict(entries)
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(name)
        if name not in self._loaded:
            module, _, attribute = self._entries[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (the order messages and the command line list them)."""
        return tuple(self._entries)

    def module_of(self, name: str) -> str:
        """The module that implements ``name`` (e.g. ``gmpipe.diffusion.samplers``), without importing it."""
        return self._entries[name].partition(":")[0]

    def lookup(self, name: str) -> Any:
        """The implementation registered as ``name``; ValueError listing the names for anything else."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}")
        return self[name]

    def create(self, name: str, **params: Any) -> Any:
        """Instantiate the class registered as ``name`` with keyword parameters."""
        cls = self.lookup(name)
        try:
            return cls(**params)
        except TypeError as error:
            raise ValueError(f"bad parameters for {self.kind} {name!r}: {error}") from None

    def from_config(self, config: str | Mapping[str, Any]) -> Any:
        """Instantiate from a name or from a ``{"name": ..., **params}`` dict (the inverse of :meth:`config_of`)."""
        if isinstance(config, str):
            return self.create(config)
        params = dict(config)
        if "name" not in params:
            raise ValueError(f"a {self.kind} config needs a 'name' key, got {sorted(params)}")
        return self.create(params.pop("name"), **params)

    def name_of(self, value: Any) -> str:
        """The name ``value`` (a registered function, class or constant, or an instance of a registered class) is
        registered under."""
        target = value if inspect.isclass(value) or inspect.isroutine(value) else type(value)
        for name in self._entries:
            if self[name] is value or self[name] is target:
                return name
        raise ValueError(f"{target.__qualname__} is not a registered {self.kind}")

    def config_of(self, value: Any) -> dict[str, Any]:
        """``{"name": registered name, **dataclass fields}`` of a registered value object."""
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return {"name": self.name_of(value), **fields}


# The generalized diffusion objective: schedule (a, b) x target (c, d) x time density p(t) x weighting w(t).
SCHEDULES = Registry("schedule", {
    "rectified_flow": "gmpipe.diffusion.schedules:RectifiedFlow",
    "vp_linear": "gmpipe.diffusion.schedules:VPLinear",
    "vp_cosine": "gmpipe.diffusion.schedules:VPCosine",
    "trigonometric": "gmpipe.diffusion.schedules:Trigonometric",
})
TARGETS = Registry("target", {
    "velocity": "gmpipe.diffusion.targets:Velocity",
    "epsilon": "gmpipe.diffusion.targets:Epsilon",
    "v_prediction": "gmpipe.diffusion.targets:VPrediction",
    "data": "gmpipe.diffusion.targets:Data",
})
TIME_DENSITIES = Registry("time density", {
    "uniform": "gmpipe.diffusion.time_density:UniformTime",
    "logit_normal": "gmpipe.diffusion.time_density:LogitNormalTime",
})
WEIGHTINGS = Registry("weighting", {
    "uniform": "gmpipe.diffusion.weightings:UniformWeighting",
    "min_snr": "gmpipe.diffusion.weightings:MinSNRWeighting",
})

# Samplers: sampler(model_fn, objective, noise, num_steps, *, shift, generator) -> (samples, NFE per sample).
SAMPLERS = Registry("sampler", {
    "euler": "gmpipe.diffusion.samplers:euler",
    "heun": "gmpipe.diffusion.samplers:heun",
    "ddim": "gmpipe.diffusion.samplers:ddim",
    "ddpm": "gmpipe.diffusion.samplers:ddpm",
    "sde": "gmpipe.diffusion.samplers:sde",
    "consistency": "gmpipe.diffusion.consistency:consistency_sample",
    # training-free few-step solvers from diffusers, mapped onto gmpipe's objective (gmpipe/diffusion/solvers.py)
    "dpmpp_2m": "gmpipe.diffusion.solvers:dpmpp_2m",
    "unipc": "gmpipe.diffusion.solvers:unipc",
    "flow_euler": "gmpipe.diffusion.solvers:flow_euler",
})
# The samplers whose result is a function of the starting noise alone (reflow's couplings need one).
DETERMINISTIC_SAMPLERS = ("euler", "heun", "ddim")

# Distillation methods: gmpipe.distill.session.DistillMethod subclasses (the math of each is its own module).
DISTILL_METHODS = Registry("distillation method", {
    "progressive": "gmpipe.distill.methods:ProgressiveDistillation",
    "reflow": "gmpipe.distill.methods:Reflow",
    "consistency": "gmpipe.distill.methods:ConsistencyDistillation",
    "guidance": "gmpipe.distill.methods:GuidanceDistillation",
})

# What a model is conditioned on (gmpipe.conditioning); the name is conditioning.json's "mode".
CONDITIONINGS = Registry("conditioning", {
    "none": "gmpipe.conditioning:Unconditional",
    "class": "gmpipe.conditioning:ClassLabels",
    "text": "gmpipe.conditioning:TextCaptions",
})

# Adversarial games of the latent GAN (gmpipe.gan.losses.AdversarialLoss: L_D and L_G together).
GAN_LOSSES = Registry("GAN loss", {
    "minimax": "gmpipe.gan.losses:MINIMAX",
    "non_saturating": "gmpipe.gan.losses:NON_SATURATING",
    "hinge": "gmpipe.gan.losses:HINGE",
})

# Model families: gmpipe.generator.Generator subclasses; a model folder's family.json names one.
MODEL_FAMILIES = Registry("model family", {
    "latent_diffusion": "gmpipe.latent_diffusion:LatentDiffusion",
    "autoregressive": "gmpipe.ar.family:AutoregressivePrior",
    "latent_gan": "gmpipe.gan.family:LatentGAN",
    "vae_prior": "gmpipe.vae.prior:VAEPrior",
})
