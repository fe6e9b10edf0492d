"""Sampling speed at equal FD, read from an evaluate run: the cheapest setting within the tolerance of the teacher's
FD at the same n, per model and sampler."""

from __future__ import annotations

import pytest

from bench import family_speed
from bench.family_speed import Measured, cheapest_within
from tests.bench.fixtures import write_evaluate_output


def by_curve(section: dict) -> dict[tuple[int, str], list]:
    return {(row[0], row[2]): row for row in section["rows"]}


def test_each_curve_gets_its_cheapest_setting_within_the_tolerance_at_the_teachers_n(tmp_path):
    write_evaluate_output(tmp_path)
    section = family_speed.run("quick", tmp_path)
    rows = by_curve(section)
    # n = 100: the teacher's FD is 100, the limit 110.
    assert rows[(100, "student:a")][3:] == [2, "sampler=ddim, steps=2, guidance=0", 108.0, pytest.approx(1.08), 150.0,
                                            pytest.approx(15.0)]  # not 4 steps, though measured faster
    assert rows[(100, "gan")][3] == 1 and rows[(100, "gan")][-1] == pytest.approx(40.0)  # 109.9: just within
    assert rows[(100, "student:b")][3] is None and rows[(100, "student:b")][4].startswith(
        "not reached (lowest FD 1.3x the teacher's, NFE 1)")
    teacher = rows[(100, "teacher euler")]
    assert teacher[4] == "sampler=euler, steps=50, guidance=1, shift=1" and teacher[-1] == 1.0  # not the w = 2 row
    # n = 40, from the NFE sweep file: the teacher's 50 Euler steps give FD 80, the limit 88.
    assert rows[(40, "teacher euler")][3:6] == [16, "sampler=euler, steps=8, guidance=1", 87.0]
    assert rows[(40, "teacher euler")][-1] == pytest.approx(60.0 / 12.0)
    assert rows[(40, "teacher heun")][3] == 14 and rows[(40, "teacher heun")][-1] == pytest.approx(40.0 / 12.0)
    # n = 60 has no teacher row: its student is not compared with another n's teacher.
    assert not any(row[0] == 60 for row in section["rows"])
    assert any("n = 60: no reference teacher row" in note for note in section["notes"])
    assert set(section["ratios"]) == {
        "student:a / teacher images/s at FD <= 1.1x (n=100)", "gan / teacher images/s at FD <= 1.1x (n=100)",
        "teacher euler / teacher images/s at FD <= 1.1x (n=40)", "teacher heun / teacher images/s at FD <= 1.1x (n=40)"}
    expected = "2 CPUs, 2 torch threads, device cpu, networks in fp32, 1-minute load 0.25"
    assert any(expected in note for note in section["notes"])


def test_a_tighter_tolerance_moves_the_choice_to_more_evaluations(tmp_path):
    write_evaluate_output(tmp_path)
    rows = by_curve(family_speed.run("quick", tmp_path, tolerance=1.02))
    assert rows[(100, "student:a")][3] == 4  # FD 101 <= 102; 108 is not
    assert rows[(100, "gan")][3] is None
    assert rows[(40, "teacher euler")][3] == 32  # FD 81 <= 81.6


def test_a_sweep_file_without_speeds_leaves_the_family_table_only(tmp_path):
    write_evaluate_output(tmp_path, sweep_speeds=False)
    section = family_speed.run("quick", tmp_path)
    rows = by_curve(section)
    assert rows[(40, "teacher euler")][3] == 100 and rows[(40, "teacher heun")][3] == 198  # the table's rows only
    assert any("no images_per_second column" in note for note in section["notes"])


def test_ties_in_evaluations_go_to_the_faster_row_and_nothing_within_is_none():
    def row(nfe, fd, speed):
        return Measured("latent_diffusion", "student:a", f"nfe={nfe}", 100, nfe, fd, speed)

    rows = [row(2, 105.0, 90.0), row(2, 104.0, 95.0), row(1, 111.0, 300.0), row(8, 100.0, 20.0)]
    assert cheapest_within(rows, 110.0) == rows[1]
    assert cheapest_within(rows, 99.0) is None


def test_without_an_evaluate_run_the_section_says_so(tmp_path):
    section = family_speed.run("quick", tmp_path)
    assert section["rows"] == [] and section["ratios"] == {}
    assert section["notes"][0].startswith(f"not measured: {tmp_path / 'reports' / 'metrics.json'} not found")
