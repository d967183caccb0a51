"""razorpass: compress what autograd saves for backward, inside torch.compile.

    import torch
    m = torch.compile(model, backend="razor", options={"sparsity": 0.9})

Importing razorpass compiles nothing, initialises no device and changes no global
compiler setting; the custom ops are registered the first time they are needed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .config import RazorConfig
from .format import Compressed, compress, compressed_nbytes, decompress

__version__ = "0.1.0"

__all__ = [
    "RazorConfig",
    "compile",
    "razor",
    "compress",
    "decompress",
    "Compressed",
    "compressed_nbytes",
    "memory_report",
    "gradient_fidelity",
    "record_compiles",
    "reference",
    "find_blocks",
]


def __getattr__(name: str) -> Any:  # lazy: keep `import razorpass` light
    if name in ("compile", "razor"):
        from . import backend

        return getattr(backend, name)
    if name == "memory_report":
        from .report import memory_report

        return memory_report
    if name == "gradient_fidelity":
        from .fidelity import gradient_fidelity

        return gradient_fidelity
    if name == "find_blocks":
        from .passes.blocks import find_blocks

        return find_blocks
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module 'razorpass' has no attribute {name!r}")


@contextlib.contextmanager
def record_compiles() -> Iterator[list]:
    """Collect one ``PartitionRecord`` per partitioned graph compiled inside the block
    (``razorpass.passes.records``): what was encoded (``compressed``: ``QuantizedRoot``,
    root, op classes, modules, group size, bits, or top-k ``CompressedRoot`` with k;
    ``quantized``: GELU derivative codes) or packed (``PackedMask``), what stays saved
    (``SavedTensor``), which roots a retry left dense, and the fallback reason if a
    pass could not apply.

    Inside the block AOTAutograd's compile cache is off (Inductor's own cache stays on):
    a cache hit returns the compiled graphs without partitioning them again, so a warm
    cache (a second run of the same script) would leave the list silently empty. A
    model compiled before the block and not recompiled in it adds no record."""
    import torch._functorch.config

    from .passes.pipeline import recording

    with recording() as records, torch._functorch.config.patch(enable_autograd_cache=False):
        yield records


def _register_backend() -> None:
    """Register ``razor`` with Dynamo unless the installed entry point already does
    (registering both makes Dynamo fail with ``duplicate name: razor``)."""
    from importlib.metadata import entry_points

    if any(ep.name == "razor" for ep in entry_points(group="torch_dynamo_backends")):
        return
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "razor" not in _BACKENDS:
        from .backend import razor

        register_backend(name="razor")(razor)


_register_backend()
