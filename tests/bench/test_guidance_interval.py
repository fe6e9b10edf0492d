"""The guidance-interval study (``python -m bench.guidance_interval``): guidance only at times in [LO, HI], the
conditional prediction alone elsewhere, the pipeline's own sampling at [0, 1], and gmpipe's guidance restored after."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bench import guidance_interval
from gmpipe.diffusion import Objective
from gmpipe.diffusion.guidance import GuidedModelFn, make_guided_model_fn
from gmpipe.diffusion.samplers import euler

COND, NULL = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
GUIDED_CALL = GuidedModelFn.__call__  # gmpipe's own, before any study swaps it


def denoiser(x_t, t, cond):
    """A prediction that differs between the conditional and the unconditional rows, and calls it made."""
    denoiser.rows.append(x_t.shape[0])
    return x_t * 0.5 + cond[:, None, None, None] * t[:, None, None, None]


denoiser.rows = []


def sample(low: float | None, high: float | None, w: float = 2.0):
    denoiser.rows.clear()
    model_fn = make_guided_model_fn(denoiser, COND, NULL, w)
    noise = torch.ones(2, 1, 2, 2)
    objective = Objective.from_config({"schedule": "rectified_flow", "target": "velocity"})
    if low is None:
        return *euler(model_fn, objective, noise, 10), Counter(), list(denoiser.rows)
    with guidance_interval.guidance_interval(low, high, Counter()) as calls:
        x0, nfe = euler(model_fn, objective, noise, 10)
    return x0, nfe, calls, list(denoiser.rows)


def test_the_whole_interval_is_the_pipelines_sampling_and_guidance_is_restored():
    plain, plain_nfe, _, plain_rows = sample(None, None)
    whole, whole_nfe, calls, rows = sample(0.0, 1.0)
    assert torch.equal(whole, plain) and whole_nfe == plain_nfe == 20
    assert calls == {"guided": 10} and rows == plain_rows == [4] * 10
    assert GuidedModelFn.__call__ is GUIDED_CALL
    again, _, _, _ = sample(None, None)
    assert torch.equal(again, plain)  # the swap ended with the block


def test_outside_the_interval_a_step_takes_the_conditional_prediction_alone():
    # times 1.0, 0.9, ..., 0.1: 0.7 to 0.3 fall in [0.25, 0.75]
    x0, _, calls, rows = sample(0.25, 0.75)
    assert calls == {"guided": 5, "plain": 5}
    assert rows == [2, 2, 2, 4, 4, 4, 4, 4, 2, 2]
    unguided, _, _, _ = sample(None, None, w=0.0)
    guided, _, _, _ = sample(None, None)
    assert not torch.equal(x0, unguided) and not torch.equal(x0, guided)
    # an unguided model (w = 0) is never changed
    _, nfe, calls, rows = sample(0.25, 0.75, w=0.0)
    assert calls == {"plain": 10} and rows == [2] * 10 and nfe == 10


@pytest.mark.parametrize("argv, message", [
    (["{root}", "0.9", "0.2", "1"], "need 0 <= LO < HI <= 1"),
    (["{root}", "0", "x", "1"], "must be numbers"),
    (["{root}", "0", "1", "-1"], "each W must be >= 0"),
    (["{missing}", "0", "1", "1"], "params.yaml not found"),
])
def test_bad_arguments_get_one_message(tmp_path, argv, message):
    (tmp_path / "params.yaml").write_text("{}\n")
    argv = [arg.format(root=tmp_path, missing=tmp_path / "missing") for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        guidance_interval.parse(argv)
    assert message in str(exit_info.value)
