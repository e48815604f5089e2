"""``tune_malloc()``: keep glibc from handing batch-sized buffers back to the kernel.

Why. A pull of 16384 rows of dim 64 moves 4 MiB buffers through the trainer's
process: gRPC's response, the rows returned. glibc serves such a buffer from
the heap once its dynamic mmap threshold has grown past it, but trims the heap
top as soon as more than twice that threshold lies free there, which two or
three freed 4 MiB buffers per call are enough for. The next call then touches
fresh pages: about 1000 page faults per 4 MiB, 2-3 ms on the benchmark VM,
more than the rest of the call (docs/benchmarks.md, "Service"). Fixing the
thresholds keeps the freed buffers in the heap for the next batch.

The setting is process-wide (it is glibc's, not PSClient's), so it is an
explicit call for the trainer's process, never a side effect of a client; the
same effect without code: ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456`` in the environment. The cost: up to
``trim_threshold`` bytes of freed memory per malloc arena stay mapped.

Example::

    from embps.client import PSClient
    from embps.client.memory import tune_malloc

    tune_malloc()   # once, at the trainer's start
    ps = PSClient(addresses)
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit; buffers below it come from the heap
DEFAULT_TRIM_THRESHOLD = 256 << 20  # free heap top kept before giving memory back


def tune_malloc(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if glibc took both.

    False (and nothing changed) where the C library is not glibc.
    """
    libc = None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1
    return ok_mmap and ok_trim
