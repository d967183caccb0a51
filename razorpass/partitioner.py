"""The partitioner hook: where razorpass meets AOTAutograd.

Inductor calls ``config.custom_partitioner_fn`` and AOTAutograd calls ``partition_fn``
with the joint forward+backward graph and ``static_lifetime_input_indices`` (which
inputs are parameters): the one place that knows both the whole graph and which
gradients are weight gradients. :class:`RazorPartitioner` is a picklable object of
(frozen config, code hash) whose ``uuid()`` enters Inductor's cache key, so changing
any option or any pass never reuses a stale compiled graph.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from .config import RazorConfig

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _code_files() -> tuple[str, ...]:
    files = sorted((_ROOT / "passes").glob("*.py")) + [
        _ROOT / "triton_kernels" / "topk_compress.py",
        _ROOT / "razorpass" / "partitioner.py",
        _ROOT / "razorpass" / "ops.py",
        _ROOT / "razorpass" / "format.py",
    ]
    return tuple(str(f) for f in files if f.exists())


class RazorPartitioner(CustomPartitionerFn):
    def __init__(self, config: RazorConfig):
        self.config = config

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        from functorch.compile import min_cut_rematerialization_partition

        from passes.common import PassContext
        from passes.pipeline import partition

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
        return get_hash_for_files(_code_files(), extra=repr(self.config))

    def __reduce__(self):
        return (RazorPartitioner, (self.config,))
