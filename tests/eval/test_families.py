"""The family table's rows, Markdown and the reverse-SDE target check, on hand-made measurements."""

from __future__ import annotations

import pytest

from gmpipe.eval.families import family_row, markdown_table, row_key, sde_target


def _sweep(sampler: str, steps: int, fd: float, nfe_per_step: int = 2) -> dict:
    return {"sampler": sampler, "steps": steps, "nfe": steps * nfe_per_step, "n": 300, "fd_effnet": fd}


def test_sde_target_compares_equal_steps_at_the_largest_nfe_of_at_least_50():
    rows = [_sweep("euler", 16, 500.0), _sweep("sde", 16, 900.0), _sweep("euler", 50, 450.0),
            _sweep("sde", 50, 513.0), _sweep("heun", 50, 440.0)]
    target = sde_target(rows)
    assert target["measured"] and target["steps"] == 50 and target["nfe"] == 100 and target["n"] == 300
    assert target["ratio"] == pytest.approx(513.0 / 450.0) and target["met"]
    assert not sde_target([*rows[:2], _sweep("euler", 50, 450.0), _sweep("sde", 50, 600.0)])["met"]
    # Steps 16 unguided are NFE 16 < 50: nothing to compare.
    missing = sde_target([_sweep("euler", 16, 500.0, 1), _sweep("sde", 16, 520.0, 1), _sweep("euler", 50, 1.0, 1)])
    assert not missing["measured"] and "NFE >= 50" in missing["reason"]


def test_family_row_takes_the_floor_at_its_own_n_and_the_models_likelihood():
    measured = {"n": 60, "nfe": 1, "fd_effnet": 80.0, "kid": 0.01, "precision": 0.5, "recall": 0.25}
    likelihood = {"bits": 5.25, "unit": "bits/dim", "space": "8-bit pixels (1x32x32)", "kind": "upper bound"}
    row = family_row("vae_prior", "vae", {"temperature": 1.0}, measured, {"n": 60, "fd_effnet": 20.0}, 900.0,
                     likelihood)
    assert row["fd_minus_floor"] == 60.0 and row["floor_fd_effnet"] == 20.0 and row["accuracy"] is None
    assert row["settings"] == "temperature=1" and row["likelihood"] == 5.25
    assert row_key(row) == "vae (temperature=1, n=60)"
    with pytest.raises(ValueError, match="floor at n = 40"):
        family_row("vae_prior", "vae", {}, measured, {"n": 40, "fd_effnet": 20.0}, 900.0)

    table = markdown_table([row]).splitlines()
    assert table[0].startswith("| family | model | settings | NFE | n | FD | floor | FD - floor | KID |")
    assert table[2] == ("| vae_prior | vae | temperature=1 | 1 | 60 | 80 | 20 | 60 | 0.01 | 0.5 | 0.25 | - | 900 | "
                        "5.250 bits/dim |")
