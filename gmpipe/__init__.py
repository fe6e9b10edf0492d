"""gmpipe: a workflow-orchestrated training pipeline for latent generative models."""

import os

__version__ = "0.1.0"

# OpenMP worker threads that wait for the next parallel region spin (ACTIVE) rather than sleep after a short spin
# (libgomp's default) or at once (PASSIVE). Measured on 2 cores, the demo's train_vae loop (60 steps, batch 32, two
# threads, bench.thread_policy): alone, spinning 10.4 s, libgomp's default 10.5 s, sleeping 18.5 s; beside a busy
# one-thread process 30.6, 132.0 and 42.4 s; beside a copy of itself 85.9, 368.3 and 286.4 s. Spinning is fastest in
# every case; one thread (compute.threads: 1, 17.3 s alone) is the only setting that does not slow down beside
# other work. It must be set before torch loads its OpenMP runtime, so it lives here; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
