"""Keep the memory a training step frees for the next step (training on CPUs).

Every step allocates and frees the same activation and gradient tensors. With glibc's
defaults, a block above a moving threshold is mmap'd and unmapped again when freed, and free
memory at the top of the heap goes back to the kernel, so the next step page-faults it all
in again: 130-1,300 faults and 0.3-2.5 ms of kernel time per step in nanoGPT's
shakespeare_char shapes, about 2.5% of the step on 2 cores. torch's CUDA allocator caches
blocks for the same reason; on CPUs torch allocates with malloc, so the trainer sets
malloc's two thresholds instead.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap and are reused; larger ones are still mapped on
# their own (they are rare and their compute dwarfs the faults).
MMAP_THRESHOLD = 64 << 20
# Free memory the heap keeps at its top instead of returning it to the kernel.
TRIM_THRESHOLD = 1 << 30
# Someone who tuned malloc through the environment keeps their settings.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False where that did not happen (another C
    library, or the environment already tunes malloc)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
