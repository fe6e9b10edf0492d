"""Params validation: every problem is one line naming the dotted key and the rule; exit code 2; no traceback."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from gmpipe.cli import main
from gmpipe.config.params import Params, ParamsError, load_params, parse_params
from tests.conftest import REPO, smoke_params

BAD_INPUTS = [
    ({"data": {"image_size": 4}}, "data.image_size: must be >= 8 (got 4)"),
    ({"data": {"image_size": "32"}}, "data.image_size: must be an integer (got '32', a string)"),
    ({"data": {"channels": 2}}, "data.channels: must be one of 1 or 3 (got 2)"),
    ({"data": {"source": "mnist"}}, "data.source: must be one of 'fashion_mnist' or 'image_folder' (got 'mnist')"),
    ({"data": {"imgsize": 32}}, "data.imgsize: unknown key"),
    ({"train_vea": {}}, "train_vea: unknown key"),
    ({"data": 5}, "data: must be a mapping of keys to values (got 5, an integer)"),
    ({"prepare": {"val_fraction": -0.1}}, "prepare.val_fraction: must be >= 0.0 (got -0.1)"),
    ({"prepare": {"val_fraction": 1.5}}, "prepare.val_fraction: must be < 1.0 (got 1.5)"),
    ({"prepare": {"val_fraction": 0.5, "test_fraction": 0.5}}, "prepare: val_fraction + test_fraction must be < 0.9"),
    ({"prepare": {"max_per_class": 0}}, "prepare.max_per_class: must be >= 1 (got 0)"),
    ({"prepare": {"seed": 1.5}}, "prepare.seed: must be an integer (got 1.5, a float)"),
    ({"prepare": {"alpha_background": 256}}, "prepare.alpha_background: must be <= 255 (got 256)"),
    ([1, 2], "(top level): must be a mapping of sections (got a list)"),
]


@pytest.mark.parametrize(("raw", "expected"), BAD_INPUTS)
def test_bad_params_name_key_and_rule(raw, expected):
    with pytest.raises(ParamsError) as info:
        parse_params(raw, "p.yaml")
    assert any(line.startswith(expected) for line in info.value.problems), info.value.problems


def test_all_problems_reported_at_once():
    with pytest.raises(ParamsError) as info:
        parse_params({"data": {"image_size": 1, "channels": 7, "bogus": 0}})
    assert len(info.value.problems) == 3


def test_shipped_params_files_are_valid():
    for file in (REPO / "params.yaml", REPO / "configs" / "smoke.yaml", REPO / "configs" / "plain_vae.yaml"):
        assert isinstance(load_params(file), Params)


def test_plain_vae_preset_is_the_demo_with_the_plain_elbo():
    """configs/plain_vae.yaml is a complete params file: the demo's, with the autoencoder's loss the ELBO alone."""
    plain, demo = load_params(REPO / "configs" / "plain_vae.yaml"), load_params(REPO / "params.yaml")
    changed = {name for name in Params.model_fields if getattr(plain, name) != getattr(demo, name)}
    assert changed == {"train_vae"}
    loss = {"rec_loss": "l2", "kl_weight": 1.0, "perceptual_weight": 0.0, "gan_weight": 0.0}
    assert plain.train_vae == demo.train_vae.model_copy(update=loss)


def test_empty_file_is_an_error(tmp_path):
    """DVC refuses to run a stage whose params section is missing, so an empty file is no params file."""
    (tmp_path / "p.yaml").write_text("# nothing yet\n")
    with pytest.raises(ParamsError) as info:
        load_params(tmp_path / "p.yaml")
    assert info.value.problems == [
        "(top level): the file is empty; start from configs/smoke.yaml or the repository's params.yaml"]


def test_params_are_frozen():
    params = Params()
    with pytest.raises(ValidationError):
        params.data.image_size = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda raw: raw["data"].update(image_size=-1) or raw["prepare"].update(lr=1),
            ["data.image_size: must be >= 8 (got -1)", "prepare.lr: unknown key"],
        ),
        (lambda raw: raw.pop("evaluate"), ["evaluate: section is missing (DVC needs it; write `evaluate: {}`"]),
    ],
)
def test_check_params_cli_exit_2_one_line_each(tmp_path, capsys, edit, expected):
    raw = smoke_params()
    edit(raw)
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(raw))
    assert main(["check-params", str(file)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(f"{file}: ") and want in line


def test_check_params_cli_bad_yaml_names_the_line(tmp_path, capsys):
    file = tmp_path / "params.yaml"
    file.write_text("data: [unclosed\n")
    assert main(["check-params", str(file)]) == 2
    assert capsys.readouterr().err.startswith(f"{file}: line 2: not valid YAML")


def test_check_params_missing_file(tmp_path, capsys):
    assert main(["check-params", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read file" in capsys.readouterr().err


def test_check_params_ok(tmp_path, capsys):
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(smoke_params(data={"image_size": 28})))
    assert main(["check-params", str(file)]) == 0
    assert capsys.readouterr().out == f"{file}: ok\n"


def test_training_sections_compose_the_loop_and_stay_flat_in_params():
    """``train_ldm`` is the loop's part, the objective's part and its own keys; the file (and every dump, so every
    fingerprint name) stays flat, errors name the flat key, and only the loop part is a LoopConfig."""
    from gmpipe.config.loop import LoopConfig
    from gmpipe.config.objective import ObjectiveConfig
    from gmpipe.fingerprint import section_settings

    raw = smoke_params()
    params = parse_params(raw)
    config = params.train_ldm
    assert type(config.loop) is LoopConfig and type(config.objective) is ObjectiveConfig
    assert config.loop.steps == raw["train_ldm"]["steps"] and config.objective.time_shift == 1.0
    assert type(config).model_validate(config.model_dump()) == config  # the flat dump reads back
    assert set(raw["train_ldm"]) <= set(config.model_dump()) and "loop" not in config.model_dump()
    assert {"train_ldm.lr", "train_ldm.schedule", "train_ldm.preset"} <= set(section_settings("train_ldm", config))
    assert set(params.distill.loop.model_dump()) == set(LoopConfig.model_fields)
    assert params.train_ldm.replace(lr=0.5).loop.lr == 0.5 and config.loop.lr != 0.5  # a validated copy
    for section, key, value, message in [("train_ldm", "lr", -1, "train_ldm.lr: must be > 0.0 (got -1)"),
                                         ("distill", "steps", 0, "distill.steps: must be >= 1 (got 0)"),
                                         ("train_ldm", "schedule", "warp", "train_ldm.schedule: must be one of"),
                                         ("train_vae", "loop", {}, "train_vae.loop: unknown key (the loop keys")]:
        with pytest.raises(ParamsError) as info:
            parse_params({section: {key: value}})
        assert info.value.problems[0].startswith(message), info.value.problems
    with pytest.raises(ParamsError) as info:  # every part written nested is named, each at its key
        parse_params({"train_ldm": {"objective": {"target": "data"}, "loop": {}}})
    assert [problem.split(":")[0] for problem in info.value.problems] == ["train_ldm.loop", "train_ldm.objective"]
    with pytest.raises(ParamsError) as info:  # and the section's other problems beside them
        parse_params({"train_vae": {"loop": {}, "objective": 2, "lr": -1}, "data": {"image_size": 3}})
    assert sorted(problem.split(":")[0] for problem in info.value.problems) == [
        "data.image_size", "train_vae.loop", "train_vae.lr", "train_vae.objective"], info.value.problems
    with pytest.raises(ValidationError) as raised:  # the section on its own names them all, as a stage reads it
        type(params.train_vae).model_validate({"loop": {}, "lr": -1, "kl_weight": "x"})
    assert sorted(tuple(error["loc"]) for error in raised.value.errors()) == [
        ("kl_weight",), ("loop",), ("loop", "lr")], raised.value.errors()


@pytest.mark.parametrize("section", ["train_vae", "train_decoder"])
@pytest.mark.parametrize("blocks, problem", [([1, 1], "each block at most once"), ([16], "must be <= 15"),
                                             ([], "at least 1 item")])
def test_perceptual_blocks_name_blocks_of_the_network(section, blocks, problem):
    assert getattr(parse_params({section: {"perceptual_blocks": [10, 0]}}), section).perceptual_blocks == [0, 10]
    with pytest.raises(ParamsError, match=rf"{section}.perceptual_blocks.*{problem}"):
        parse_params({section: {"perceptual_blocks": blocks}})


def test_a_null_value_of_the_wrong_kind_is_named_once():
    with pytest.raises(ParamsError) as info:
        parse_params({"train_vae": {"perceptual_blocks": None, "lr": False}})
    assert sorted(info.value.problems) == ["train_vae.lr: must be a number (got false, a boolean)",
                                           "train_vae.perceptual_blocks: must be a list (got null)"]
