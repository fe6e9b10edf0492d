"""The causal LM prior: vocabulary layout, causality of teacher forcing, the cache, save and load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from gmpipe.ar.model import CONFIG_FILE, MODEL_FOLDER, LatentAR
from gmpipe.artifacts import ArtifactError

from .toys import random_model

BINS, CLASSES, LENGTH = 6, 3, 12


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, BINS, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def test_vocabulary_holds_values_then_classes_then_the_null_class():
    model = random_model(BINS, CLASSES, LENGTH)
    assert model.vocab_size == BINS + CLASSES + 1 == model.lm.config.vocab_size
    assert model.null_label == CLASSES
    assert model.prefix_tokens(torch.tensor([0, 2, 3])).tolist() == [[6], [8], [9]]
    tokens = _tokens(2)
    ids = model.input_ids(tokens, torch.tensor([1, 3]))
    assert ids[:, 0].tolist() == [7, 9] and torch.equal(ids[:, 1:], tokens[:, :-1])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        model.check_labels(torch.tensor([4]))


def test_logits_at_t_depend_on_the_class_and_earlier_tokens_only():
    model = random_model(BINS, CLASSES, LENGTH)
    tokens, labels = _tokens(1), torch.tensor([1])
    logits = model(tokens, labels)
    assert logits.shape == (1, LENGTH, BINS)
    t = 5
    changed = tokens.clone()
    changed[0, t] = (changed[0, t] + 1) % BINS
    other = model(changed, labels)
    torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)  # x_t is never its own input
    assert not torch.allclose(other[:, t + 1], logits[:, t + 1])
    assert not torch.allclose(model(tokens, torch.tensor([2]))[:, 0], logits[:, 0])  # the prefix is the condition


def test_incremental_logits_on_the_cache_equal_teacher_forcing():
    model = random_model(BINS, CLASSES, LENGTH)
    tokens, labels = _tokens(3), torch.tensor([0, 1, 3])
    full = model(tokens, labels)
    logits, cache = model.next_logits(model.prefix_tokens(labels), labels)
    steps = [logits]
    for t in range(LENGTH - 1):
        logits, cache = model.next_logits(tokens[:, t : t + 1], labels, cache)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("class_every_position", [True, False])
def test_save_and_load_give_the_same_model(tmp_path, class_every_position):
    model = random_model(BINS, CLASSES, LENGTH)
    model.class_every_position = class_every_position
    model.save_pretrained(tmp_path / "ar")
    loaded = LatentAR.from_pretrained(tmp_path / "ar")
    assert not loaded.training and loaded.to_config() == model.to_config()
    assert loaded.lm.lm_head.weight is loaded.lm.transformer.wte.weight
    tokens, labels = _tokens(2), torch.tensor([2, 0])
    torch.testing.assert_close(loaded(tokens, labels), model(tokens, labels), rtol=0, atol=0)


def test_damaged_model_folders_are_one_line_naming_the_file(tmp_path):
    folder = tmp_path / "ar"
    random_model(BINS, CLASSES, LENGTH).save_pretrained(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "bins": BINS + 1}))
    with pytest.raises(ArtifactError, match=r"vocab_size 10 .* needs 11.*rerun the 'train_ar' stage"):
        LatentAR.from_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    weights = folder / MODEL_FOLDER / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ArtifactError, match="autoregressive prior") as caught:
        LatentAR.from_pretrained(folder)
    assert "\n" not in str(caught.value)
    with pytest.raises(ArtifactError, match="no autoregressive prior here; run the 'train_ar' stage first"):
        LatentAR.from_pretrained(tmp_path / "nowhere")


def test_the_preallocated_cache_gives_the_logits_of_the_growing_one():
    """Sampling's cache, allocated once for the whole sequence, holds what the language model's own growing cache
    holds: the same logits at every step."""
    model = random_model(BINS, CLASSES, LENGTH)
    tokens, labels = _tokens(3), torch.tensor([0, 1, 3])
    grown, growing = model.next_logits(model.prefix_tokens(labels), labels)
    allocated, preallocated = model.next_logits(model.prefix_tokens(labels), labels, model.sampling_cache())
    for t in range(LENGTH - 1):
        torch.testing.assert_close(allocated, grown, rtol=0, atol=1e-6)
        grown, growing = model.next_logits(tokens[:, t : t + 1], labels, growing)
        allocated, preallocated = model.next_logits(tokens[:, t : t + 1], labels, preallocated)
    torch.testing.assert_close(allocated, grown, rtol=0, atol=1e-6)


def test_new_models_use_exact_gelu_and_a_saved_model_keeps_its_own(tmp_path):
    """Models built now use exact GELU (within 5e-4 of GPT-2's tanh approximation, 2-4x cheaper on a CPU); a model
    saved with GPT-2's "gelu_new" still runs the approximation it was trained with."""
    from transformers.activations import ACT2FN

    model = random_model()
    act = model.lm.transformer.h[0].mlp.act
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x), rtol=0, atol=0)
    assert (act(x) - ACT2FN["gelu_new"](x)).abs().max() < 5e-4

    model.save_pretrained(tmp_path)
    config_path = tmp_path / MODEL_FOLDER / "config.json"
    config = json.loads(config_path.read_text())
    assert config["activation_function"] == "gelu"
    config_path.write_text(json.dumps({**config, "activation_function": "gelu_new"}))
    old = LatentAR.from_pretrained(tmp_path).lm.transformer.h[0].mlp.act
    torch.testing.assert_close(old(x), ACT2FN["gelu_new"](x), rtol=0, atol=0)


def test_training_in_bf16_on_a_cpu_runs_the_attention_in_float32_and_saved_folders_load_with_plain_transformers(
        tmp_path, monkeypatch):
    """The attention gmpipe registers computes in float32 while training in bf16 on a CPU (its fused kernel's bf16
    backward is the slow one), as transformers' "sdpa" would in float32; sampling and scoring keep the kernel as is;
    the implementation is not written into the saved config."""
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    model = random_model(BINS, CLASSES, LENGTH)
    assert model.lm.config._attn_implementation == "gmpipe_sdpa"
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    tokens, labels = _tokens(4), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens, labels)
        assert seen and set(seen) == {torch.float32} and logits.dtype == torch.bfloat16
        seen.clear()
        with torch.no_grad():
            model(tokens, labels)
        assert set(seen) == {torch.bfloat16}
    logits.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)

    reference = GPT2LMHeadModel(copy.deepcopy(model.lm.config))
    reference.load_state_dict(model.lm.state_dict())
    reference.set_attn_implementation("sdpa")
    assert model.lm.config._attn_implementation == "gmpipe_sdpa"
    with torch.no_grad():
        embeds = model.input_embeddings(model.input_ids(tokens, labels), labels)
        torch.testing.assert_close(model.lm(inputs_embeds=embeds).logits, reference(inputs_embeds=embeds).logits)

    model.save_pretrained(tmp_path / "ar")
    config = json.loads((tmp_path / "ar" / MODEL_FOLDER / "config.json").read_text())
    assert "gmpipe_sdpa" not in json.dumps(config)
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "ar" / MODEL_FOLDER).config._attn_implementation == "sdpa"


def test_a_transformers_without_the_attention_registry_keeps_its_own_attention(monkeypatch):
    """gmpipe accepts transformers 4.40 on; one without ``AttentionInterface`` builds and trains the same model with
    its own attention."""
    import gmpipe.ar.model

    monkeypatch.setattr(gmpipe.ar.model, "_attention_registry", lambda: None)
    model = random_model(BINS, CLASSES, LENGTH)
    assert model.lm.config._attn_implementation != "gmpipe_sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(_tokens(2), torch.tensor([0, 1])).float().mean().backward()


def test_the_float32_training_attention_stays_causal_and_close_to_transformers_own():
    """With gradients under bf16 autocast (the path that computes in float32): a later token never changes earlier
    logits, and the logits agree with transformers' "sdpa" to bf16 rounding."""
    model = random_model(BINS, CLASSES, LENGTH)
    tokens, labels = _tokens(3), torch.tensor([0, 1, 3])
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % BINS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, other = model(tokens, labels), model(changed, labels)
        model.lm.set_attn_implementation("sdpa")
        reference = model(tokens, labels)
    assert logits.requires_grad
    torch.testing.assert_close(other[:, :7], logits[:, :7], rtol=0, atol=0)
    torch.testing.assert_close(logits.float(), reference.float(), rtol=0.05, atol=0.05)


def test_a_padding_mask_reaches_the_attention_as_with_transformers_own():
    """The masks transformers builds for "sdpa" are built for gmpipe's attention too (an unknown name gets none)."""
    from transformers import GPT2LMHeadModel

    model = random_model(BINS, CLASSES, LENGTH)
    reference = GPT2LMHeadModel(copy.deepcopy(model.lm.config))
    reference.load_state_dict(model.lm.state_dict())
    reference.set_attn_implementation("sdpa")
    ids = model.input_ids(_tokens(2), torch.tensor([0, 1]))
    mask = torch.ones_like(ids)
    mask[0, 1:4] = 0
    with torch.no_grad():
        ours = model.lm(input_ids=ids, attention_mask=mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
        unmasked = model.lm(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours[0, 5:], unmasked[0, 5:])
