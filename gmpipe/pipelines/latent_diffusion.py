"""A gmpipe latent diffusion model folder is also a diffusers pipeline folder: one folder, read by both, no weights
written twice.

    model_index.json      the pipeline: class, components, and its config (conditioning, guidance weight, stage)
    pipeline.py           one import line naming the pipeline class, which diffusers resolves from the folder
    denoiser/             the diffusers DiT / PixArt model (config.json + safetensors), with gmpipe's denoiser.json
                          (and a text model's null caption) beside it: gmpipe and diffusers read the same weights
    vae/                  the autoencoder the latents decode with (copied from models/vae without its
                          discriminator; DVC's cache stores the identical file once)
    decoder/              optional: a small decoder (AutoencoderTiny, ``gmpipe.nn.small_decoder``) that decodes
                          instead of the vae, with its latent_stats.json and decoder.json
    scheduler/            scheduler_config.json: objective, latent statistics, sampler (gmpipe.pipelines.scheduler)
    family.json objective.json sampling.json conditioning.json latent_stats.json   gmpipe's files, as before

Loading, offline, from the local folder:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("models/ldm", trust_remote_code=True)   # pipeline.py imports gmpipe
    # or with gmpipe's class, which needs no trust_remote_code (pipeline.py checked to be its own import line):
    from gmpipe.pipelines.latent_diffusion import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_pretrained("models/ldm")
    images = pipe(class_labels=[3, 3, 7], num_inference_steps=50, guidance_scale=2.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1, 2)]).images

``guidance_scale`` is diffusers' s (1 = no guidance, pred = uncond + s (cond - uncond)); gmpipe's weight is
w = s - 1 (``sampling.json``'s guidance, ``gmpipe sample --guidance``). A list of CPU generators, one per image,
gives exactly ``gmpipe sample``'s images for those seeds (each sample's noise from its own stream,
``gmpipe.seeds``); one generator gives the images' noise one after another from it.

The small decoder of ``train_decoder`` is the optional ``decoder`` component (as ``gmpipe sample --decoder``):

    from diffusers import AutoencoderTiny
    pipe = LatentDiffusionPipeline.from_pretrained("models/student/progressive-1step",
                                                   decoder=AutoencoderTiny.from_pretrained("models/decoder"))
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, ModelMixin
from diffusers.utils import BaseOutput

from gmpipe.artifacts import ArtifactError, read_json
from gmpipe.conditioning import Conditioning
from gmpipe.decoder_folder import DECODER_INFO, LATENT_STATS, save_small_decoder, wrap_small_decoder
from gmpipe.decoder_folder import STAGE as DECODER_STAGE
from gmpipe.errors import GmpipeError
from gmpipe.latent_diffusion import WEIGHTS, LatentDiffusion
from gmpipe.nn.autoencoder import attention_outputs_in_default_layout
from gmpipe.nn.denoiser import Denoiser
from gmpipe.nn.small_decoder import SmallDecoder
from gmpipe.pipelines.scheduler import LatentDiffusionScheduler
from gmpipe.pixels import signed_to_uint8
from gmpipe.seeds import MAX_SEED, SampleNoise

INDEX = "model_index.json"
RESOLVER = "pipeline.py"
VAE = "vae"
DECODER = "decoder"
SCHEDULER = "scheduler"
AUTOENCODER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
RESOLVER_SOURCE = (
    '"""The diffusers pipeline class of this gmpipe model folder (DiffusionPipeline.from_pretrained(folder,\n'
    'trust_remote_code=True) imports it from here; gmpipe must be installed)."""\n\n'
    "from gmpipe.pipelines.latent_diffusion import LatentDiffusionPipeline  # noqa: F401\n"
)


@dataclass
class LatentDiffusionPipelineOutput(BaseOutput):
    """images: PIL images, or (N, H, W, C) float32 in [0, 1] ("np"), or (N, C, H, W) float32 in [0, 1] ("pt");
    nfe: the network evaluations per image."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int


class LatentDiffusionPipeline(DiffusionPipeline):
    """A gmpipe latent diffusion model as a diffusers pipeline (see the module docstring). Components: ``denoiser``
    (the diffusers transformer), ``vae`` (AutoencoderKL), ``scheduler`` (LatentDiffusionScheduler), optionally
    ``decoder`` (a small AutoencoderTiny loaded from a ``train_decoder`` folder, which then decodes); config:
    ``conditioning`` (``conditioning.json``), ``guidance`` (the default weight w), ``stage`` (the stage that wrote
    the folder). Sampling is gmpipe's own (``LatentDiffusion.sample_latents``), so the images are those of
    ``gmpipe sample``."""

    model_cpu_offload_seq = "denoiser->vae"
    _optional_components = [DECODER]

    def __init__(self, denoiser: ModelMixin, vae: AutoencoderKL, scheduler: LatentDiffusionScheduler,
                 decoder: AutoencoderTiny | None = None, conditioning: dict | None = None, guidance: float = 0.0,
                 stage: str = "train_ldm") -> None:
        super().__init__()
        if vae is not None:
            attention_outputs_in_default_layout(vae)
        self.register_modules(denoiser=denoiser, vae=vae, scheduler=scheduler, decoder=decoder)
        self.register_to_config(conditioning=conditioning, guidance=guidance, stage=stage)
        self._wrapped: tuple[ModelMixin, Denoiser] | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> LatentDiffusionPipeline:
        """diffusers' loading; a folder whose ``pipeline.py`` is gmpipe's own one-line resolver needs no
        ``trust_remote_code``: the only code it names is this class."""
        resolver = Path(pretrained_model_name_or_path) / RESOLVER
        if resolver.is_file() and resolver.read_text() == RESOLVER_SOURCE:
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def class_names(self) -> list[str]:
        return list((self.config.conditioning or {}).get("class_names", []))

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class indices of class names (as DiT's pipeline offers), e.g. ["Sneaker", "Bag"] -> [7, 8]."""
        labels = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in labels if name not in self.class_names]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a class of this model (classes: {', '.join(self.class_names)})")
        return [self.class_names.index(name) for name in labels]

    def to_generator(self) -> LatentDiffusion:
        """The pipeline as gmpipe's Generator (same networks, no copy): what ``__call__`` samples with."""
        if self._wrapped is None or self._wrapped[0] is not self.denoiser:
            folder = getattr(self.denoiser.config, "_name_or_path", None)
            if not folder or not Path(folder).is_dir():
                raise GmpipeError("the pipeline's denoiser was not loaded from a gmpipe model folder (its "
                                  "denoiser.json is needed); load the pipeline with from_pretrained(folder)")
            self._wrapped = (self.denoiser, Denoiser.around(self.denoiser, folder, self.config.stage))
        scheduler = self.scheduler
        settings = {**scheduler.sampling_settings, "guidance": float(self.config.guidance)}
        model = LatentDiffusion(self._wrapped[1], scheduler.objective, scheduler.latent_stats,
                                Conditioning.from_config(self.config.conditioning), settings, autoencoder=self.vae,
                                device=self.device)
        if self.decoder is not None:
            model.use_decoder(self._small_decoder())
        return model

    def _small_decoder(self) -> SmallDecoder:
        """The ``decoder`` component with the latent statistics of the folder it was loaded from."""
        folder = getattr(self.decoder.config, "_name_or_path", None)
        if not folder or not (Path(folder) / LATENT_STATS).is_file():
            raise GmpipeError("the pipeline's decoder was not loaded from a train_decoder folder (its "
                              f"{LATENT_STATS} is needed); load it with AutoencoderTiny.from_pretrained(folder)")
        return wrap_small_decoder(self.decoder, folder)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> LatentDiffusionPipelineOutput | tuple:
        """Images for ``class_labels`` (class-conditional models), ``prompt`` (text models; class labels work
        there too, as "a photo of a <class>") or ``batch_size`` unconditional samples; ``num_inference_steps`` and
        ``guidance_scale`` (s = 1 + w) default to the model's own. ``output_type``: "pil", "np" or "pt"."""
        requests = _requests(class_labels, prompt, batch_size)
        noise = _noise(generator, len(requests))
        model = self.to_generator()
        settings = model.resolve_settings({"steps": num_inference_steps,
                                           "guidance": None if guidance_scale is None else guidance_scale - 1})
        cond = model.conditioning.encode(requests, self.device)
        latents, nfe = model.sample_latents(cond, noise, **settings)
        images = signed_to_uint8(model.decode(latents))  # uint8 (N, C, H, W)
        output = _as_output(images, output_type)
        self.maybe_free_model_hooks()
        return LatentDiffusionPipelineOutput(images=output, nfe=nfe) if return_dict else (output, nfe)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write the pipeline as a gmpipe model folder that is also this pipeline folder (the module docstring)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        device, model = self.device, self.to_generator()
        model.save(folder, self.config.stage)  # moves the denoiser to the CPU to write it
        self.denoiser.to(device)
        self.vae.save_pretrained(folder / VAE, safe_serialization=True)
        if self.decoder is not None:
            source = Path(self.decoder.config._name_or_path)
            save_small_decoder(folder / DECODER, self._small_decoder(),
                               read_json(source / DECODER_INFO, DECODER_STAGE), source / LATENT_STATS)
            self.decoder.to(device)
        _write_index(folder, model, self.config.stage, with_decoder=self.decoder is not None)


def save_pipeline_files(folder: Path, model: LatentDiffusion, stage: str, autoencoder: Path,
                        autoencoder_stage: str = "train_vae") -> None:
    """Make the model folder ``folder`` (already written by ``model.save``) a diffusers pipeline folder: the index,
    the resolver, the scheduler config and a copy of the autoencoder in ``autoencoder`` (``models/vae``, written by
    ``autoencoder_stage``; or a teacher folder's ``vae``)."""
    folder, autoencoder = Path(folder), Path(autoencoder)
    for name in AUTOENCODER_FILES:
        if not (autoencoder / name).is_file():
            raise ArtifactError(autoencoder / name, "missing from the autoencoder folder", autoencoder_stage)
    (folder / VAE).mkdir(exist_ok=True)
    for name in AUTOENCODER_FILES:
        shutil.copyfile(autoencoder / name, folder / VAE / name)
    _write_index(folder, model, stage)


def _write_index(folder: Path, model: LatentDiffusion, stage: str, with_decoder: bool = False) -> None:
    """model_index.json, pipeline.py and scheduler/scheduler_config.json of a model folder (the index names a
    ``decoder`` folder when ``with_decoder``)."""
    import diffusers

    LatentDiffusionScheduler.of(model.objective, model.stats, model.settings).save_config(folder / SCHEDULER)
    index = {
        "_class_name": [Path(RESOLVER).stem, LatentDiffusionPipeline.__name__],
        "_diffusers_version": diffusers.__version__,
        WEIGHTS: ["diffusers", type(model.denoiser.transformer).__name__],
        SCHEDULER: [LatentDiffusionScheduler.__module__, LatentDiffusionScheduler.__name__],
        VAE: ["diffusers", AutoencoderKL.__name__],
        **({DECODER: ["diffusers", AutoencoderTiny.__name__]} if with_decoder else {}),
        "conditioning": model.conditioning.to_config(),
        "guidance": float(model.settings["guidance"]),
        "stage": stage,
    }
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (folder / RESOLVER).write_text(RESOLVER_SOURCE)


def _requests(class_labels, prompt, batch_size) -> list:
    """One request per image: class labels, prompts, or None for each of ``batch_size`` unconditional images."""
    if class_labels is not None and prompt is not None:
        raise ValueError("give class_labels or prompt, not both")
    if class_labels is not None:
        return [int(label) for label in ([class_labels] if isinstance(class_labels, int) else class_labels)]
    if prompt is not None:
        return [prompt] if isinstance(prompt, str) else list(prompt)
    if batch_size is None or batch_size < 1:
        raise ValueError("give class_labels, prompt, or batch_size (>= 1) for an unconditional model")
    return [None] * batch_size


def _noise(generator, n: int) -> SampleNoise:
    """Per-image noise streams: the given generators (one per image, or one shared), else seeds drawn from torch's
    global random state (so torch.manual_seed decides them)."""
    if generator is None:
        return SampleNoise(torch.randint(0, MAX_SEED // 2, (n,), dtype=torch.int64).tolist())
    generators = [generator] * n if isinstance(generator, torch.Generator) else list(generator)
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} images: give one per image, or one")
    return SampleNoise.from_generators(generators)


def _as_output(images: np.ndarray, output_type: str):
    """uint8 (N, C, H, W) -> what diffusers pipelines return for ``output_type``."""
    if output_type == "pil":
        return [PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)) for image in images]
    if output_type == "np":
        return images.transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    if output_type == "pt":
        return torch.from_numpy(images).float() / 255.0
    raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
