"""Top-k compress / decompress: the native CPU kernel (C++, OpenMP over groups).

Built on first use with ``torch.utils.cpp_extension`` (cached in the torch extensions
directory) from ``csrc/topk_compress_cpu.cpp``; bit-identical to ``torch_compress`` /
``torch_decompress`` (and the offsets layout's ``torch_mask_to_offsets`` /
``torch_decompress_offsets``) in ``topk_compress.py`` and about two orders of magnitude faster
(a histogram pass, a small nth_element and a vectorised mask pass per group instead of
a top-k; the C++ file's header describes the passes).
``load()`` returns None when the kernel cannot be built (no C++ compiler): the caller
then uses the PyTorch kernel.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import time

import torch

log = logging.getLogger("razorpass")

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "topk_compress_cpu.cpp"


def build(name: str, source: pathlib.Path):
    """The extension module built from ``source`` (cached), or None when it cannot be
    built (no C++ compiler, or ``RAZORPASS_CPU_KERNEL=torch``)."""
    if os.environ.get("RAZORPASS_CPU_KERNEL", "native") == "torch":
        return None
    return _build(name, str(source))


# A build takes a minute or two; a lock older than this was left by a process killed
# while it built (torch would wait on it forever).
STALE_LOCK_S = 900


def clear_stale_lock(build_dir: str) -> bool:
    """Remove ``build_dir/lock`` if it is older than ``STALE_LOCK_S``; True if removed."""
    lock = pathlib.Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age < STALE_LOCK_S:
        return False
    log.warning("razorpass: removing %s, left %.0f s ago by a kernel build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


# How often a process waiting on another's build looks at the lock again.
LOCK_POLL_S = 1.0


def wait_for_build(build_dir: str) -> None:
    """Return once ``build_dir/lock`` is gone: another process finished its build, or its
    lock turned stale while this one waited (then removed, with a warning). torch's own
    wait never looks at the lock's age, so a process that started waiting on a build
    whose builder was later killed would wait forever."""
    lock = pathlib.Path(build_dir) / "lock"
    while lock.exists() and not clear_stale_lock(build_dir):
        time.sleep(LOCK_POLL_S)


@functools.lru_cache(maxsize=None)
def _build(name: str, source: str):
    try:
        from torch.utils import cpp_extension

        # the shared header is hashed with the source: editing it rebuilds the kernel
        header = pathlib.Path(source).with_name("float_types.h")
        digest = hashlib.sha256(header.read_bytes()).hexdigest()[:8]
        wait_for_build(cpp_extension._get_build_directory(f"{name}_{digest}", verbose=False))
        return cpp_extension.load(
            name=f"{name}_{digest}",
            sources=[source],
            # no fused multiply-add: the kernels round as the PyTorch kernels do
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler: the PyTorch kernel still works
        log.warning("razorpass: native CPU kernel %s unavailable (%s); using the PyTorch kernel", name, e)
        return None


def load():
    return build("razorpass_topk_cpu", _SOURCE)


def cpu_compress(x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype):
    """(mask, values) or None if the native kernel does not handle this case."""
    if x.dtype not in SUPPORTED or value_dtype not in SUPPORTED:
        return None
    ext = load()
    if ext is None:
        return None
    mask, values = ext.compress(x.detach(), group_size, k, value_dtype)
    return mask, values


def _decode(fn_name: str, index, values, shape, dtype, group_size):
    if values.dtype not in SUPPORTED or dtype not in SUPPORTED:
        return None
    ext = load()
    if ext is None:
        return None
    n = 1
    for s in shape:
        n *= s
    return getattr(ext, fn_name)(index, values, n, group_size, dtype).view(shape)


def cpu_decompress(mask, values, shape, group_size, dtype):
    return _decode("decompress", mask, values, shape, dtype, group_size)


def cpu_mask_to_offsets(mask, group_size: int, k: int, dtype: torch.dtype):
    """The offsets layout of ``mask`` (``torch_mask_to_offsets``), or None."""
    ext = load()
    return None if ext is None else ext.mask_to_offsets(mask, group_size, k, dtype)


def cpu_decompress_offsets(offsets, values, shape, group_size, dtype):
    return _decode("decompress_offsets", offsets, values, shape, dtype, group_size)
