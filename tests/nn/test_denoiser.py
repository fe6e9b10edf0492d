import json

import pytest
import torch
from diffusers.models.embeddings import LabelEmbedding

from gmpipe.nn import denoiser as denoiser_module
from gmpipe.nn.denoiser import (
    DENOISER_PRESETS,
    MATH_ATTENTION_TOKENS,
    CaptionDenoiser,
    Denoiser,
    DenoiserPreset,
    LabelDenoiser,
    UnconditionalDenoiser,
    attention_kernel,
    get_denoiser_preset,
)

CHANNELS, SIZE, CLASSES, TEXT_DIM, BATCH = 4, 8, 3, 16, 4


def make_denoiser(mode: str, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    if mode == "class":
        return LabelDenoiser(CHANNELS, SIZE, "tiny", num_classes=CLASSES)
    if mode == "text":
        return CaptionDenoiser(CHANNELS, SIZE, "tiny", text_dim=TEXT_DIM)
    return UnconditionalDenoiser(CHANNELS, SIZE, "tiny")


def make_inputs(mode: str, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=generator)
    t = torch.rand(BATCH, generator=generator)
    if mode == "class":
        cond = torch.tensor([0, 1, 2, CLASSES])
    elif mode == "text":
        states = torch.randn(BATCH, 5, TEXT_DIM, generator=generator)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
        cond = (states, mask)
    else:
        cond = None
    return x_t, t, cond


@pytest.mark.parametrize("mode", ["none", "class", "text"])
def test_output_has_the_input_shape(mode):
    denoiser = make_denoiser(mode).eval()
    x_t, t, cond = make_inputs(mode)
    with torch.no_grad():
        assert denoiser(x_t, t, cond).shape == x_t.shape
        assert denoiser(x_t, 0.5, cond).shape == x_t.shape  # a float time is broadcast to the batch


@pytest.mark.parametrize("mode", ["none", "class"])
def test_time_reaches_diffusers_as_t_times_1000(mode):
    denoiser = make_denoiser(mode).eval()
    x_t, t, cond = make_inputs(mode)
    labels = cond if mode == "class" else torch.zeros(BATCH, dtype=torch.long)
    with torch.no_grad():
        direct = denoiser.transformer(x_t, timestep=t * 1000, class_labels=labels).sample
        torch.testing.assert_close(denoiser(x_t, t, cond), direct, rtol=0, atol=0)


def test_class_labels_change_the_output_and_the_null_label_is_its_own_class():
    denoiser = make_denoiser("class").eval()
    assert denoiser.null_label == denoiser.num_classes == CLASSES
    tables = [m.embedding_table for m in denoiser.modules() if isinstance(m, LabelEmbedding)]
    assert tables and all(table.num_embeddings == CLASSES + 1 for table in tables)
    x_t, t, _ = make_inputs("class")
    with torch.no_grad():
        outputs = [denoiser(x_t, t, torch.full((BATCH,), label)) for label in range(CLASSES + 1)]
    for i in range(CLASSES + 1):
        for j in range(i):
            assert not torch.allclose(outputs[i], outputs[j], atol=1e-6), (i, j)


def test_masked_out_caption_tokens_do_not_change_the_output():
    denoiser = make_denoiser("text").eval()
    x_t, t, (states, mask) = make_inputs("text")
    noise = torch.randn_like(states) * 10
    with torch.no_grad():
        reference = denoiser(x_t, t, (states, mask))
        masked_changed = denoiser(x_t, t, (torch.where(mask[..., None], states, noise), mask))
        kept_changed = denoiser(x_t, t, (torch.where(mask[..., None], noise, states), mask))
        float_mask = denoiser(x_t, t, (states, mask.float()))
    torch.testing.assert_close(masked_changed, reference)
    torch.testing.assert_close(float_mask, reference)
    assert not torch.allclose(kept_changed, reference, atol=1e-5)


@pytest.mark.parametrize("mode", ["class", "text"])
def test_no_hidden_dropout_in_train_mode(mode):
    denoiser = make_denoiser(mode).train()
    assert all(m.dropout_prob == 0 for m in denoiser.modules() if isinstance(m, LabelEmbedding))
    x_t, t, cond = make_inputs(mode)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x_t, t, cond), denoiser(x_t, t, cond), rtol=0, atol=0)


def test_class_condition_dropout():
    denoiser = make_denoiser("class")
    labels = torch.arange(64) % CLASSES
    torch.testing.assert_close(denoiser.drop_condition(labels, 0.0), labels)
    assert (denoiser.drop_condition(labels, 1.0) == denoiser.null_label).all()
    first = denoiser.drop_condition(labels, 0.5, generator=torch.Generator().manual_seed(3))
    second = denoiser.drop_condition(labels, 0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)
    dropped = first == denoiser.null_label
    assert 0 < dropped.sum() < 64 and (first[~dropped] == labels[~dropped]).all()


def test_text_condition_dropout_uses_the_learned_null_caption():
    denoiser = make_denoiser("text")
    _, _, (states, mask) = make_inputs("text")
    kept_states, kept_mask = denoiser.drop_condition((states, mask), 0.0)
    torch.testing.assert_close(kept_states, states)
    assert torch.equal(kept_mask, mask)

    null_states, null_mask = denoiser.null_condition(BATCH, like=(states, mask))
    assert null_states.shape == states.shape and null_mask.shape == mask.shape and null_mask.dtype == mask.dtype
    assert null_mask[:, 0].all() and not null_mask[:, 1:].any()
    torch.testing.assert_close(null_states[:, 0], denoiser.null_text_embedding.detach().expand(BATCH, -1))
    assert not null_states[:, 1:].any()
    dropped_states, dropped_mask = denoiser.drop_condition((states, mask), 1.0)
    torch.testing.assert_close(dropped_states, null_states)
    assert torch.equal(dropped_mask, null_mask)

    generator = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    first = denoiser.drop_condition((states, mask), 0.5, generator=generator())
    second = denoiser.drop_condition((states, mask), 0.5, generator=generator())
    torch.testing.assert_close(first[0], second[0])
    assert torch.equal(first[1], second[1])

    # the null caption is learned: a dropped caption sends gradient to it
    x_t, t, _ = make_inputs("text")
    denoiser(x_t, t, (dropped_states, dropped_mask)).square().mean().backward()
    assert denoiser.null_text_embedding.grad is not None and denoiser.null_text_embedding.grad.abs().sum() > 0


def test_null_condition_formats():
    assert make_denoiser("none").null_condition(BATCH) is None
    assert torch.equal(make_denoiser("class").null_condition(BATCH), torch.full((BATCH,), CLASSES))
    states, mask = make_denoiser("text").null_condition(BATCH)
    assert states.shape == (BATCH, 1, TEXT_DIM) and mask.shape == (BATCH, 1) and mask.all()


@pytest.mark.parametrize("mode", ["none", "class", "text"])
def test_save_and_load_give_identical_outputs(mode, tmp_path):
    denoiser = make_denoiser(mode).eval()
    if mode == "text":  # a trained-looking null token, not the initial one
        denoiser.null_text_embedding.data.normal_()
    x_t, t, cond = make_inputs(mode)
    denoiser.save_pretrained(tmp_path / "denoiser")

    saved = json.loads((tmp_path / "denoiser" / "denoiser.json").read_text())
    assert saved["mode"] == mode and saved["preset"] == {"width": 32, "depth": 2, "heads": 2, "patch_size": 2}
    # the denoiser folder is a diffusers model folder itself (what the diffusers pipeline folder loads)
    diffusers_model = type(denoiser.transformer).from_pretrained(tmp_path / "denoiser")
    assert diffusers_model.state_dict().keys() == denoiser.transformer.state_dict().keys()
    assert (tmp_path / "denoiser" / "null_text.safetensors").is_file() == (mode == "text")

    loaded = Denoiser.from_pretrained(tmp_path / "denoiser")
    assert loaded.to_config() == denoiser.to_config() == saved
    assert (loaded.null_label, loaded.training) == (denoiser.null_label, False)
    assert loaded.num_parameters() == denoiser.num_parameters()
    assert all(m.dropout_prob == 0 for m in loaded.modules() if isinstance(m, LabelEmbedding))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, t, cond), denoiser(x_t, t, cond), rtol=0, atol=0)
        null = denoiser.null_condition(BATCH, like=cond)
        torch.testing.assert_close(loaded(x_t, t, null), denoiser(x_t, t, null), rtol=0, atol=0)
    # folders written before kept the diffusers model in model/: they still load
    (tmp_path / "denoiser" / "model").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / "denoiser" / name).rename(tmp_path / "denoiser" / "model" / name)
    with torch.no_grad():
        legacy = Denoiser.from_pretrained(tmp_path / "denoiser")
        torch.testing.assert_close(legacy(x_t, t, cond), denoiser(x_t, t, cond), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["class", "text"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    x_t, t, cond = make_inputs(mode)
    grads = []
    for checkpointing in (False, True):
        denoiser = make_denoiser(mode).train()
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
            assert denoiser.transformer.gradient_checkpointing
        denoiser(x_t, t, cond).square().mean().backward()
        grads.append([p.grad for p in denoiser.transformer.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def _math_only(x, tokens) -> bool:
    """Whether attention_kernel(x, tokens) leaves only the math kernel enabled (flash attention switched off)."""
    with attention_kernel(x, tokens):
        return not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_the_math_attention_kernel_only_while_training_in_half_precision_on_short_sequences():
    x, half = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    assert torch.backends.cuda.flash_sdp_enabled()
    assert _math_only(half, 16) and _math_only(half, MATH_ATTENTION_TOKENS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _math_only(x, 16)
    assert not _math_only(half, MATH_ATTENTION_TOKENS + 1)  # long sequences: the fused kernel is faster
    assert not _math_only(x, 16)  # float32: the fused kernel is faster
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _math_only(x, 16)  # sampling: the fused kernel is faster
    assert torch.backends.cuda.flash_sdp_enabled()  # the switch does not outlive the pass


@pytest.mark.parametrize("mode", ["class", "text"])
def test_training_in_bf16_gives_the_fused_kernels_gradients(mode, monkeypatch):
    """The demo's DiT in bf16 autocast: gradients with the math attention kernel agree with the fused kernel's as
    closely as either agrees with float32 (what the kernel choice may change is rounding only)."""
    x_t, t, cond = make_inputs(mode)
    assert make_denoiser(mode).tokens <= MATH_ATTENTION_TOKENS

    def gradients(limit: int, bf16: bool) -> torch.Tensor:
        monkeypatch.setattr(denoiser_module, "MATH_ATTENTION_TOKENS", limit)
        denoiser = make_denoiser(mode).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = denoiser(x_t, t, cond)
        out.float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in denoiser.transformer.parameters() if p.grad is not None])

    exact, math, fused = gradients(0, False), gradients(MATH_ATTENTION_TOKENS, True), gradients(0, True)
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert relative(math, exact) < 0.05 and relative(fused, exact) < 0.05
    assert relative(math, fused) < 0.05


@pytest.mark.parametrize("mode", ["class", "text"])
def test_new_denoisers_use_exact_gelu_and_a_saved_one_keeps_its_own(mode, tmp_path):
    """Denoisers built now run exact GELU (4x cheaper than the tanh approximation on a CPU); a folder saved with
    diffusers' default "gelu-approximate" loads with the approximation it was trained with, and the same weights
    under the two activations differ by rounding only."""
    denoiser = make_denoiser(mode)
    assert denoiser.transformer.transformer_blocks[0].ff.net[0].approximate == "none"
    denoiser.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_fn"] == "gelu"
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_fn": "gelu-approximate"}))
    old = Denoiser.from_pretrained(tmp_path)
    assert old.transformer.transformer_blocks[0].ff.net[0].approximate == "tanh"
    x_t, t, cond = make_inputs(mode)
    with torch.no_grad():
        torch.testing.assert_close(old(x_t, t, cond), denoiser.eval()(x_t, t, cond), rtol=1e-2, atol=1e-2)
        assert not torch.equal(old(x_t, t, cond), denoiser(x_t, t, cond))


def test_small_preset_size():
    denoiser = LabelDenoiser(4, 8, "small", num_classes=10)
    assert 1.3e6 < denoiser.num_parameters() < 1.5e6
    assert denoiser.num_parameters() == sum(p.numel() for p in denoiser.parameters())


def test_presets_and_bad_arguments():
    for preset in DENOISER_PRESETS.values():
        assert preset.width == preset.heads * preset.head_dim
    assert get_denoiser_preset("tiny") is DENOISER_PRESETS["tiny"]
    with pytest.raises(ValueError, match="divisible by heads"):
        DenoiserPreset(width=30, depth=1, heads=4, patch_size=2)
    with pytest.raises(KeyError, match="unknown denoiser preset"):
        LabelDenoiser(4, 8, "huge")
    with pytest.raises(ValueError, match="num_classes"):
        LabelDenoiser(4, 8, "tiny", num_classes=0)
    with pytest.raises(ValueError, match="text_dim"):
        CaptionDenoiser(4, 8, "tiny")
    with pytest.raises(ValueError, match="patch size"):
        UnconditionalDenoiser(4, 7, "tiny")


def test_a_saved_denoiser_of_unknown_mode_is_refused_by_name(tmp_path):
    from gmpipe.artifacts import ArtifactError

    make_denoiser("class").save_pretrained(tmp_path / "denoiser")
    config = json.loads((tmp_path / "denoiser" / "denoiser.json").read_text())
    (tmp_path / "denoiser" / "denoiser.json").write_text(json.dumps({**config, "mode": "image"}))
    with pytest.raises(ArtifactError, match="denoiser.json: mode must be one of"):
        Denoiser.from_pretrained(tmp_path / "denoiser")
