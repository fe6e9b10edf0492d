"""What a benchmark section returns, how it prints, and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Section:
    """One benchmark's outcome: a table, the ratios it was written for, and targets (name -> met or not).

    ``ratios`` are medians of per-round ratios (n rounds); ``targets`` map a readable condition such as
    ``"loop / bare >= 0.95"`` to {"value", "met"}; ``samples`` keeps every round's measurement per case.
    """

    name: str
    title: str
    n: int
    columns: list[str]
    rows: list[list]
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list] = field(default_factory=dict)

    def target(self, condition: str, value: float, met: bool) -> None:
        self.targets[condition] = {"value": value, "met": bool(met)}

    def to_dict(self) -> dict:
        return asdict(self)

    def finish(self, samples) -> dict:
        """Attach the raw measurements, print the section, and return it as a dict."""
        self.samples = samples
        result = self.to_dict()
        print_section(result)
        return result


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def text_table(columns: list[str], rows: list[list]) -> str:
    cells = [columns] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_lines(section: dict) -> list[str]:
    lines = [f"{name} = {value:.3g}" for name, value in section["ratios"].items()]
    lines += [f"target {cond}: {'met' if t['met'] else 'NOT met'} ({t['value']:.3g})"
              for cond, t in section["targets"].items()]
    return lines


def print_section(section: dict) -> None:
    print(f"\n== {section['title']} (n = {section['n']} rounds) ==")
    print(text_table(section["columns"], section["rows"]))
    for line in ratio_lines(section) + section["notes"]:
        print(f"  {line}")


def section_markdown(section: dict) -> str:
    parts = [f"## {section['title']}", "", f"n = {section['n']} rounds", "",
             markdown_table(section["columns"], section["rows"]), ""]
    parts += [f"- {line}" for line in ratio_lines(section) + section["notes"]]
    return "\n".join(parts)


def machine_info() -> dict:
    """CPU model, cores, torch version and threads, load averages, and the code version."""
    import torch

    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    changed = subprocess.run(["git", "status", "--porcelain", "--", "gmpipe", "flows"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],
        "commit": (commit.stdout.strip() or "unknown") + (" + uncommitted changes in gmpipe/flows" if changed else ""),
    }
