"""gmpipe: a workflow-orchestrated training pipeline for latent generative models."""

import os
import sys

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

# glibc's malloc serves a block of 128 KiB or more (a threshold it raises up to 32 MiB as such blocks are freed) with a
# fresh mmap, and hands a free heap top beyond twice that threshold back to the kernel. A CPU training step or sampling
# batch allocates and frees activations of 1-40 MB in every layer, so memory went back and forth to the kernel and
# every page of a new activation was a page fault (the train_vae step 14,000 a step, the DiT's forward on a guided
# sampling batch 2,900). Freed memory stays in the process instead (set once here, before torch allocates): 30-100x
# fewer faults, the train_vae step 1.09x, the DiT's sampling forward 1.04x, the train_ldm step 1.02x, the same numbers
# bit for bit (python -m bench --only allocator; README "Allocator"). The cost: up to 1 GiB of freed memory stays with
# the process. A user who sets any of these parameters (MALLOC_*_ variables, GLIBC_TUNABLES) or GMPIPE_ALLOCATOR=system
# keeps glibc's own behaviour.
MALLOPT = {"mmap_threshold": (-3, 32 << 20), "trim_threshold": (-1, 1 << 30), "top_pad": (-2, 64 << 20)}
ALLOCATOR_VARIABLE = "GMPIPE_ALLOCATOR"


def _user_tunes_malloc(environ) -> bool:
    tunables = environ.get("GLIBC_TUNABLES", "")
    return (environ.get(ALLOCATOR_VARIABLE) == "system"
            or any(f"MALLOC_{name.upper()}_" in environ or f"glibc.malloc.{name}" in tunables
                   for name in (*MALLOPT, "mmap_max")))


def keep_freed_memory(environ=os.environ) -> bool:
    """Apply ``MALLOPT`` to glibc's malloc in this process (see above); False where it was not applied: another
    platform or C library, or a user who sets these parameters."""
    if not sys.platform.startswith("linux") or _user_tunes_malloc(environ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's alone: these mallopt parameters are its own  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in MALLOPT.values())


ALLOCATOR_TUNED = keep_freed_memory()
