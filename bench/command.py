"""The command line every benchmark entry point shares: ``python -m bench`` (all sections, ``bench.run_all``) and
``python -m bench.<section>`` (one section, :func:`section_main`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, not minutes")
    parser.add_argument("--root", type=Path, help="a project folder: its models (models/ldm, vae, student, ...), "
                        "data and reports (metrics.json, pipeline_run.json)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    return parser


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def section_main(run: Callable[..., dict]) -> None:
    """Command line of a single section module: ``python -m bench.sampling [--quick] [--root DIR]``."""
    args = parser(run.__module__).parse_args()
    set_threads(args.threads)
    run("quick" if args.quick else "full", args.root)
