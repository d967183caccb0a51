"""The harness's ``--malloc`` option: what the C allocator does with freed memory, the
same for every method of a run.

* ``system``: the C library's defaults. glibc maps a block above its dynamic mmap
  threshold (at most 32 MiB) fresh on every allocation and unmaps it on free, and
  returns the top of its heap to the system beyond a trim threshold; memory that comes
  back is zero-filled page by page on first touch. A step that allocates and frees
  large temporaries then pays those page faults again every step, and how many depends
  on the process's history (the dynamic threshold moves with what was freed before).
* ``retain``: glibc's ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD,
  2**31 - 1)``, the same as starting Python with ``MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=2147483647``: every block comes from the heap and freed memory
  stays with the process, to be reused without faults. This is what PyTorch's CPU
  launcher (``python -m torch.backends.xeon.run_cpu``) gets by preloading tcmalloc or
  jemalloc. The process keeps its high-water mark of memory.

The harness measures memory from the tensors alive (``measure.PeakMemory``), not from
the process's resident size, so neither choice changes a memory figure; only times.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["MALLOC_CHOICES", "configure"]

MALLOC_CHOICES = ("system", "retain")

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def configure(choice: str) -> str:
    """Apply ``choice``; returns a description for the run's metadata. ``retain``
    needs glibc and raises a clear error elsewhere rather than measuring something else."""
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"--malloc must be one of {MALLOC_CHOICES}, got {choice!r}")
    if choice == "system":
        return "system"
    lib, version = platform.libc_ver()
    if lib != "glibc":
        raise SystemExit(f"razorpass-bench: --malloc retain needs glibc's mallopt; this C library is {lib or 'unknown'}")
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        raise SystemExit("razorpass-bench: glibc refused mallopt(M_MMAP_MAX, 0) / mallopt(M_TRIM_THRESHOLD, ...)")
    return f"retain (glibc {version}: M_MMAP_MAX 0, M_TRIM_THRESHOLD 2**31-1)"
