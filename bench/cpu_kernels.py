"""10. CPU kernels the transformers choose between: attention (PyTorch's fused kernel vs the math one) and GELU (the
tanh approximation DiT and GPT-2 were published with vs the exact one), forward + backward, and the train_ldm step
under bf16 autocast with the denoiser's attention rule (the math kernel while training in half precision on at most
``MATH_ATTENTION_TOKENS`` tokens, ``gmpipe.nn.denoiser``) against the fused kernel everywhere. And the feature
network every stage measures or trains with, EfficientNet-Lite0, as its library builds it against gmpipe's folded
one (batch norms folded into the convolutions, channels-last weights). And the train_ar step under bf16 autocast
with the AR prior's attention (``gmpipe.ar.model.ATTENTION``: float32 while training in half precision on a CPU)
against transformers' own SDPA attention in bf16.

Attention cases: 4 heads of 32 channels, the same number of tokens in every case (batch x sequence length fixed),
in float32 and bfloat16, each kernel forced with ``sdpa_kernel``. GELU cases: a (tokens, 512) activation, the
demo DiT's feed-forward width. Step cases: the demo's ``small`` DiT and train_ldm loss on synthetic latents of the
demo's shape, fused AdamW; "fused everywhere" sets the rule's token limit to 0.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.measure import interleave, median, speedup, spread
from bench.report import Section
from bench.workloads import ldm_batches, ldm_config, ldm_step, steady_seconds, synthetic_latents
from gmpipe.ar.model import ATTENTION
from gmpipe.nn import denoiser as denoiser_module

SIZES = {
    "full": dict(tokens=[16, 64, 128, 256], total_tokens=16_384, gelu_rows=8_000, batch_size=256, warmup=2,
                 measured=5, rounds=3, feature_batch=64, perceptual_batch=32, ar_batch_size=32),
    "quick": dict(tokens=[16, 64], total_tokens=256, gelu_rows=64, batch_size=8, warmup=1, measured=1, rounds=1,
                  feature_batch=4, perceptual_batch=2, ar_batch_size=2),
}
KERNELS = {"fused": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def kernel_seconds(tokens: int, total: int, dtype: torch.dtype, kernel: SDPBackend, repeats: int) -> float:
    """Median seconds of one attention forward + backward at ``tokens`` tokens (batch total // tokens)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(max(1, total // tokens), 4, tokens, 32, generator=generator).to(dtype).requires_grad_()
               for _ in range(3))

    def forward_backward() -> None:
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(q, k, v)
        out.float().sum().backward()

    return median_seconds(forward_backward, repeats)


def gelu_seconds(rows: int, dtype: torch.dtype, approximate: str, repeats: int) -> float:
    """Median seconds of one GELU forward + backward on a (rows, 512) activation."""
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    return median_seconds(lambda: F.gelu(x, approximate=approximate).float().sum().backward(), repeats)


def effnet_cases(feature_batch: int, perceptual_batch: int, repeats: int) -> dict:
    """EfficientNet-Lite0 as the library builds it vs folded (``gmpipe.nn.features.fold_batch_norms``): evaluate's
    features (float32, 32 px images resized to 64, no gradients) and the perceptual loss of train_vae and
    train_decoder (32 px, bf16 autocast, forward of both images + backward through one)."""
    from gmpipe.nn.features import EffNetLite0Features

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(feature_batch, 1, 32, 32, generator=generator) * 2 - 1
    pair = (torch.rand(2, perceptual_batch, 1, 32, 32, generator=generator) * 2 - 1).unbind()
    cases = {}
    for name, folded in (("library", False), ("folded", True)):
        features = EffNetLite0Features(image_size=64, folded=folded)
        perceptual = EffNetLite0Features(image_size=32, folded=folded)

        def perceptual_step(network=perceptual) -> None:
            x = pair[0].clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    targets = network.feature_maps(pair[1])
                loss = sum((a - b).abs().mean() for a, b in zip(network.feature_maps(x), targets, strict=True))
            loss.backward()

        cases[f"effnet features fp32 {name}"] = lambda network=features: median_seconds(
            lambda: network(images), repeats)
        cases[f"effnet perceptual bf16 {name}"] = lambda step=perceptual_step: median_seconds(step, repeats)
    return cases


def bf16_step_seconds(step, batch, optimizer, warmup: int, measured: int) -> float:
    """Steady-state seconds of one training step of ``step`` (a LossStep) on ``batch`` under bf16 autocast."""
    stamps = []
    for _ in range(warmup + measured + 1):
        stamps.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = step.loss(batch, 0, {}, {step.name: step.module})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steady_seconds(stamps, warmup)


def ldm_training(batch_size: int):
    """One train_ldm step closure per case, on the same initial weights and batch, under bf16 autocast."""
    torch.manual_seed(0)
    split, stats = synthetic_latents(batch_size)
    batch = ldm_batches(split, stats)(torch.arange(batch_size), "cpu")
    step = ldm_step(ldm_config("small", batch_size))
    optimizer = torch.optim.AdamW(step.module.parameters(), lr=1e-4, fused=True)

    def seconds_per_step(limit: int, warmup: int, measured: int) -> float:
        saved = denoiser_module.MATH_ATTENTION_TOKENS
        denoiser_module.MATH_ATTENTION_TOKENS = limit
        try:
            return bf16_step_seconds(step, batch, optimizer, warmup, measured)
        finally:
            denoiser_module.MATH_ATTENTION_TOKENS = saved

    return seconds_per_step


def ar_training(batch_size: int):
    """One train_ar step closure on the demo's ``small`` AR prior (32 bins, 10 classes, 256 tokens) and its loss
    on random tokens under bf16 autocast, with the attention implementation named per call."""
    from gmpipe.ar.likelihood import ar_loss_step
    from gmpipe.ar.model import LatentAR

    torch.manual_seed(0)
    model = LatentAR(32, 10, 256, "small")
    step = ar_loss_step(model, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 32, (batch_size, 256), generator=generator),
             torch.randint(0, 10, (batch_size,), generator=generator))

    def seconds_per_step(attention: str, warmup: int, measured: int) -> float:
        model.lm.set_attn_implementation(attention)
        try:
            return bf16_step_seconds(step, batch, optimizer, warmup, measured)
        finally:
            model.lm.set_attn_implementation(ATTENTION)

    return seconds_per_step


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    cases = {}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for tokens in s["tokens"]:
            for name, kernel in KERNELS.items():
                cases[f"{label} {tokens} tokens {name}"] = (
                    lambda t=tokens, d=dtype, k=kernel: kernel_seconds(t, s["total_tokens"], d, k, s["measured"]))
        for approximate in ("tanh", "none"):
            cases[f"{label} gelu {approximate}"] = (
                lambda d=dtype, a=approximate: gelu_seconds(s["gelu_rows"], d, a, s["measured"]))
    cases.update(effnet_cases(s["feature_batch"], s["perceptual_batch"], s["measured"]))
    step = ldm_training(s["batch_size"])
    limit = denoiser_module.MATH_ATTENTION_TOKENS
    cases["train_ldm step, bf16, gmpipe's rule"] = lambda: step(limit, s["warmup"], s["measured"])
    cases["train_ldm step, bf16, fused everywhere"] = lambda: step(0, s["warmup"], s["measured"])
    ar_step = ar_training(s["ar_batch_size"])
    cases["train_ar step, bf16, attention in float32"] = lambda: ar_step(ATTENTION, s["warmup"], s["measured"])
    cases["train_ar step, bf16, attention in bf16"] = lambda: ar_step("sdpa", s["warmup"], s["measured"])
    seconds = interleave(cases, s["rounds"])

    rows = []
    section = Section("cpu_kernels", f"CPU kernels, forward + backward: attention over 4 heads x 32 "
                      f"({s['total_tokens']} tokens per case), GELU on {s['gelu_rows']} x 512, train_ldm step (small "
                      f"DiT, batch {s['batch_size']}), train_ar step (small AR prior, batch {s['ar_batch_size']}), "
                      f"EfficientNet-Lite0 ({s['feature_batch']} feature images at "
                      f"64 px, perceptual loss on {s['perceptual_batch']} pairs at 32 px); "
                      f"{torch.get_num_threads()} thread(s)", s["rounds"],
                      ["case", "ms", "ms range", "speed vs fused / tanh / library / bf16 attention"], rows)
    for name, times in seconds.items():
        reference = (name.replace(" math", " fused").replace("gmpipe's rule", "fused everywhere")
                     .replace("gelu none", "gelu tanh").replace(" folded", " library")
                     .replace("attention in float32", "attention in bf16"))
        rows.append([name, median(times) * 1000, spread([1000 * t for t in times]),
                     speedup(times, seconds[reference])])
    for label in ("fp32", "bf16"):
        for tokens in s["tokens"]:
            section.ratios[f"{label} {tokens} tokens: math / fused speed"] = speedup(
                seconds[f"{label} {tokens} tokens math"], seconds[f"{label} {tokens} tokens fused"])
        section.ratios[f"{label} gelu: exact / tanh approximation speed"] = speedup(
            seconds[f"{label} gelu none"], seconds[f"{label} gelu tanh"])
    for case in ("features fp32", "perceptual bf16"):
        section.ratios[f"effnet {case}: folded / library speed"] = speedup(
            seconds[f"effnet {case} folded"], seconds[f"effnet {case} library"])
    section.ratios["train_ldm bf16 step: gmpipe's rule / fused speed"] = speedup(
        seconds["train_ldm step, bf16, gmpipe's rule"], seconds["train_ldm step, bf16, fused everywhere"])
    section.ratios["train_ar bf16 step: attention in float32 / in bf16 speed"] = speedup(
        seconds["train_ar step, bf16, attention in float32"], seconds["train_ar step, bf16, attention in bf16"])
    section.notes.append(f"gmpipe's rule: the math kernel while training in bf16/fp16 on a CPU with at most "
                         f"{limit} tokens (the demo's DiT: 16); sampling and float32 keep the fused kernel. New "
                         f"denoisers and AR priors use exact GELU; the step cases are built with it")
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
