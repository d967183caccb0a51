"""The razorpass pipeline: which passes run, in which order, and how a pass that cannot
apply falls back.

    Dynamo graph --bsr_token_check--freeze_blocks--decompose_sdpa--> (AOTAutograd)
    (Inductor, granularity="sample": mark_samples, before Inductor's own joint-graph passes)
    joint graph  --canonicalize--compress_saved--encode_derivative--pack_masks--> rewritten joint
                 --min-cut--> (fw, bw) --check_saved--> (describe saved) --fold_affine--split_decodes--hoist_decodes--drop_backward_packs--stochastic_round--inline_codecs--center_quantize--> Inductor
                 (memory_budget: after the first check_saved, choose bits per root, back to the joint passes once)

Each stage lists its passes by module name, in order; each module declares its
``PASS`` (``framework.GraphPass``: name, stage, run) and :func:`framework.run_stage`
applies a stage. Adding a pass is its file and its name in one list below.

A joint pass that raises ``BailOut`` (or fails unexpectedly) is logged and the
*unmodified* joint graph is partitioned instead: compilation never crashes because of
razorpass and never yields a gradient other than the dense one or the documented
sparsified one. In strict mode (``RazorConfig.strict`` or ``RAZORPASS_STRICT=1``, which
the test suite sets) the failure is raised instead, so a pass bug cannot pass as a
silent fallback. Pre-autograd passes always raise: they change what is trained. The
post-partition passes change how a graph computes its values, never which tensors
cross to backward; if they fail, the graphs compile as the partitioner made them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._ops import OpOverload

from . import check_saved, memory_budget
from .common import module_path
from .context import PassContext, PreAutogradContext
from .framework import Stage, load, run_stage
from .records import PartitionRecord, SavedTensor

__all__ = ["PRE_AUTOGRAD", "JOINT", "CHECK", "POST_PARTITION", "run_pre_autograd", "partition", "recording",
           "strict_mode", "describe_saved", "MAX_ATTEMPTS", "STRICT_ENV"]

log = logging.getLogger("razorpass")

# Passes on the Dynamo (pre-autograd, torch-level) graph, in order.
PRE_AUTOGRAD = (
    "bsr_token_check",  # drop_layers needs razorpass.compile
    "freeze_blocks",  # trainable_blocks: stop-gradient elsewhere
    "decompose_sdpa",  # "sdpa": attention as explicit math
)
# Joint-graph passes, in order (mutation last).
JOINT = (
    "canonicalize",  # CSE: the same joint graph under both compilers
    "compress_saved",  # weight-gradient inputs, norms, softmax: top-k or per-group codes
    "encode_derivative",  # gelu_encoding="derivN": gelu'(x), quantized
    "pack_masks",  # boolean masks, 8 per byte
)
# Checks on the partitioned forward graph.
CHECK = ("check_saved",)
# Passes on the final forward and backward graphs, in order.
POST_PARTITION = (
    "fold_affine",  # weight gradient from x̂: no replayed γ·x̂ + β written out
    "split_decodes",  # no decoded tensor kept across a heavy op
    "hoist_decodes",  # a weight gradient's decode runs right after dY
    "drop_backward_packs",  # a mask recomputed in backward: no pack/unpack
    "stochastic_round",  # quant_rounding="stochastic": unbiased per-group codes
    "inline_codecs",  # Inductor: codecs with a plain-op form as plain ops
    "center_quantize",  # quantize x - mean without writing it out
)

# Partition attempts before giving up on compression for a graph.
MAX_ATTEMPTS = 3

STRICT_ENV = "RAZORPASS_STRICT"

# Every partition appends a record to each active recorder (see ``recording``).
_recorders: list[list[PartitionRecord]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[PartitionRecord]]:
    """Collect one :class:`PartitionRecord` per graph partitioned inside the block."""
    records: list[PartitionRecord] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.remove(records)


def strict_mode(config) -> bool:
    """Raise pass failures instead of falling back (config field or environment)."""
    return bool(getattr(config, "strict", False)) or os.environ.get(STRICT_ENV, "") not in ("", "0")


def run_pre_autograd(gm: fx.GraphModule, example_inputs, config) -> fx.GraphModule:
    """Run the pre-autograd passes; errors reach the caller (these passes change what is
    trained, so silently skipping one would be wrong). ``trainable_blocks`` also freezes
    the parameters no use trains (``requires_grad=False``), so that a graph Dynamo later
    runs without razorpass (an eager fallback, a forced recompile) trains what this
    one trains."""
    ctx = PreAutogradContext(config, example_inputs)
    run_stage(load(Stage.PRE_AUTOGRAD, PRE_AUTOGRAD), gm, ctx, {})
    frozen = [p for p in ctx.frozen_params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if frozen:
        log.info("razorpass: trainable_blocks froze %d parameters (requires_grad=False)", len(frozen))
    return gm


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation noise in deepcopy
        return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _view_of_input(n: fx.Node) -> bool:
    """A graph input, or a view of one (an expanded buffer): held by the caller anyway."""
    while n.op == "call_function" and isinstance(n.target, OpOverload) and n.args and isinstance(n.args[0], fx.Node):
        ret = n.target._schema.returns
        if not (ret and ret[0].alias_info is not None and not ret[0].alias_info.is_write):
            return False
        n = n.args[0]
    return n.op == "placeholder"


def _storage_bytes(val) -> Any:
    try:
        return val.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (a sparse or nested tensor)
        return val.numel() * val.element_size()


def describe_saved(fw: fx.GraphModule, ctx: PassContext) -> list[SavedTensor]:
    """One entry per tensor the forward graph saves, in order: shape, dtype, whether it
    is a graph input, and which layer / op class it belongs to (the first output of an
    encoded root carries the root's dense size, its other outputs 0)."""
    owners: dict[str, tuple[Any, bool]] = {}
    for r in ctx.encoded:
        for i, name in enumerate(r.outputs):
            owners[name] = (r, i == 0)
    entries = []
    for n in check_saved.saved_nodes(fw, ctx.num_fwd_outputs):
        val = n.meta.get("val")
        if not hasattr(val, "shape"):
            continue
        common = dict(name=n.name, shape=tuple(val.shape), dtype=val.dtype, input=_view_of_input(n),
                      nbytes=_storage_bytes(val))
        if n.name in owners:
            r, first = owners[n.name]
            entries.append(SavedTensor(**common, layer=r.layer, op_class="+".join(r.op_classes),
                                       dense_bytes=r.dense_bytes if first else 0))
        else:
            entries.append(SavedTensor(**common, layer=module_path(check_saved.root_of(n)) or "(graph)",
                                       op_class="dense", dense_bytes=val.numel() * val.element_size()))
    return entries


def _post_partition(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The post-partition passes on a copy of ``gm``; a failure leaves the graph as the
    partitioner made it (these passes change speed, not values), or raises in strict mode."""
    try:
        out = _copy(gm)
        run_stage(load(Stage.POST_PARTITION, POST_PARTITION), out, ctx, ctx.results)
        return out
    except Exception as e:  # noqa: BLE001
        if strict_mode(ctx.config):
            raise
        log.warning("razorpass: post-partition passes skipped (%s: %s)", type(e).__name__, e)
        return gm


def partition(joint: fx.GraphModule, joint_inputs, ctx: PassContext, partition_fn) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Run the joint passes on a copy of ``joint``, partition it and check the result."""
    record = PartitionRecord(config=ctx.config)
    kwargs = dict(num_fwd_outputs=ctx.num_fwd_outputs, static_lifetime_input_indices=ctx.static_lifetime_input_indices)
    try:
        # A root the partitioner still saves dense (it chose to recompute something
        # from it) is left uncompressed and the rest retried, a bounded number of times.
        # Under memory_budget, the first partition (uniform bits) sizes the graph, the
        # choices are made, and the graph is partitioned again with them.
        attempt = 0
        planner = memory_budget.Planner(ctx) if ctx.config.memory_budget is not None else None
        while True:
            ctx.reset()
            gm = _copy(joint)
            run_stage(load(Stage.JOINT, JOINT), gm, ctx, ctx.results)
            ctx.joint = _copy(gm)
            fw, bw = partition_fn(gm, joint_inputs, **kwargs)
            try:
                run_stage(load(Stage.CHECK, CHECK), fw, ctx, ctx.results)
            except check_saved.DenseSaved as e:
                attempt += 1
                if attempt == MAX_ATTEMPTS:
                    raise
                log.info("razorpass: leaving %s uncompressed (the partitioner saves it dense)", e.roots)
                ctx.excluded_roots.extend(e.roots)
                continue
            if planner is None or not planner.replan(describe_saved(fw, ctx)):
                break
            counters["razorpass"]["memory_budget"] += 1
    except Exception as e:  # noqa: BLE001 - any failure of ours falls back, loudly
        if strict_mode(ctx.config):
            raise
        reason = f"{type(e).__name__}: {e}"
        log.warning("razorpass: compiling this graph without compression (%s)", reason)
        counters["razorpass"]["fallback"] += 1
        record.fallback, planner = reason, None
        ctx.reset()
        fw, bw = partition_fn(joint, joint_inputs, **kwargs)
    record.excluded_roots = list(ctx.excluded_roots)
    record.saved = describe_saved(fw, ctx)
    record.budget = planner.record if planner is not None else None
    if record.budget is not None:
        record.budget.saved_bytes = memory_budget.saved_bytes(record.saved)
        if not record.budget.met:
            log.warning("razorpass: memory_budget %.3g not met: the graph saves %d bytes, target %d",
                        record.budget.budget, record.budget.saved_bytes, record.budget.target_bytes)
    if record.fallback is None:
        fw, bw = (_post_partition(g, ctx) for g in (fw, bw))
    record.passes = dict(ctx.results)
    for rec in _recorders:
        rec.append(record)
    return fw, bw
