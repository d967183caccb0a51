"""The razorpass pipeline: which passes run on the joint graph, in which order, and how
a pass that cannot apply falls back.

    joint graph --canonicalize--compress_saved--pack_masks--> rewritten joint --min-cut--> (fw, bw) --check_saved

A pass that raises ``BailOut`` (or fails unexpectedly) is logged and the *unmodified*
joint graph is partitioned instead: compilation never crashes because of razorpass and
never yields a gradient other than the dense one or the documented sparsified one.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Callable

import torch.fx as fx

from . import bsr_token_check, canonicalize, check_saved, compress_saved, decompose_sdpa, freeze_blocks, pack_masks
from .common import PassContext

log = logging.getLogger("razorpass")

# Joint-graph passes, in order (mutation last).
JOINT_PASSES: tuple[tuple[str, Callable[[fx.GraphModule, PassContext], fx.GraphModule]], ...] = (
    ("canonicalize", canonicalize.run),
    ("compress_saved", compress_saved.run),
    ("pack_masks", pack_masks.run),
)
# Checks on the partitioned forward graph.
POST_PARTITION_CHECKS = (("check_saved", check_saved.run),)

# Partition attempts before giving up on compression for a graph.
MAX_ATTEMPTS = 3

# Every partition appends a record here while a recorder is active (see
# ``razorpass.record_compiles``); nothing is kept otherwise.
_RECORDERS: list[list[dict[str, Any]]] = []


# Passes on the Dynamo (pre-autograd, torch-level) graph, in order. Each takes
# (gm, example_inputs, config) and returns a GraphModule.
PRE_AUTOGRAD_PASSES: list[tuple[str, Callable[..., fx.GraphModule]]] = [
    ("bsr_token_check", bsr_token_check.run),  # drop_layers needs razorpass.compile
    ("freeze_blocks", freeze_blocks.run),  # trainable_blocks: stop-gradient elsewhere
    ("decompose_sdpa", decompose_sdpa.run),
]


def run_pre_autograd(gm: fx.GraphModule, example_inputs, config) -> fx.GraphModule:
    """Run the pre-autograd passes; a BailOut is raised to the caller (these passes
    change what is trained, so silently skipping one would be wrong)."""
    for name, fn in PRE_AUTOGRAD_PASSES:
        gm = fn(gm, example_inputs, config)
    return gm


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation noise in deepcopy
        return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def describe_saved(fw: fx.GraphModule, ctx: PassContext) -> list[dict[str, Any]]:
    """One entry per tensor the forward graph saves, in order: shape, dtype, whether it
    is a graph input, and which layer / op class it belongs to (mask and values of a
    compressed root carry the root's dense size on the mask entry; a packed boolean
    mask, op class "mask", carries its dense size itself)."""
    from .common import module_path

    owners: dict[str, tuple[dict[str, Any], bool]] = {}
    for c in ctx.stats.get("compressed", []):
        owners[c["outputs"][0]] = (c, True)
        owners[c["outputs"][1]] = (c, False)
    for c in ctx.stats.get("packed", []):
        owners[c["outputs"][0]] = (c, True)
    entries = []
    for n in check_saved.saved_nodes(fw, ctx.num_fwd_outputs):
        val = n.meta.get("val")
        if not hasattr(val, "shape"):
            continue
        entry = {"name": n.name, "shape": tuple(val.shape), "dtype": val.dtype, "input": n.op == "placeholder"}
        if n.name in owners:
            c, is_mask = owners[n.name]
            entry.update(layer=c["layer"], op_class="+".join(c["op_classes"]), dense_bytes=c["dense_bytes"] if is_mask else 0)
        else:
            nbytes = val.numel() * val.element_size()
            entry.update(layer=module_path(check_saved._root(n)) or "(graph)", op_class="dense",
                         dense_bytes=nbytes)
        entries.append(entry)
    return entries


def partition(joint: fx.GraphModule, joint_inputs, ctx: PassContext, partition_fn) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Run the passes on a copy of ``joint``, partition it and check the result."""
    record: dict[str, Any] = {"config": ctx.config, "fallback": None}
    kwargs = dict(num_fwd_outputs=ctx.num_fwd_outputs, static_lifetime_input_indices=ctx.static_lifetime_input_indices)
    try:
        # A root the partitioner still saves dense (it chose to recompute something
        # from it) is left uncompressed and the rest retried, a bounded number of times.
        for attempt in range(MAX_ATTEMPTS):
            gm = _copy(joint)
            for name, fn in JOINT_PASSES:
                gm = fn(gm, ctx)
            rewritten = _copy(gm)
            fw, bw = partition_fn(gm, joint_inputs, **kwargs)
            try:
                for name, check in POST_PARTITION_CHECKS:
                    check(fw, rewritten, ctx)
                break
            except check_saved.DenseSaved as e:
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                log.info("razorpass: leaving %s uncompressed (the partitioner saves it dense)", e.roots)
                ctx.stats["exclude_roots"] = [*ctx.stats.get("exclude_roots", []), *e.roots]
    except Exception as e:  # noqa: BLE001 - any failure of ours falls back, loudly
        reason = f"{type(e).__name__}: {e}"
        log.warning("razorpass: compiling this graph without compression (%s)", reason)
        record["fallback"] = reason
        ctx.stats["compressed"] = []
        ctx.stats["packed"] = []
        fw, bw = partition_fn(joint, joint_inputs, **kwargs)
    record.update(ctx.stats)
    record["saved"] = describe_saved(fw, ctx)
    for rec in _RECORDERS:
        rec.append(record)
    return fw, bw
