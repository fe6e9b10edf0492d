"""glibc's malloc as gmpipe sets it on import (``gmpipe.keep_freed_memory``): large blocks come from the heap and freed
memory stays in the process, unless the user tunes those parameters or asks for glibc's own behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gmpipe
from tests.conftest import REPO

# In a new process: glibc's own accounting (mallinfo2) of bytes in mmapped blocks while sixteen 1 MiB tensors are held,
# and of free bytes the heap keeps once they are gone.
PROBE = """
import ctypes, json, gmpipe, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
held = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(16)]
mapped = libc.mallinfo2().hblkhd - before
del held
print(json.dumps({"tuned": gmpipe.ALLOCATOR_TUNED, "mapped": mapped, "kept": libc.mallinfo2().fordblks}))
"""
MIB = 1 << 20


def probe(**variables: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MALLOC_") and key not in ("GLIBC_TUNABLES", gmpipe.ALLOCATOR_VARIABLE)}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**env, **variables}, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_large_blocks_come_from_the_heap_and_freed_memory_stays():
    tuned = probe()
    assert tuned["tuned"] is True
    assert tuned["mapped"] < MIB  # none of the 16 MiB in fresh mappings
    assert tuned["kept"] >= 16 * MIB  # and, freed, kept for the next step


def test_glibc_behaves_as_its_own_when_asked():
    system = probe(GMPIPE_ALLOCATOR="system")
    assert system["tuned"] is False
    assert system["mapped"] >= 15 * MIB  # each block a fresh mmap, unmapped when freed
    assert system["kept"] < 16 * MIB


def test_a_user_who_tunes_these_parameters_keeps_their_settings():
    for variables in ({"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                      {"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"}, {"GMPIPE_ALLOCATOR": "system"}):
        assert gmpipe.keep_freed_memory(variables) is False, variables
    # variables for other parameters leave gmpipe's setting in force
    others = {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    assert gmpipe._user_tunes_malloc(others) is False
