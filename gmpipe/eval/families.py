"""One table of every trained model, whatever its family: a row per model and setting it was measured at.

A row joins what ``evaluate`` measured on one set of generated images (``gmpipe.eval.generated.Reference.measure``)
with how the model was run and what it costs:

| column | meaning |
|---|---|
| family, model | ``family.json``'s family; the model folder (``teacher`` = models/ldm, ``student:NAME``) |
| settings | the generator settings the images were made with (sampler, steps, guidance, temperature, ...) |
| nfe | network evaluations per image (a guided diffusion step counts 2, an autoregressive token 1 or 2) |
| n, fd_effnet | n generated vs n real test images; the Frechet distance on EfficientNet-Lite0 features |
| floor_fd_effnet, fd_minus_floor | the same distance between n train and n test images, and the excess over it |
| kid, precision, recall, accuracy | the other metrics at the same n (accuracy: conditional models only) |
| images_per_second | generation on this machine, decoding included, timed around ``Generator.generate`` |
| likelihood, likelihood_unit, likelihood_space | the model's test likelihood where its family defines one |

The Frechet distance is biased upward by roughly 1/n, so a distance is compared only with others at the same n
(and with the floor at that n); the excess over the floor removes most of the bias. Images per second are measured
once, on a machine that may be shared, with whatever batch size ``evaluate.batch_size`` gives: ratios within one
run mean more than the absolute values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

COLUMNS = ["family", "model", "settings", "nfe", "n", "fd_effnet", "floor_fd_effnet", "fd_minus_floor", "kid",
           "precision", "recall", "accuracy", "images_per_second", "likelihood", "likelihood_unit",
           "likelihood_space"]
HEADERS = {"nfe": "NFE", "fd_effnet": "FD", "floor_fd_effnet": "floor", "fd_minus_floor": "FD - floor",
           "kid": "KID", "images_per_second": "images/s (with decoding)"}
SDE_TARGET_RATIO, SDE_TARGET_MIN_NFE = 1.2, 50


def describe_settings(settings: dict[str, Any]) -> str:
    """``sampler=euler, steps=50, guidance=1`` from a settings mapping (floats without trailing zeros)."""
    return ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in settings.items())


def family_row(family: str, model: str, settings: dict[str, Any], measured: dict, floor: dict,
               images_per_second: float, likelihood: dict | None = None) -> dict:
    """One row of the table (module docstring) from a measurement of n images, the floor at the same n and the
    model's test likelihood (``gmpipe.generator.Likelihood.to_dict()``), if it has one."""
    if floor.get("n") != measured["n"]:
        raise ValueError(f"floor at n = {floor.get('n')} for a measurement at n = {measured['n']}")
    row = {"family": family, "model": model, "settings": describe_settings(settings), **settings,
           "nfe": measured.get("nfe"), "n": measured["n"], "fd_effnet": measured["fd_effnet"],
           "floor_fd_effnet": floor["fd_effnet"], "fd_minus_floor": measured["fd_effnet"] - floor["fd_effnet"],
           "kid": measured.get("kid"), "precision": measured.get("precision"), "recall": measured.get("recall"),
           "accuracy": measured.get("accuracy"), "images_per_second": images_per_second}
    if likelihood is not None:
        row.update(likelihood=likelihood["bits"], likelihood_unit=likelihood["unit"],
                   likelihood_space=likelihood["space"], likelihood_kind=likelihood["kind"])
    return row


def row_key(row: dict) -> str:
    """A readable key for ``metrics.json``: ``teacher (sampler=euler, steps=50, ..., n=1000)``."""
    return f"{row['model']} ({row['settings']}, n={row['n']})"


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def markdown_table(rows: Iterable[dict]) -> str:
    """The table in Markdown (the Prefect artifact), one row per measurement, ``-`` where a column does not
    apply; the likelihood cell carries its unit."""
    columns = [c for c in COLUMNS if c not in ("likelihood_unit", "likelihood_space")]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            if column == "likelihood" and row.get("likelihood") is not None:
                cells.append(f"{row['likelihood']:.3f} {row['likelihood_unit']}")
            elif column == "images_per_second":
                cells.append(_cell(row.get(column), 1))
            else:
                cells.append(_cell(row.get(column)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fd_vs_nfe_series(rows: Iterable[dict]) -> dict[str, list[tuple[float, float]]]:
    """(NFE, FD) points per model, for a plot with every family on it (rows at one n)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("nfe") and row.get("fd_effnet") is not None:
            series.setdefault(f"{row['model']} ({row['family']})", []).append((row["nfe"], row["fd_effnet"]))
    return series


def sde_target(sweep_rows: Iterable[dict], ratio: float = SDE_TARGET_RATIO, min_nfe: int = SDE_TARGET_MIN_NFE,
               reference: str = "euler", sampler: str = "sde") -> dict:
    """The reverse-SDE sampler's FD over Euler's at the same step count, at the largest step count of the NFE sweep
    where both ran with NFE >= ``min_nfe`` (issue target: <= ``ratio``). ``measured`` False says why not."""
    by_sampler: dict[str, dict[int, dict]] = {}
    for row in sweep_rows:
        by_sampler.setdefault(row["sampler"], {})[row["steps"]] = row
    common = [steps for steps in set(by_sampler.get(reference, {})) & set(by_sampler.get(sampler, {}))
              if by_sampler[sampler][steps]["nfe"] >= min_nfe and by_sampler[reference][steps]["nfe"] >= min_nfe]
    target = {"target_ratio": ratio, "min_nfe": min_nfe}
    if not common:
        return {**target, "measured": False,
                "reason": f"the NFE sweep has no step count with NFE >= {min_nfe} for both {sampler} and {reference}"}
    steps = max(common)
    ours, theirs = by_sampler[sampler][steps], by_sampler[reference][steps]
    value = ours["fd_effnet"] / max(theirs["fd_effnet"], 1e-12)
    return {**target, "measured": True, "steps": steps, "nfe": ours["nfe"], "n": ours["n"],
            f"fd_{sampler}": ours["fd_effnet"], f"fd_{reference}": theirs["fd_effnet"], "ratio": value,
            "met": value <= ratio}
