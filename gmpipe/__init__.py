"""gmpipe: a workflow-orchestrated training pipeline for latent generative models."""

import os

__version__ = "0.1.0"

# OpenMP worker threads that wait for the next parallel region spin (ACTIVE) rather than sleep at once (PASSIVE) or
# after a short spin (libgomp's default). The demo's train_vae loop on 2 cores, alone: spinning 1.40-1.78x faster than
# sleeping (python -m bench.thread_policy; README "Threads"). Beside another busy process two threads lose 1.5-8x
# spinning or sleeping (8-35x with libgomp's default), and which of the two loses less changed between runs; one thread
# (compute.threads: 1) loses nothing there.
# The spin is bounded (SPIN_COUNT, about a second here) so that a process that stops computing, a notebook or a
# sampling command, does not keep a core busy; unbounded (libgomp's ACTIVE) measured no faster, alone or beside a busy
# process. Both must be set before torch loads its OpenMP runtime, so they live here; values the user set win.
SPIN_COUNT = "100000000"
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
