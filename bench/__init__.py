"""Benchmarks that print ratios measured side by side in one run (``python -m bench [--quick] [--root DIR]``).

Machines are noisy (this one is shared), so every benchmark runs its cases interleaved, round after round in a
rotated order, and reports medians and the median of the per-round ratios, with n, the number of rounds.
Each section module has ``run(size, root) -> dict`` that prints its table; :mod:`bench.run_all` runs them all and
writes ``reports/bench.json`` and ``reports/bench.md``.
"""
