"""Keeps freed host memory in the process, so that a CPU step does not page-fault afresh.

XLA:CPU mallocs one block for all of an execution's temporaries (1.8 GB for the T5.1.1-small
train step at batch 32) from its worker threads, and frees it at the end. glibc serves a block
that large with its own mmap and unmaps it on free, so every step touches 1.8 GB of new pages:
about 465,000 page faults a step, each page zeroed by the kernel (counted by
`benchmarks/train_step.py --no-keep_freed_memory`). With one arena, no mmap and no trimming,
the freed block goes back to the heap and the next step gets the same, already mapped, pages
(docs/benchmarks.md).

glibc only (Linux); elsewhere nothing changes. Call it before JAX starts its backend: threads
that already have an arena keep it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (parameter, value): every thread allocates from the main heap, never from a private mmap,
# and freed memory at the top of the heap is never returned (-1 is SIZE_MAX to glibc).
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


@functools.cache
def keep_freed_memory() -> bool:
    """Sets SETTINGS with glibc's mallopt, once per process; whether it took effect.

    The cost: the process's resident memory stays at its peak, as with a caching allocator.
    """
    if platform.libc_ver()[0] != "glibc":  # macOS, musl: malloc as it is
        return False
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # A list, not a generator: every setting is applied even when an earlier one is refused.
    return all([mallopt(parameter, value) == 1 for parameter, value in SETTINGS])
