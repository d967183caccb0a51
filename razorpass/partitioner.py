"""The partitioner hook: where razorpass meets AOTAutograd.

Inductor calls ``config.custom_partitioner_fn`` and AOTAutograd calls ``partition_fn``
with the joint forward+backward graph and ``static_lifetime_input_indices`` (which
inputs are parameters): the one place that knows both the whole graph and which
gradients are weight gradients. :class:`RazorPartitioner` is a picklable object of
(frozen config, code hash) whose ``uuid()`` enters Inductor's cache key, so changing
any option or any pass never reuses a stale compiled graph.
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from . import kernels, passes
from .config import RazorConfig

# Whatever shapes a generated graph: the API modules (config decides k), the passes,
# and the kernels with their C++ source. Found from the packages' own folders, so a new
# module is covered without being listed; the benchmark is not part of it.
_PACKAGES = (importlib.import_module(__package__), passes, kernels)
_SUFFIXES = (".py", ".cpp", ".h")


@functools.cache
def code_files() -> tuple[str, ...]:
    files: set[pathlib.Path] = set()
    for pkg in _PACKAGES:
        for folder in pkg.__path__:
            files.update(f for f in pathlib.Path(folder).rglob("*") if f.suffix in _SUFFIXES and f.is_file()
                         and "__pycache__" not in f.parts)
    return tuple(sorted(str(f) for f in files))


class RazorPartitioner(CustomPartitionerFn):
    def __init__(self, config: RazorConfig):
        self.config = config

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        from functorch.compile import min_cut_rematerialization_partition

        from .passes.context import PassContext
        from .passes.pipeline import partition

        compiler = kwargs.pop("compiler", "inductor")
        ctx = PassContext(
            config=self.config,
            num_fwd_outputs=kwargs.pop("num_fwd_outputs"),
            static_lifetime_input_indices=list(kwargs.pop("static_lifetime_input_indices", None) or []),
        )

        def min_cut(g, inputs, **kw):
            return min_cut_rematerialization_partition(g, inputs, compiler=compiler, **kw, **kwargs)

        return partition(gm, joint_inputs, ctx, min_cut)

    def uuid(self) -> bytes:
        from .passes.pipeline import STRICT_ENV

        return get_hash_for_files(code_files(), extra=f"{self.config!r} strict={os.environ.get(STRICT_ENV, '')}")

    def __reduce__(self):
        return (RazorPartitioner, (self.config,))
