"""gmpipe: a workflow-orchestrated training pipeline for latent generative models."""

import os

__version__ = "0.1.0"

# OpenMP worker threads that wait for work sleep instead of spinning. Spinning buys a little latency on an idle
# machine; on a shared one each spinning thread takes a core from the other jobs, and torch's two-thread training
# step ran 9x slower than with sleeping threads beside another job (bench hardware_use, load average 5). It must be
# set before torch loads its OpenMP runtime, so it lives here; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
