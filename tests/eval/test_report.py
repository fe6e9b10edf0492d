"""The report's parts on hand-made inputs: sparse log2 ticks, grid rows named in the margin, loss curves read back
from the loop's own dvclive files, and the previous run read from a real git commit."""

from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gmpipe.config.loop import LoopConfig
from gmpipe.eval import previous_run, report, training_curves
from gmpipe.eval.grids import save_grid
from gmpipe.train.loop import LossStep, train


def test_log2_ticks_are_powers_of_two_spaced_apart():
    # The demo's NFE values 1 ... 198 on a 350-pixel axis: every power would put labels 44 px apart, 1 .. 128.
    assert report.log2_ticks(1, 198, 350) == [1, 2, 4, 8, 16, 32, 64, 128]
    # On 150 pixels they would crowd (19 px apart): every second power.
    assert report.log2_ticks(1, 198, 150) == [1, 4, 16, 64]
    for low, high, pixels in [(1, 2000, 200), (3, 100, 300), (1, 1, 300)]:
        ticks = report.log2_ticks(low, high, pixels)
        assert all(low <= t <= high for t in ticks) or ticks == [low]
        gaps = [pixels * (math.log2(b) - math.log2(a)) / max(math.log2(high / low), 1e-9)
                for a, b in zip(ticks, ticks[1:], strict=False)]
        assert all(gap >= 34 for gap in gaps), (low, high, gaps)


def test_log_plot_labels_do_not_overlap():
    series = {"teacher euler": [(n, 100.0 / n) for n in (1, 2, 4, 8, 16, 32, 100)],
              "teacher sde": [(n, 120.0 / n) for n in (2, 4, 8, 16, 32, 64, 198)]}
    svg = report.svg_line_plot(series, "NFE", "FD", log_x=True)
    assert svg.count("<polyline") == 2 and "teacher sde" in svg
    labels = [float(x) for x, _ in re.findall(r'<text x="([\d.]+)" y="\d+" text-anchor="middle">([\d.]+)</text>', svg)]
    assert len(labels) >= 4 and all(b - a >= 34 for a, b in zip(labels, labels[1:], strict=False))


def test_log10_ticks_are_round_values_spaced_apart():
    # The demo's family FDs (the floor's ~250 to the VAE prior's ~3,600) on a 200-pixel axis.
    assert report.log10_ticks(230, 3800, 200) == [300, 500, 1000, 2000, 3000]
    for low, high, pixels in [(0.5, 2000, 200), (0.5, 2000, 60), (20, 90_000, 150), (1, 10, 30)]:
        ticks = report.log10_ticks(low, high, pixels)
        assert len(ticks) >= 2 and all(low <= tick <= high for tick in ticks), (low, high, ticks)
        gaps = [pixels * math.log10(b / a) / math.log10(high / low) for a, b in zip(ticks, ticks[1:], strict=False)]
        assert all(gap >= 16 for gap in gaps), (low, high, gaps)
    assert report.log10_ticks(405, 4010, 200) == [500, 1000, 2000, 3000]  # just under a decade: still log values
    assert report.log10_ticks(300, 900, 200) == [400, 600, 800]  # two log values only: the linear axis's round values


def test_log_y_plot_spaces_decades_evenly_and_leaves_out_what_has_no_log():
    svg = report.svg_line_plot({"a": [(1, 100.0), (2, 1000.0), (4, 10_000.0), (8, 0.0)]}, "NFE", "FD", log_x=True,
                               log_y=True)
    heights = [float(y) for y in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)"', svg)]
    assert len(heights) == 3  # y = 0 has no logarithm: left out, not drawn at the bottom
    assert heights[0] > heights[1] > heights[2] and heights[0] - heights[1] == pytest.approx(heights[1] - heights[2],
                                                                                             abs=0.15)
    assert ">1000</text>" in svg and ">10000</text>" in svg


def test_series_past_the_palette_get_their_own_dashes_in_the_lines_and_the_legend():
    count = len(report.PALETTE) + 3
    svg = report.svg_line_plot({f"model {i}": [(1, 1.0 + i), (2, 2.0 + i)] for i in range(count)}, "NFE", "FD")
    lines = re.findall(r'<polyline [^>]*stroke="(#[0-9a-f]{6})" stroke-width="1.8"(?: stroke-dasharray="([\d ]+)")?',
                       svg)
    assert len(lines) == count and len(set(lines)) == count  # no two series drawn alike
    assert all(dash == "" for _, dash in lines[:len(report.PALETTE)])
    assert all(dash for _, dash in lines[len(report.PALETTE):])
    samples = re.findall(r'<line [^>]*stroke="(#[0-9a-f]{6})" stroke-width="1.8"(?: stroke-dasharray="([\d ]+)")?',
                         svg)
    assert samples == lines  # each legend entry shows its series' colour and dashes


def test_grid_rows_are_named_in_the_margin(tmp_path):
    images = np.full((6, 1, 8, 8), 128, np.uint8)
    save_grid(images, tmp_path / "plain.png", columns=3, scale=2)
    save_grid(images, tmp_path / "named.png", columns=3, scale=2, row_labels=["Sneaker", "a photo of a bag"])
    plain, named = (np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "named.png"))
    margin = named.shape[1] - plain.shape[1]
    assert named.shape[0] == plain.shape[0] and margin > 40
    np.testing.assert_array_equal(named[:, margin:], plain)  # the grid itself is untouched
    row_height = 2 * (8 + 2)
    for row in range(2):  # dark text in the margin beside each row
        band = named[2 + row * row_height: (row + 1) * row_height, :margin]
        assert (band < 128).sum() > 20, row
    try:
        save_grid(images, tmp_path / "bad.png", columns=3, row_labels=["one"])
    except ValueError as error:
        assert "1 row labels for a grid of 2 rows" in str(error)
    else:
        raise AssertionError("a label count that does not match the rows must fail")


def test_loss_curves_are_read_from_the_loops_own_files(tmp_path):
    x, y = torch.randn(32, 2), torch.randn(32, 1)

    def loss(batch, step, context, modules):
        value = (modules["model"](batch[0]) - batch[1]).square().mean()
        return value, {"mse": value.detach()}

    config = LoopConfig(steps=6, batch_size=4, log_every=2, checkpoint_every=6, lr=0.01, warmup_steps=0)
    result = train(config, [LossStep("model", nn.Linear(2, 1), loss)], len(x),
                   lambda index, device: (x[index], y[index]), tmp_path / "checkpoints", live_dir=tmp_path / "live")
    curves = training_curves.read_curves(tmp_path / "live")
    assert list(curves) == ["model/mse"]  # the learning rate is logged too, but is not a loss
    assert [step for step, _ in curves["model/mse"]] == [2, 4, 6]
    assert [value for _, value in curves["model/mse"]] == pytest.approx([r["model/mse"] for r in result.history])
    assert training_curves.read_curves(tmp_path / "missing") == {}


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_previous_run_is_the_committed_metrics(tmp_path):
    assert previous_run.committed_metrics(tmp_path) is None  # no git at all
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "ci@example.invalid")
    _git(tmp_path, "config", "user.name", "ci")
    assert previous_run.committed_metrics(tmp_path) is None  # no commit yet
    metrics = tmp_path / "reports" / "metrics.json"
    metrics.parent.mkdir()
    before = {"families": {"teacher (n=10)": {"fd_effnet": 50.0, "accuracy": 0.5},
                           "gone (n=10)": {"fd_effnet": 70.0}},
              "vae": {"psnr": 20.0}, "classifier": {"test_accuracy": 0.8}}
    metrics.write_text(json.dumps(before))
    _git(tmp_path, "add", "reports/metrics.json")
    _git(tmp_path, "commit", "-qm", "first run")
    now = {"families": {"teacher (n=10)": {"fd_effnet": 40.0, "accuracy": 0.75, "likelihood": float("nan")},
                        "new (n=10)": {"fd_effnet": 30.0}},
           "vae": {"psnr": 21.5}, "classifier": {"test_accuracy": 0.8}}
    metrics.write_text(json.dumps(now))  # the workspace changed; the previous run is still the committed one
    committed = previous_run.committed_metrics(tmp_path)
    assert committed.metrics == before and committed.description.endswith("first run") and committed.commit

    rows = {row["row"]: row for row in previous_run.compare_families(now, committed.metrics)}
    assert list(rows) == ["teacher (n=10)", "new (n=10)", "gone (n=10)"]
    assert rows["teacher (n=10)"]["fd_effnet"] == (50.0, 40.0, -10.0)
    assert rows["teacher (n=10)"]["accuracy"] == (0.5, 0.75, 0.25)
    assert rows["teacher (n=10)"]["likelihood"] == (None, None, None)  # NaN is no number
    assert rows["new (n=10)"]["fd_effnet"] == (None, 30.0, None) and rows["gone (n=10)"]["fd_effnet"][1] is None
    summary = previous_run.summary_changes(now, committed.metrics)
    assert ("autoencoder PSNR (dB)", 20.0, 21.5, True) in summary
    assert [name for name, *_ in summary] == ["autoencoder PSNR (dB)", "classifier test accuracy"]

    metrics.write_text("{not json")
    _git(tmp_path, "commit", "-qam", "broken")
    assert previous_run.committed_metrics(tmp_path) is None  # a damaged file is no previous run, not a crash
