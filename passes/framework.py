"""What a razorpass graph pass is, and the runner that applies a stage of them.

A pass is one module of ``razorpass.passes`` that ends with

    PASS = GraphPass("split_decodes", Stage.POST_PARTITION, run)

where ``run(gm, ctx)`` changes ``gm`` in place and returns a typed result: a
:class:`PassResult` (how many rewrites it made), or a subclass that carries more (the
roots an encoding pass encoded and the ones it skipped). The pipeline lists each
stage's passes by module name, in order; adding a pass is its file plus its name in
that list.

:func:`run_stage` applies a stage: every pass through Inductor's
``GraphTransformObserver.apply_gm_pass`` (timed under ``pass.razorpass.<name>``, logged
by name, and switched off by ``torch._inductor.config.disabled_passes`` or the compiler
bisector, for which a pass then returns nothing and files no result), each counted in
``torch._dynamo.utils.counters["razorpass"]``; then one lint and one recompile of the
graph for the whole stage. The results are filed under the pass's name; a pass that
runs on two graphs (the post-partition passes see forward and backward) has its two
results merged.

Passes do not lint or recompile; they remove what they leave dead (``Rewriter`` does
on exit) and keep the invariants written in ``common``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import logging
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.passes.graph_transform_observer import GraphTransformObserver

from .vocab import Codebook, Compiler, GeluEncoding, Granularity, OpClass, Rounding, Storage

__all__ = ["Stage", "PassConfig", "PassResult", "GraphPass", "load", "run_stage"]

log = logging.getLogger("razorpass")


class Stage(enum.Enum):
    """Where in compilation a pass runs, and on which graph."""

    PRE_AUTOGRAD = "pre_autograd"  # the Dynamo graph (torch-level), before AOTAutograd
    JOINT = "joint"  # the joint forward + backward graph, before the min-cut partitioner
    CHECK = "check"  # the partitioned forward graph, against the rewritten joint graph
    POST_PARTITION = "post_partition"  # the final forward and backward graphs


class PassConfig(Protocol):
    """What the passes read of a config (``razorpass.RazorConfig`` is one; the passes do
    not import the API that defines it)."""

    target_classes: tuple[OpClass, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    granularity: Granularity
    block_size: int
    value_dtype: str
    quant_bits: int
    quant_rounding: Rounding
    quant_codebook: Codebook
    memory_budget: float | None
    compiler: Compiler
    gelu_mode: GeluEncoding
    gelu_derivative_bits: int | None
    trainable_blocks: tuple[int, ...] | None
    drop_layers: tuple[int, ...]
    blocks: str | None
    strict: bool

    def encoding_of(self, op_class: OpClass) -> Storage: ...

    def quant_group(self, op_classes) -> int: ...

    def keep_count(self, group_size): ...

    def topk_offsets(self, group_size: int, k: int) -> bool: ...


@dataclass
class PassResult:
    """What a pass did to a graph: ``count`` rewrites (0: the graph is unchanged)."""

    count: int = 0

    def merged(self, other: PassResult) -> PassResult:
        """This result and ``other`` (the same pass on another graph) as one."""
        out = dataclasses.replace(self)
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(out, f.name, a + b)
        return out


@dataclass(frozen=True)
class GraphPass:
    name: str  # the module's name: what the pipeline lists, logs and records show
    stage: Stage
    run: Callable[[fx.GraphModule, Any], PassResult]


def load(stage: Stage, names: Sequence[str]) -> tuple[GraphPass, ...]:
    """The ``PASS`` of each named module of this package, checked against its stage."""
    out = []
    for name in names:
        p = importlib.import_module(f"{__package__}.{name}").PASS
        if p.name != name or p.stage is not stage:
            raise RuntimeError(f"pass module {name!r} declares {p.name!r} at {p.stage}, listed at {stage}")
        out.append(p)
    return tuple(out)


def run_stage(passes: Sequence[GraphPass], gm: fx.GraphModule, ctx, results: MutableMapping[str, PassResult]) -> None:
    """Apply ``passes`` to ``gm`` in order, filing each result in ``results`` by name."""
    for p in passes:
        log.debug("razorpass: pass %s", p.name)
        result = GraphTransformObserver(gm, p.name, subsystem="razorpass").apply_gm_pass(lambda g: p.run(g, ctx))
        if result is None:  # switched off (disabled_passes, bisection)
            log.info("razorpass: pass %s is switched off", p.name)
            continue
        results[p.name] = results[p.name].merged(result) if p.name in results else result
        counters["razorpass"][p.name] += 1
    gm.graph.lint()
    gm.recompile()
