"""A self-contained HTML report: tables, line plots drawn as inline SVG, grids embedded as data URIs.

Nothing is fetched when it opens (no CDN, no scripts), so it reads the same offline, in CI artifacts and mail.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from gmpipe.artifacts import atomic_file

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
# Series past the palette's length reuse its colours with the next dash pattern, so no two lines look alike.
DASHES = ("", "6 3", "2 2", "8 3 2 3")


def series_style(index: int) -> tuple[str, str]:
    """The colour and SVG ``stroke-dasharray`` ("" for a solid line) of the ``index``-th series."""
    return PALETTE[index % len(PALETTE)], DASHES[(index // len(PALETTE)) % len(DASHES)]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step) + 1)]


def log2_ticks(low: float, high: float, pixels: float, min_gap: float = 34.0) -> list[float]:
    """Powers of two in [low, high] (values, not logs) for an axis ``pixels`` wide, thinned to every 2nd, 4th, ...
    power so that neighbouring labels are at least ``min_gap`` pixels apart (1, 4, 16, 64 rather than a crowd)."""
    first, last = math.ceil(math.log2(low)), math.floor(math.log2(high))
    if last < first:
        return [low]
    per_power = pixels / max(math.log2(high) - math.log2(low), 1e-9)
    stride = 1
    while stride * per_power < min_gap:
        stride *= 2
    return [2.0**k for k in range(first, last + 1) if (k - first) % stride == 0]


def log10_ticks(low: float, high: float, pixels: float, min_gap: float = 16.0) -> list[float]:
    """Values 1, 2, 3 and 5 times a power of ten in [low, high] (both > 0) for an axis ``pixels`` tall, dropping the
    3s, the 2s and then the 5s while neighbouring labels would sit closer than ``min_gap`` pixels; a range with fewer
    than two such values (or only two within one decade) gets the linear axis's round values instead."""
    per_decade = pixels / max(math.log10(high) - math.log10(low), 1e-9)
    ticks: list[float] = []
    for mantissas in ((1, 2, 3, 5), (1, 2, 5), (1, 5), (1,)):
        thinner = [m * 10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                   for m in mantissas if low <= m * 10.0**k <= high]
        if len(thinner) < 2:
            break
        ticks = thinner
        if min(per_decade * math.log10(b / a) for a, b in zip(ticks, ticks[1:], strict=False)) >= min_gap:
            break
    if len(ticks) >= 3 or (ticks and high >= 10 * low):
        return ticks
    return [tick for tick in _ticks(low, high) if tick > 0]


def svg_line_plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
                  log_x: bool = False, width: int = 420, height: int = 260, title: str | None = None,
                  log_y: bool = False) -> str:
    """Polylines with markers, one per named series of (x, y) points, the legend on the right; a log2 x axis
    labelled at sparse powers of two when ``log_x``; a log10 y axis labelled at 1, 2, 3, 5 times powers of ten when
    ``log_y`` (for values spanning decades, e.g. FDs from near the floor to a model 15x over it; non-positive y are
    left out). ``width`` is the plotting area plus the axis labels; the legend adds what its longest name needs."""
    usable = (lambda y: y is not None and math.isfinite(y) and (y > 0 or not log_y))  # noqa: E731
    points = [(x, y) for values in series.values() for x, y in values if usable(y)]
    if not points:
        return "<p><em>no data</em></p>"
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [fx(x) for x, _ in points], [fy(y) for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_low, y_high = min(ys), max(ys)
    pad = 0.05 * (y_high - y_low) if y_high > y_low else max(abs(y_high), 1.0) * 0.05
    if log_y:
        y0, y1 = y_low - pad, y_high + pad
    else:
        y0, y1 = (0.0 if y_low >= 0 and y_low < 0.5 * y_high else y_low - pad), y_high + pad
    left, top, bottom = 62, 26 if title else 12, 42
    legend = 40 + 6.4 * max(len(name) for name in series) if len(series) > 1 else 10
    pw, ph = width - left - 10, height - top - bottom
    total_width = int(width + legend)
    sx = lambda v: left + (fx(v) - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda v: top + ph - (fy(v) - y0) / (y1 - y0) * ph  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" height="{height}" font-size="11" '
           f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>']
    if title:
        out.append(f'<text x="{left}" y="15" font-weight="bold">{html.escape(title)}</text>')
    out += [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>']
    x_ticks = log2_ticks(2**x0, 2**x1, pw) if log_x else _ticks(x0, x1)
    for tick in x_ticks:
        out.append(f'<text x="{sx(tick):.1f}" y="{top + ph + 15}" text-anchor="middle">{tick:g}</text>')
        out.append(f'<line x1="{sx(tick):.1f}" y1="{top + ph}" x2="{sx(tick):.1f}" y2="{top + ph + 4}" '
                   f'stroke="#333"/>')
    for tick in log10_ticks(10**y0, 10**y1, ph) if log_y else _ticks(y0, y1):
        out.append(f'<text x="{left - 5}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
        out.append(f'<line x1="{left}" y1="{sy(tick):.1f}" x2="{left + pw}" y2="{sy(tick):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{html.escape(y_label)}</text>')
    for index, (name, values) in enumerate(series.items()):
        color, dashes = series_style(index)
        dash = f' stroke-dasharray="{dashes}"' if dashes else ""
        valid = sorted((x, y) for x, y in values if usable(y))
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in valid)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
        if len(valid) <= 60:  # markers only where they can be told apart (not on a loss curve of 100s of points)
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.8" fill="{color}"/>' for x, y in valid]
        if len(series) > 1:  # a sample of the line (colour and dashes) before each name
            y = top + 10 + 14 * index
            out.append(f'<line x1="{left + pw + 14}" y1="{y - 4}" x2="{left + pw + 36}" y2="{y - 4}" '
                       f'stroke="{color}" stroke-width="1.8"{dash}/>')
            out.append(f'<text x="{left + pw + 40}" y="{y}" fill="{color}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def side_by_side(items: list[str]) -> str:
    """Figures (SVG or images) laid out in rows that wrap to the page width."""
    return '<div class="figures">' + "".join(f"<div>{item}</div>" for item in items) + "</div>"


def html_table(rows: list[dict], columns: list[str] | None = None, headers: dict[str, str] | None = None) -> str:
    """One row per mapping, in ``columns`` (default: every key seen), headed by ``headers`` where given."""
    if not rows:
        return "<p><em>nothing measured</em></p>"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape((headers or {}).get(c, c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def write_html(path: Path, title: str, sections: list[tuple[str, str]]) -> None:
    """``sections``: (heading, HTML body) pairs, in order."""
    style = ("body{font-family:sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0;font-size:12px}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:right}th{background:#f4f4f4}img{image-rendering:pixelated;max-width:100%}"
             ".wide{overflow-x:auto}"
             "pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}"
             ".figures{display:flex;flex-wrap:wrap;gap:8px}.better{color:#1a7f37}.worse{color:#c0392b}")
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    with atomic_file(path) as handle:
        handle.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                     f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>")
