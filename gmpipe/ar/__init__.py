"""An autoregressive prior over latent tokens: p(x | y) = prod_t p(x_t | x_<t, y), trained by maximum likelihood.

Normalized latents (c, h, w) become L = c * h * w tokens by scalar quantization; a small causal transformer
(transformers' GPT-2 architecture from a custom config) reads a class prefix and the tokens so far; sampling is
token by token on the key/value cache with classifier-free guidance on the logits. Modules, one concept each:

    tokenizer   scalar quantization: edges, bin centers, the "hwc" token order, the reconstruction floor
    model       the vocabulary layout (value tokens, class prefixes, the null class) and the causal LM
    likelihood  the training loss for the shared loop and the exact test likelihood in bits per token
    sampling    guided, tempered, top-k ancestral sampling with one seed per sample; NFE = L (2 L guided)
    data        cached latents as token batches and token sets
"""

from gmpipe.ar.data import make_token_batch_fn, normalized_latents, tokenize_split
from gmpipe.ar.likelihood import (
    TokenLikelihood,
    ar_loss_step,
    bits_per_dim_piecewise_uniform,
    marginal_bits_per_token,
    sequence_nll,
    token_likelihood,
    token_nll,
)
from gmpipe.ar.model import AR_PRESETS, ARPreset, LatentAR, get_ar_preset
from gmpipe.ar.sampling import filter_top_k, per_sample_uniforms, sample_from_logits, sample_latents, sample_tokens
from gmpipe.ar.tokenizer import LatentTokenizer, QuantizationFloor, reconstruction_floor

__all__ = [
    "AR_PRESETS", "ARPreset", "LatentAR", "LatentTokenizer", "QuantizationFloor", "TokenLikelihood", "ar_loss_step",
    "bits_per_dim_piecewise_uniform", "filter_top_k", "get_ar_preset", "make_token_batch_fn",
    "marginal_bits_per_token", "normalized_latents", "per_sample_uniforms", "reconstruction_floor",
    "sample_from_logits", "sample_latents", "sample_tokens", "sequence_nll", "token_likelihood", "token_nll",
    "tokenize_split",
]
