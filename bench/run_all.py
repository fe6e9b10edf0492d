"""Run every benchmark section and write ``reports/bench.json`` and ``reports/bench.md``.

    python -m bench                      # full sizes (minutes; run it on a quiet machine)
    python -m bench --quick              # tiny sizes (seconds): checks that everything runs
    python -m bench --root DIR           # DIR: a project that ran the pipeline (models/, data/, reports/)
    python -m bench --only sampling data --threads 1 --out /tmp/bench

Sections that measure models (sampling, one_step_decoding, evaluate_costs' model cases) use DIR's models, or random
ones of the demo's sizes without them; family_speed and demo_stages measure nothing themselves: they read DIR's
reports/metrics.json (with reports/evaluate/plots/nfe_sweep.csv) and reports/pipeline_run.json (DIR defaults to the
current folder for those two).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import (
    allocator,
    command,
    conv_layout,
    cpu_kernels,
    data_throughput,
    demo_stages,
    evaluate_costs,
    family_speed,
    hardware_use,
    latent_caching,
    one_step_decoding,
    orchestration,
    precision,
    sampling,
    scale_plan,
    thread_policy,
    trainer_overhead,
)
from bench.report import machine_info, markdown_table, ratio_lines, section_markdown

SECTIONS: dict[str, Callable[..., dict]] = {
    "trainer_overhead": trainer_overhead.run,
    "latent_caching": latent_caching.run,
    "hardware_use": hardware_use.run,
    "sampling": sampling.run,
    "orchestration": orchestration.run,
    "data": data_throughput.run,
    "conv_layout": conv_layout.run,
    "precision": precision.run,
    "thread_policy": thread_policy.run,
    "allocator": allocator.run,
    "cpu_kernels": cpu_kernels.run,
    "scale_plan": scale_plan.run,
    "evaluate_costs": evaluate_costs.run,
    "one_step_decoding": one_step_decoding.run,
    "family_speed": family_speed.run,
    "demo_stages": demo_stages.run,
}


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = ["# gmpipe benchmarks", "", f"`{report['command']}` ({report['size']} sizes, "
             f"{report['seconds']:.0f} s)", "", markdown_table(["machine", ""], [[k, v] for k, v in machine.items()]),
             "", "## Ratios and targets", ""]
    for name, section in report["sections"].items():
        lines += [f"- **{name}**: " + "; ".join(ratio_lines(section))]
    for section in report["sections"].values():
        lines += ["", section_markdown(section)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = command.parser("gmpipe benchmarks: ratios measured side by side in one run")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where bench.json and bench.md go")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    args = parser.parse_args(argv)
    command.set_threads(args.threads)
    size = "quick" if args.quick else "full"
    machine = machine_info()
    start = time.perf_counter()
    sections = {}
    for name, run in SECTIONS.items():
        if not args.only or name in args.only:
            began = time.perf_counter()
            sections[name] = {**run(size, args.root), "seconds": time.perf_counter() - began}
            print(f"  ({name}: {sections[name]['seconds']:.1f} s)", flush=True)
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    report = {"command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
              "size": size, "seconds": time.perf_counter() - start, "machine": machine, "sections": sections}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench.md").write_text(markdown(report))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.md'} ({report['seconds']:.0f} s; load average "
          f"{machine['load_average_1_5_15min']} before, {machine['load_average_after']} after)")
    missed = [cond for s in sections.values() for cond, t in s["targets"].items() if not t["met"]]
    print("targets not met: " + ("; ".join(missed) if missed else "none"))
    return 0
