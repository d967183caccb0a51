"""encode-derivative: save what a GELU backward reads, gelu'(x), quantized to a few bits
(``RazorConfig.gelu_encoding`` "deriv2" / "deriv3" / "deriv4" with "gelu" in targets).

Runs on the AOTAutograd joint graph after ``compress_saved`` (which leaves the GELU
input alone under these encodings) and before ``pack_masks``. A pointwise activation's
backward is ``grad_in = grad * f'(x)``: the factor ``D = f'(x)`` reads forward values
only. With the compiler's decompositions a GELU backward is a group of pointwise
nodes (``meta["original_aten"] == aten.gelu_backward``); ``D`` is the one operand of the
group's tangent-dependent nodes that reads no tangent (``cdf + x * pdf`` for the exact
GELU, the tanh formula's sum for ``approximate="tanh"``, computed in float32 for
half-precision inputs). For each such ``D`` this pass inserts
``razor::quantize_uniform(D, bits, lo, hi)`` right after it (forward) and one
``razor::dequantize_uniform`` before its first backward use, and reroutes every
backward use of ``D`` to the decoded tensor (``rewrite.reroute``). The min-cut
partitioner then computes ``D`` in forward and saves its ``ceil(numel * bits / 8)``
bytes of codes; the GELU input is no longer saved for the GELU backward (another
reader, such as a Linear whose weight gradient reads the GELU output with "linear"
untargeted, may still keep ``x`` or the output alive; that is that reader's tensor).

``[lo, hi]`` is the range of gelu'(x) for the GELU's ``approximate`` mode
(``kernels.quantize.GELU_DERIVATIVE_RANGE``), told by the formula the group computes (``erf``:
exact, ``tanh``: the tanh approximation). A GELU written as tanh math in Python (GPT-2's
``gelu_new``) has no ``gelu_backward`` node and is left alone, silently.

Left alone, with a reason in the result's ``skipped``: groups whose tangent-free factor
is not one full-size computed tensor, formulas with neither ``erf`` nor ``tanh``,
factors recomputable from what the caller holds (the partitioner recomputes those for
free), and roots the pipeline's retry excluded. Layers outside ``include`` /
``exclude`` are skipped silently. The records (``records.QuantizedDerivative``) are the
result's ``encoded``: the saved-tensor description and the post-partition check
(``check_saved``) cover them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels.quantize import GELU_DERIVATIVE_RANGE
from .codecs import CODECS
from .common import BailOut, matches, module_path
from .compress_saved import group_key, layer_label
from .context import PassContext
from .framework import GraphPass, Stage
from .records import EncodeResult, QuantizedDerivative
from .rewrite import Rewriter, Use
from .vocab import Encoding, OpClass, Skip, SkipReason

aten = torch.ops.aten

OP_CLASS = OpClass.GELU
_BACKWARD = str(aten.gelu_backward.default)
# Nodes of the GELU formulas: the backward's own pieces and forward pieces CSE shares.
_FORMULA = frozenset({_BACKWARD, str(aten.gelu.default)})


@dataclass
class Plan:
    root: fx.Node  # D, the tangent-free factor
    approximate: str  # "none" or "tanh"
    source: fx.Node | None  # the GELU input D is computed from
    modules: list[str] = field(default_factory=list)
    sites: list[Use] = field(default_factory=list)


def _full_size(a: fx.Node, like: fx.Node) -> bool:
    v, w = a.meta.get("val"), like.meta.get("val")
    return (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.is_floating_point()
            and v.layout == torch.strided and statically_known_true(v.numel() == w.numel()))


def _formula(root: fx.Node, dep: set[fx.Node]) -> tuple[str | None, list[fx.Node]]:
    """(approximate mode, full-size leaves) of the tangent-free formula computing ``root``:
    walks the GELU pieces above it (tagged gelu / gelu_backward) to the tensors they read."""
    seen, todo, leaves, targets = set(), [root], [], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is root or (n.op == "call_function" and str(n.meta.get("original_aten")) in _FORMULA and n not in dep):
            targets.add(n.target)
            todo.extend(n.all_input_nodes)
        elif _full_size(n, root):
            leaves.append(n)
    tanh, erf = aten.tanh.default in targets, aten.erf.default in targets
    mode = "tanh" if tanh and not erf else "none" if erf and not tanh else None
    return mode, list(dict.fromkeys(leaves))


def analyse(gm: fx.GraphModule, ctx: PassContext) -> tuple[list[Plan], list[Skip]]:
    """One plan per tangent-free GELU-derivative factor that backward reads, and the
    factors left alone with why."""
    cfg = ctx.config
    bits = cfg.gelu_derivative_bits
    if bits is None or OP_CLASS not in cfg.target_classes:
        return [], []
    facts = ctx.facts(gm)
    dep = facts.tangent_dependent  # (within the backward nodes)
    excluded = set(ctx.excluded_roots)
    # the tangent-free operands of each GELU backward's tangent-dependent nodes
    groups: dict = {}
    for node in gm.graph.nodes:
        if node not in dep or node.op != "call_function":
            continue
        if str(node.meta.get("original_aten")) != _BACKWARD:
            continue
        cands = groups.setdefault(group_key(node), {})
        for a in node.all_input_nodes:
            if a not in dep and _full_size(a, node):
                cands.setdefault(a, []).append(node)
    plans: dict[fx.Node, Plan] = {}
    skipped: list[Skip] = []
    for key, cands in groups.items():
        if not cands:
            continue
        if len(cands) != 1:
            skipped.append(Skip(key[2] or "(graph)", SkipReason.NOT_ONE_FACTOR,
                                f"{len(cands)} tangent-free full-size operands ({', '.join(a.name for a in cands)})"))
            continue
        ((root, consumers),) = cands.items()
        path = module_path(consumers[0])
        if not matches(path, cfg.include, cfg.exclude):
            continue
        if root.op != "call_function":
            skipped.append(Skip(root.name, SkipReason.NOT_COMPUTED, root.op))
            continue
        if root.name in excluded:
            skipped.append(Skip(root.name, SkipReason.RETRY_DENSE))
            continue
        if facts.recomputable_from_caller(root):
            skipped.append(Skip(root.name, SkipReason.RECOMPUTABLE))
            continue
        mode, leaves = _formula(root, dep)
        if mode is None:
            skipped.append(Skip(root.name, SkipReason.NO_GELU_FORMULA))
            continue
        plan = plans.get(root)
        if plan is None:
            plan = plans[root] = Plan(root, mode, leaves[0] if len(leaves) == 1 else None)
        for c in consumers:
            plan.sites.append(Use(c, [], operand=root))
            plan.modules.append(path)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(plans.values(), key=lambda p: order[p.root]), skipped


def apply(gm: fx.GraphModule, ctx: PassContext, plans: list[Plan]) -> list[QuantizedDerivative]:
    bits = ctx.config.gelu_derivative_bits
    records = []
    bwd = ctx.facts(gm).backward
    codec = CODECS[Encoding.UNIFORM]
    with Rewriter(gm) as rw:
        for plan in plans:
            lo, hi = GELU_DERIVATIVE_RANGE[plan.approximate]
            dtype = plan.root.meta["val"].dtype
            done = rw.reroute(plan.root, plan.sites, codec, (bits, lo, hi),
                              lambda enc, sizes: (enc[0], sizes, bits, lo, hi, dtype))
            left = [u.name for u in plan.root.users if u in bwd]
            if left:
                raise BailOut(f"encode_derivative: {plan.root.name} is still read dense in backward by {left}")
            fields = done.record_fields()
            if plan.source is not None:  # the dense size stands for the activation replaced
                v = plan.source.meta["val"]
                fields["dense_bytes"] = v.numel() * v.element_size()
            records.append(QuantizedDerivative(**fields, layer=layer_label(plan.modules), modules=tuple(plan.modules),
                                               op_classes=(OP_CLASS,), consumers=len(plan.sites), bits=bits, lo=lo,
                                               hi=hi, source=plan.source.name if plan.source is not None else ""))
    return records


def run(gm: fx.GraphModule, ctx: PassContext) -> EncodeResult:
    plans, skipped = analyse(gm, ctx)
    encoded = apply(gm, ctx, plans) if plans else []
    return EncodeResult(count=len(encoded), encoded=encoded, skipped=skipped)


PASS = GraphPass("encode_derivative", Stage.JOINT, run)
