"""Fingerprinted resume: a checkpoint is reused only by the run that made it; non-finite weights are never saved."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gmpipe.config.loop import RESUMABLE_KEYS, LoopConfig, resumable_keys
from gmpipe.fingerprint import Fingerprint, hash_tensors, hash_tree, section_settings
from gmpipe.train.checkpoint import NonFiniteWeightsError, latest_checkpoint, save_checkpoint
from tests.train.test_loop import _config, _run

RUN = Fingerprint({"train.lr": 0.05, "train.seed": 0}, {"data/prepared": "abc"})


def test_raising_steps_continues_a_run_with_the_same_fingerprint(tmp_path):
    _run(tmp_path, _config(steps=4), fingerprint=RUN)
    longer = _run(tmp_path, _config(steps=6), fingerprint=RUN)
    assert longer.resumed_from == 4 and longer.step == 6


@pytest.mark.parametrize(("schedule", "continues"), [("constant", True), ("cosine", False), ("linear", False)])
def test_more_steps_continue_a_run_only_under_a_constant_learning_rate(schedule, continues):
    """A decaying schedule spreads over ``steps``: a stage's fingerprint then keeps them, so other steps start over."""
    keys = resumable_keys(LoopConfig(lr_schedule=schedule))
    assert ("steps" in keys) is continues
    assert set(RESUMABLE_KEYS) - set(keys) == (set() if continues else {"steps"})
    settings = section_settings("train", LoopConfig(lr_schedule=schedule, steps=10), exclude=keys)
    assert ("train.steps" in settings) is not continues


def test_lowering_steps_below_the_newest_checkpoint_starts_over_and_trains_that_many(tmp_path, capsys):
    fresh = _run(tmp_path / "fresh", _config(steps=2), fingerprint=RUN)
    _run(tmp_path, _config(steps=4), fingerprint=RUN)
    old = latest_checkpoint(tmp_path / "ckpt")
    shorter = _run(tmp_path, _config(steps=2), fingerprint=RUN)
    out = capsys.readouterr().out
    assert "starting over: steps is 2, fewer than the 4" in out, out
    assert shorter.resumed_from == 0 and shorter.step == 2
    assert (tmp_path / "ckpt.stale" / old.name).is_dir()
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000002"
    # What a run of 2 steps from scratch trains, bit for bit, not the 4-step model.
    for a, b in zip(fresh.modules["model"].parameters(), shorter.modules["model"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A run killed after its last checkpoint still finishes from it: equal steps are not fewer.
    again = _run(tmp_path, _config(steps=2), fingerprint=RUN)
    assert again.resumed_from == 2 and again.step == 2


@pytest.mark.parametrize(("changed", "named"), [
    (RUN.with_settings(**{"train.lr": 0.01}), "train.lr changed (0.05 -> 0.01)"),
    (RUN.with_inputs(**{"data/prepared": "def"}), "data/prepared changed"),
    (None, None),
])
def test_a_changed_setting_or_input_starts_over_and_says_what_changed(tmp_path, capsys, changed, named):
    _run(tmp_path, _config(steps=4), fingerprint=RUN if changed is not None else None)
    old = latest_checkpoint(tmp_path / "ckpt")
    rerun = _run(tmp_path, _config(steps=4), fingerprint=changed if changed is not None else RUN)
    out = capsys.readouterr().out
    assert rerun.resumed_from == 0 and rerun.step == 4
    assert "starting over" in out
    assert named in out if named else "no fingerprint" in out
    # The foreign checkpoints were moved aside, not deleted, and the new run wrote its own.
    assert (tmp_path / "ckpt.stale" / old.name).is_dir()
    stored = json.loads((latest_checkpoint(tmp_path / "ckpt") / "trainer.json").read_text())["fingerprint"]
    assert stored["digest"] == (changed if changed is not None else RUN).digest


def test_restarted_run_does_not_inherit_the_old_learning_rate(tmp_path):
    _run(tmp_path, _config(steps=4, lr=0.05), fingerprint=RUN)
    new = RUN.with_settings(**{"train.lr": 0.01})
    rerun = _run(tmp_path, _config(steps=2, lr=0.01), fingerprint=new)
    assert rerun.resumed_from == 0 and rerun.history[-1]["lr"] == pytest.approx(0.01)


def test_non_finite_weights_are_never_written(tmp_path):
    model = nn.Linear(2, 1)
    save_checkpoint(tmp_path, 1, {"model": model}, {"model": {}}, None, {})
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="non-finite weights at step 2 .*model: weight.*step-00000001"):
        save_checkpoint(tmp_path, 2, {"model": model}, {"model": {}}, None, {})
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_non_finite_ema_is_never_written(tmp_path):
    model = nn.Linear(2, 1)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["bias"][0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="ema: bias"):
        save_checkpoint(tmp_path, 1, {"model": model}, {"model": {}}, ema, {})
    assert latest_checkpoint(tmp_path) is None


def test_hashes_follow_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"one")
    first = hash_tree(tmp_path / "a")
    (tmp_path / "a" / ".x.bin.tmp-1").write_bytes(b"in-flight write")  # hidden temporaries do not count
    assert hash_tree(tmp_path / "a") == first
    (tmp_path / "a" / "x.bin").write_bytes(b"two")
    assert hash_tree(tmp_path / "a") != first
    assert hash_tree(tmp_path / "missing") == "missing"
    weights = nn.Linear(2, 2).state_dict()
    assert hash_tensors(weights) == hash_tensors({k: v.clone() for k, v in weights.items()})
    weights["bias"] = weights["bias"] + 1
    assert hash_tensors(weights) != hash_tensors(nn.Linear(2, 2).state_dict())


def test_section_settings_names_keys_as_in_params_and_leaves_out_how_long():
    from gmpipe.config.loop import LoopConfig

    settings = section_settings("train_vae", LoopConfig(lr=0.002), exclude=("steps",))
    assert settings["train_vae.lr"] == 0.002 and "train_vae.steps" not in settings


def test_code_hashes_follow_the_import_closure(tmp_path, monkeypatch):
    from gmpipe.fingerprint import code_hashes

    package = tmp_path / "toypkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "stage.py").write_text("import os\nfrom toypkg.sub import helper\n\ndef run():\n"
                                      "    from toypkg import lazy\n    return lazy\n")
    (package / "sub" / "helper.py").write_text("from toypkg.base import VALUE\n")
    (package / "base.py").write_text("VALUE = 1\n")
    (package / "lazy.py").write_text("X = 1\n")
    (package / "unrelated.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_hashes("toypkg.stage")
    assert sorted(first) == ["toypkg/__init__.py", "toypkg/base.py", "toypkg/lazy.py", "toypkg/stage.py",
                             "toypkg/sub/__init__.py", "toypkg/sub/helper.py"]
    (package / "unrelated.py").write_text("Y = 2\n")
    assert code_hashes("toypkg.stage") == first
    (package / "lazy.py").write_text("X = 2\n")  # imported inside a function: still the stage's code
    changed = Fingerprint({}, code_hashes("toypkg.stage")).changes(Fingerprint({}, first))
    assert changed == ["toypkg/lazy.py changed"]
