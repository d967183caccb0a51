"""The razorpass pipeline: which passes run on the joint graph, in which order, and how
a pass that cannot apply falls back.

    joint graph --compress_saved--> rewritten joint --min-cut--> (fw, bw) --check_saved

A pass that raises ``BailOut`` (or fails unexpectedly) is logged and the *unmodified*
joint graph is partitioned instead: compilation never crashes because of razorpass and
never yields a gradient other than the dense one or the documented sparsified one.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch.fx as fx

from . import check_saved, compress_saved
from .common import BailOut, PassContext

log = logging.getLogger("razorpass")

# Joint-graph passes, in order (mutation last).
JOINT_PASSES: tuple[tuple[str, Callable[[fx.GraphModule, PassContext], fx.GraphModule]], ...] = (
    ("compress_saved", compress_saved.run),
)
# Checks on the partitioned forward graph.
POST_PARTITION_CHECKS = (("check_saved", check_saved.run),)

# Every partition appends a record here while a recorder is active (see
# ``razorpass.record_compiles``); nothing is kept otherwise.
_RECORDERS: list[list[dict[str, Any]]] = []


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def partition(joint: fx.GraphModule, joint_inputs, ctx: PassContext, partition_fn) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Run the passes on a copy of ``joint``, partition it and check the result."""
    record: dict[str, Any] = {"config": ctx.config, "fallback": None}
    kwargs = dict(num_fwd_outputs=ctx.num_fwd_outputs, static_lifetime_input_indices=ctx.static_lifetime_input_indices)
    try:
        gm = _copy(joint)
        for name, fn in JOINT_PASSES:
            gm = fn(gm, ctx)
        rewritten = _copy(gm)
        fw, bw = partition_fn(gm, joint_inputs, **kwargs)
        for name, check in POST_PARTITION_CHECKS:
            check(fw, rewritten, ctx)
    except Exception as e:  # noqa: BLE001 - any failure of ours falls back, loudly
        reason = f"{type(e).__name__}: {e}"
        level = logging.WARNING
        log.log(level, "razorpass: compiling this graph without compression (%s)", reason)
        record["fallback"] = reason
        ctx.stats["compressed"] = []
        fw, bw = partition_fn(joint, joint_inputs, **kwargs)
    record.update(ctx.stats)
    record["saved"] = [
        {"name": n.name, "shape": tuple(n.meta["val"].shape), "dtype": n.meta["val"].dtype}
        for n in check_saved.saved_nodes(fw, ctx.num_fwd_outputs)
        if hasattr(n.meta.get("val"), "shape")
    ]
    for rec in _RECORDERS:
        rec.append(record)
    return fw, bw
