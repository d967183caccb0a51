"""compress-saved: route every targeted weight-gradient use of a saved activation
through ``razor::compress`` (forward) / ``razor::decompress`` (backward).

Runs on the AOTAutograd joint graph, before the min-cut partitioner. Three phases:

analyse  Find each backward consumer that computes a weight gradient (an ``mm``/``bmm``
         whose result reaches the gradient of a parameter through gradient plumbing only,
         or the weight output of ``convolution_backward``) and the forward activation
         it reads. Walk that operand back to its *root*: through any view in backward,
         then through order-preserving reshapes in forward, stopping at the tensor the
         layer actually receives. Groups ("block" / "sample") are formed over the root.
         The size rule: a tensor whose compressed copy is not smaller than the dense
         tensor stays dense (``not_smaller``; the reference applies the same rule).
share    Under a quantized encoding, a Linear / conv input computed pointwise from a
         LayerNorm / BatchNorm root (x̂ · γ + β, a ReLU / ReLU6 clamp, a cast, reshapes)
         becomes a use of that root: its weight gradient reads the pointwise chain
         replayed on the decoded x̂, and one code serves both (``_merge_derived``).
plan     One compressed copy per root (q, k and v projections reading the same input
         share it), one decompress right before the first consumer in backward.
apply    Insert compress after the root in forward, decompress before the first
         consumer, and replay the view chain from root to each consumer on the
         decompressed tensor. Only the weight-gradient operand is rerouted: the
         forward pass and every input gradient keep the dense, exact tensors.

After the rewrite no backward use of a compressed root remains unless some other,
untargeted backward op needs it dense (that one is then saved dense, as before); the
post-partition check (``check_saved``) proves nothing else keeps it alive.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from ..kernels.ops import value_dtype_of
from .codecs import CODECS
from .common import ORDER_PRESERVING, SAMPLE_DIM0_META, VIEW_OPS, dim0, matches, module_path, order_preserving, strip_views
from .context import PassContext
from .facts import GraphFacts
from .framework import GraphPass, PassConfig, Stage
from .records import EncodeResult
from .rewrite import Rewriter, Use
from .vocab import Codebook, Encoding, GeluEncoding, Granularity, OpClass, Skip, SkipReason, Storage

aten = torch.ops.aten
prims = torch.ops.prims
log = logging.getLogger("razorpass")


# Ops through which a weight gradient flows to the graph output unchanged in kind:
# reshapes, accumulation of several uses of one weight and dtype casts (autocast).
# Reductions are not plumbing: the bias gradient of a LayerNorm is a sum of an input
# gradient. The batch sum of a batched (bmm) weight gradient is handled on its own.
GRAD_PLUMBING = VIEW_OPS | {
    aten.add.Tensor,
    aten._to_copy.default,
    prims.convert_element_type.default,
}
BATCH_SUMS = frozenset({aten.sum.dim_IntList})

MATMULS = frozenset({aten.mm.default, aten.bmm.default})
CONV_BACKWARD = aten.convolution_backward.default

# Backward ops that AOTAutograd decomposes into pointwise pieces (each piece keeps the
# op in ``meta["original_aten"]``), mapped to the target class of the activation they
# read. With the compiler's decompositions the LayerNorm backward reads the normalized
# input x̂ = (x - mean) * rstd saved in forward, the softmax backward reads the softmax
# output, the GELU backward reads the GELU input, the BatchNorm backward reads the
# BatchNorm input (with the saved per-channel mean and invstd, which stay exact).
# Keyed by name: graph copies may carry a copy of the OpOverload object.
DECOMPOSED_CLASSES = {
    str(aten.native_layer_norm_backward.default): OpClass.LAYERNORM,
    str(aten._softmax_backward_data.default): OpClass.SOFTMAX,
    str(aten.gelu_backward.default): OpClass.GELU,
    str(aten.native_batch_norm_backward.default): OpClass.BATCHNORM,
}


@dataclass
class Site(Use):
    """One rerouted use: ``consumer.args[arg_index]`` reads the (sparsified) root."""

    op_class: OpClass | None = None
    module: str = ""


@dataclass
class Plan:
    """One compressed copy of ``root`` (groups of ``group_size``, ``keep`` kept each)
    and every use it serves."""

    root: fx.Node
    sites: list[Site] = field(default_factory=list)
    group_size: int = 0
    keep: int = 0  # top-k: values kept per group
    bits: int = 0  # quantized: bits per element (0: top-k)
    derived: list[fx.Node] = field(default_factory=list)  # layer inputs computed from the root, served by its code


def _reaches_param_grad(facts: GraphFacts) -> set[fx.Node]:
    """Backward nodes whose value flows to a parameter's gradient through plumbing only."""
    bwd = facts.backward
    sinks = [g for p, g in facts.grad_outputs if g is not None and p in facts.static]
    seen: set[fx.Node] = set()
    todo = list(sinks)
    while todo:
        n = todo.pop()
        if n in seen or n not in bwd:
            continue
        seen.add(n)
        if n.op != "call_function":
            continue
        if n.target in GRAD_PLUMBING:
            todo.extend(a for a in n.all_input_nodes if a in bwd)
        elif n.target in BATCH_SUMS and n.args[1] in ([0], (0,)):
            src = n.args[0]
            if isinstance(src, fx.Node) and src.target is aten.bmm.default:
                todo.append(src)
    return seen


def group_key(node: fx.Node):
    """Identifies one decomposed backward op: its pieces share original op, seq_nr and module."""
    return (str(node.meta.get("original_aten")), node.meta.get("seq_nr"), module_path(node))


def _full_sizes(gm: fx.GraphModule, bwd: set[fx.Node], static: set[fx.Node]) -> dict:
    """Largest forward operand (numel) each decomposed backward op reads: that is its
    activation; smaller operands are per-row statistics (mean, rstd) that stay exact."""
    best: dict = {}
    for node in gm.graph.nodes:
        if node in bwd and str(node.meta.get("original_aten")) in DECOMPOSED_CLASSES:
            for a in node.all_input_nodes:
                v = a.meta.get("val")
                if isinstance(v, torch.Tensor) and _is_activation_operand(a, bwd, static):
                    key = group_key(node)
                    n = v.numel()
                    if key not in best or statically_known_true(n > best[key]):
                        best[key] = n
    return best


def _operand_class(node: fx.Node, idx: int, reach: set[fx.Node], bwd: set[fx.Node], static: set[fx.Node],
                   full: dict) -> OpClass | None:
    """The target class of backward ``node``'s argument ``idx`` if it is a saved activation."""
    arg = node.args[idx]
    if not isinstance(arg, fx.Node) or not _is_activation_operand(arg, bwd, static):
        return None
    if node.target in MATMULS:
        # A matmul whose result is a weight gradient reads a layer input ("linear");
        # any other matmul with an activation operand is activation x activation.
        return OpClass.LINEAR if node in reach else OpClass.MATMUL
    if node.target is CONV_BACKWARD:
        weight_grad = node.args[10][1] and any(
            u.target is operator.getitem and u.args[1] == 1 and u in reach for u in node.users
        )
        return OpClass.CONV if idx == 1 and weight_grad else None
    op_class = DECOMPOSED_CLASSES.get(str(node.meta.get("original_aten")))
    if op_class is None:
        return None
    # Only the full-size activation: per-row statistics (mean, rstd) stay exact.
    a = arg.meta.get("val")
    if isinstance(a, torch.Tensor) and statically_known_true(a.numel() == full.get(group_key(node), -1)):
        return op_class
    return None


def _is_activation_operand(n, bwd: set[fx.Node], static: set[fx.Node]) -> bool:
    """True when ``n`` is a forward value seen through views (no tangent in it) whose
    storage is not a parameter (the other operand of an input-gradient matmul is a
    transposed weight, or a transposed autocast copy of one: that is not an activation)."""
    if not isinstance(n, fx.Node):
        return False
    n = strip_views(n)[0]
    if n in bwd or n in static:
        return False
    # a dtype cast of a parameter is that parameter (autocast reads a weight through a
    # bfloat16 copy, and the input gradient reads that copy): not an activation
    return strip_views(n, through=lambda m: m.target in VIEW_OPS or m.target in _CASTS)[0] not in static


# The forward ops whose decomposed pieces a decomposed backward may share through CSE
# (erf(x / sqrt(2)) is computed once for the GELU and reused by its backward): such
# pieces are recomputed from the sparsified activation in backward.
_FORWARD_OF = {OpClass.GELU: {str(aten.gelu.default), str(aten.gelu_backward.default)}}


_CASTS = frozenset({prims.convert_element_type.default, aten._to_copy.default})


def _bn_centered(consumer: fx.Node, dep: set[fx.Node]) -> fx.Node | None:
    """The ``input - mean`` node of a decomposed BatchNorm backward that reads the
    input through ``consumer`` (that node itself, or a dtype cast feeding it), or None.

    A BatchNorm backward reads its input only centered on the per-channel mean, so
    razorpass compresses that centered tensor: a dropped element then stands for "at
    the mean" (x̂ = 0). Compressing the raw input would put it at x̂ = -mean * invstd,
    far from anything the channel holds when its mean is large.
    """
    key = str(consumer.meta.get("original_aten"))
    if consumer.target is aten.sub.Tensor:
        cands = [consumer]
    elif consumer.target in _CASTS:
        cands = [u for u in consumer.users if u.target is aten.sub.Tensor and u.args[0] is consumer
                 and str(u.meta.get("original_aten")) == key]
    else:
        return None
    cands = [c for c in cands if isinstance(c.args[1], fx.Node) and c.args[1] not in dep]
    return cands[0] if len(cands) == 1 else None


def _single_input(n: fx.Node) -> fx.Node | None:
    inputs = n.all_input_nodes
    return inputs[0] if len(inputs) == 1 else None


def _walk_to_root(operand: fx.Node, bwd: set[fx.Node], op_class: OpClass) -> tuple[fx.Node, list[fx.Node], fx.Node]:
    """(root, chain root->operand, the node whose dim 0 is the sample dim).

    The root is the deepest node reachable through order-preserving reshapes, so that
    every consumer of one tensor shares one compressed copy. Along that path the graph
    may flatten the batch into other dims ((B, T, C) -> (B*T, C) for a Linear,
    (B, H, T, D) -> (B*H, T, D) for a batched matmul): the node with the smallest
    dim 0 carries the sample dim of the "sample" granularity, i.e. dim 0 of the
    activation as the layer receives it.
    For a decomposed backward, single-input pieces of the op's own forward formula
    (after CSE) are walked too, and replayed on the decompressed root.
    """
    shared = _FORWARD_OF.get(op_class, set())
    chain: list[fx.Node] = []
    n = operand
    while n in bwd:  # backward-side views (e.g. the transpose of X in grad_W = gᵀ X)
        chain.append(n)
        n = n.args[0]
    received = None
    while True:
        d0, best = dim0(n), received is not None and dim0(received)
        if d0 is not None and (received is None or best is None or statically_known_true(d0 < best)):
            received = n
        if n.op != "call_function":
            break
        if order_preserving(n):
            prev = n.args[0]
        elif str(n.meta.get("original_aten")) in shared and _single_input(n) is not None:
            prev = _single_input(n)
        else:
            break
        chain.append(n)
        n = prev
    chain.reverse()
    return n, chain, received if received is not None else n


def topk_encoding(config: PassConfig, group: int, keep: int) -> Encoding:
    """The top-k layout of a copy keeping ``keep`` of every ``group`` elements."""
    return Encoding.TOPK_OFFSETS if config.topk_offsets(group, keep) else Encoding.TOPK_MASK


def not_smaller(val: torch.Tensor, group: int, keep: int, config: PassConfig) -> bool:
    """The size rule: True when the compressed copy of ``val`` (per group, a packed mask
    of ceil(group / 8) bytes or ``keep`` offsets, as ``topk_layout`` picks, and ``keep``
    values) is not smaller than ``val`` dense, which then stays dense. A symbolic size
    that is not known to be smaller is compressed (False)."""
    packed = CODECS[topk_encoding(config, group, keep)].nbytes(val.numel(), group, keep,
                                                               value_dtype_of(config, val.dtype))
    return statically_known_true(packed >= val.numel() * val.element_size())


# The classes the normal codebook codes; the others keep uniform levels (on MiniLM the
# normal codebook moved the gradients of matmul operands further than uniform levels:
# ``bench/README.md``, "Rounding and codebooks").
NORMAL_CLASSES = frozenset({OpClass.LINEAR, OpClass.CONV, OpClass.LAYERNORM})


def quant_encoding(config: PassConfig, classes) -> Encoding:
    """The per-group codec of a root read by ``classes`` under the config's codebook."""
    normal = config.quant_codebook is Codebook.NORMAL and NORMAL_CLASSES.issuperset(classes)
    return Encoding.GROUP_NORMAL if normal else Encoding.GROUP


def not_smaller_quantized(val: torch.Tensor, group: int, bits: int, encoding: Encoding = Encoding.GROUP) -> bool:
    """The size rule for a quantized copy (``bits`` per element of whole groups plus what
    each group stores besides: bounds, or statistics and outliers)."""
    return statically_known_true(CODECS[encoding].nbytes(val.numel(), group, bits)
                                 >= val.numel() * val.element_size())


def _topk_group(cfg: PassConfig, received: fx.Node, sample_dim0=None) -> int | Skip:
    """The top-k group size for a root, or why there is none.
    ``sample_dim0``: the smallest dim 0 the operand was read through before Inductor's
    joint-graph passes folded reshapes (``mark_samples``), where that is smaller."""
    if cfg.granularity is not Granularity.SAMPLE:
        return cfg.block_size
    shape = received.meta["val"].shape
    group = math.prod(shape[1:]) if len(shape) > 1 else 1
    if sample_dim0 is not None and len(shape) and not statically_known_true(sample_dim0 >= shape[0]):
        d0 = shape[0]
        if not (is_concrete_int(d0) and is_concrete_int(sample_dim0) and 0 < int(sample_dim0)
                and int(d0) % int(sample_dim0) == 0):
            # a sample dim folded away under a symbolic size: which elements form a
            # sample is not known statically, so this tensor stays dense (exact)
            return Skip(received.name, SkipReason.NO_SAMPLE_SIZE,
                        f"dim 0 {d0} of {received.name}, sample dim {sample_dim0}")
        group = group * (int(d0) // int(sample_dim0))
    if not is_concrete_int(group):
        return Skip(received.name, SkipReason.NO_SAMPLE_SIZE, f"per-sample size {group} is symbolic")
    if int(group) == 0:  # (B, 0, ...): no elements, and no group to divide into
        return Skip(received.name, SkipReason.NO_SAMPLE_SIZE, "per-sample size 0")
    return int(group)


# Pointwise forward ops through which a layer input may be computed from a normalized
# tensor another class already stores: the affine part of a LayerNorm / BatchNorm
# (x̂ · γ + β), a ReLU / ReLU6 clamp, a dtype cast.
DERIVING_OPS = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default, aten.relu.default, aten.hardtanh.default,
    prims.convert_element_type.default,
})
# Ops that add constant elements around their one tensor input (a "same" padding before
# a convolution): the result is derived too, though larger than the input.
PADDING_OPS = frozenset({aten.constant_pad_nd.default})
NORM_CLASSES = frozenset({OpClass.LAYERNORM, OpClass.BATCHNORM})


def _operand_key(a):
    """An operand up to order-preserving reshapes that broadcast alike and dtype casts:
    (1, C, 1, 1) and (C, 1, 1) views of one per-channel tensor are the same operand, and
    so are two float32 casts of one bfloat16 tensor (under autocast a BatchNorm's forward
    and backward each cast its input)."""
    if not isinstance(a, fx.Node):
        return repr(a)
    base = strip_views(a, through=lambda n: n.target in ORDER_PRESERVING or n.target in _CASTS)[0]
    shape = tuple(getattr(a.meta.get("val"), "shape", ()))
    while shape and shape[0] == 1:
        shape = shape[1:]
    return (id(base), repr(shape))


def _value_key(n: fx.Node):
    """Nodes with equal keys compute the same value (the BatchNorm backward recomputes
    ``input - mean`` from the nodes the forward used, through other reshapes)."""
    return (n.target, tuple(map(_operand_key, n.args)), repr(n.kwargs))


def _numel(n) -> int | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.numel() if isinstance(v, torch.Tensor) else None


def _derived_from(root: fx.Node, norm_keys: dict, bwd: set[fx.Node]) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """(normalized node, its candidate root in ``norm_keys``, links) when the forward
    computes ``root`` from a tensor a normalization class stores through ``DERIVING_OPS``,
    constant padding and reshapes alone, each reading that tensor and nothing else as large (the other
    operands are per-channel or per-row: γ, β, rstd). ``links`` runs from that node
    (exclusive) to ``root`` (inclusive)."""
    links, n = [], root
    while n not in bwd and n.op == "call_function":
        hit = norm_keys.get(_value_key(n))
        if hit is not None and links:
            return n, hit, links[::-1]
        if n.target in PADDING_OPS:
            big = n.all_input_nodes
        elif n.target in DERIVING_OPS or order_preserving(n):
            size = _numel(n)
            big = [a for a in n.all_input_nodes if _numel(a) is None or not statically_known_true(_numel(a) < size)]
        else:
            return None
        if len(big) != 1:
            return None
        links.append(n)
        n = big[0]
    return None


def _merge_derived(cands: dict, cfg: PassConfig, bwd: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """One stored tensor for a normalization and the layer that reads its output.

    A Linear after a LayerNorm (or a convolution after BatchNorm + ReLU6) reads
    y = f(x̂) with f pointwise and cheap; x̂ is stored quantized for the normalization's
    own backward already. Storing a quantized y as well would keep two codes of one
    value: instead the layer's weight gradient reads f(decoded x̂), replayed in
    backward. Only under a quantized encoding (Back Razor's top-k rule is unchanged).
    Returns each normalization root's merged layer inputs (what it would cost dense).
    """
    norm_keys, merged = {}, {}
    for root, uses in cands.items():
        if (any(c in NORM_CLASSES for _, _, c in uses)
                and all(cfg.encoding_of(c) is Storage.QUANT for _, _, c in uses)
                and not not_smaller_quantized(root.meta["val"], cfg.quant_group([c for _, _, c in uses]),
                                              cfg.quant_bits, quant_encoding(cfg, [c for _, _, c in uses]))):
            norm_keys[_value_key(root)] = root
    if not norm_keys:
        return merged
    for root in list(cands):
        uses = cands.get(root)
        if uses is None or any(c not in (OpClass.LINEAR, OpClass.CONV) or cfg.encoding_of(c) is not Storage.QUANT
                               for _, _, c in uses):
            continue
        found = _derived_from(root, norm_keys, bwd)
        if found is None:
            continue
        node, stored, links = found
        if stored is not node:
            # the normalization's root is a backward copy of ``node``: store the forward
            # node itself (its uses are rerouted by argument index, so either serves)
            cands[node] = cands.pop(stored)
            norm_keys[_value_key(node)] = node
            if stored in merged:
                merged[node] = merged.pop(stored)
        for sites, _, _ in uses:
            for site in sites:
                site.chain = links + site.chain
        cands[node].extend(uses)
        merged.setdefault(node, []).append(root)
        del cands[root]
    return merged


@dataclass
class _Scan:
    """What ``analyse`` gathers in one walk over the backward nodes: per root, its uses
    (sites, top-k group or why there is none, class), in graph order, and what it skips."""

    cfg: PassConfig
    facts: GraphFacts
    excluded: frozenset[str]
    cands: dict[fx.Node, list] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    bn_roots: set[fx.Node] = field(default_factory=set)
    free_roots: set[fx.Node] = field(default_factory=set)

    def complex_weight_gradient(self, node: fx.Node) -> None:
        """A complex weight gradient reads conj(x), not a saved activation: unsupported,
        x stays saved dense; say so (int / bool never have a weight gradient)."""
        cplx = [a for a in node.all_input_nodes if getattr(a.meta.get("val"), "is_complex", bool)()]
        if not cplx or not matches(module_path(node), self.cfg.include, self.cfg.exclude):
            return
        srcs = [strip_views(a, through=lambda n: n.target in VIEW_OPS or n.target is aten._conj.default)[0]
                for a in cplx]
        src = next((r for r in srcs if r not in self.facts.backward), srcs[-1])  # the forward activation
        if src not in self.facts.held_by_caller:
            dtype = getattr(src.meta.get("val"), "dtype", "complex")
            why = f"the input of {module_path(node) or '(graph)'} ({src.target} output, {dtype})"
            self.skipped.append(Skip(src.name, SkipReason.UNSUPPORTED_DTYPE, why))
            log.warning("razorpass: not compressing %s: unsupported dtype, saved dense", why)

    def batchnorm_use(self, node: fx.Node, path: str):
        """(root, sites, top-k group) of a BatchNorm backward: the centered input, every
        use of it a site; None when it has none or it was found already."""
        root = _bn_centered(node, self.facts.tangent_dependent)
        if root is None:
            self.skipped.append(Skip(node.name, SkipReason.NOT_CENTERED))
            return None
        if root in self.bn_roots:
            return None
        self.bn_roots.add(root)
        sites = [Site(u, [], arg_index=i, op_class=OpClass.BATCHNORM, module=path)
                 for u in root.users for i, a in enumerate(u.args) if a is root]
        return root, sites, _topk_group(self.cfg, root)

    def operand_use(self, node: fx.Node, idx: int, op_class: OpClass, path: str):
        """(root, sites, top-k group) of the activation ``node`` reads as argument ``idx``."""
        root, chain, received = _walk_to_root(node.args[idx], self.facts.backward, op_class)
        group = _topk_group(self.cfg, received, node.meta.get(SAMPLE_DIM0_META, {}).get(idx))
        return root, [Site(node, chain, arg_index=idx, op_class=op_class, module=path)], group

    def add(self, root: fx.Node, sites: list[Site], group, op_class: OpClass) -> None:
        """Record a use of ``root`` unless it is not an activation worth encoding."""
        if root.name in self.excluded:
            return
        val, facts = root.meta.get("val"), self.facts
        if (root in facts.static or root in facts.held_by_caller or not isinstance(val, torch.Tensor)
                or not val.is_floating_point()):
            return
        if facts.recomputable_from_caller(root):
            # e.g. a padded copy of the batch: the partitioner recomputes it from what
            # the caller holds, so a compressed copy would only lose precision
            if root not in self.free_roots:
                self.free_roots.add(root)
                self.skipped.append(Skip(root.name, SkipReason.RECOMPUTABLE))
            return
        self.cands.setdefault(root, []).append((sites, group, op_class))


def _scan(gm: fx.GraphModule, ctx: PassContext) -> _Scan:
    """Every targeted backward use of a saved activation, per root."""
    cfg, facts = ctx.config, ctx.facts(gm)
    bwd = facts.backward
    reach = _reaches_param_grad(facts)
    full = _full_sizes(gm, bwd, facts.static)
    scan = _Scan(cfg, facts, frozenset(ctx.excluded_roots))
    for node in gm.graph.nodes:
        if node not in bwd or node.op != "call_function":
            continue
        if node.target in MATMULS and node in reach and OpClass.LINEAR in cfg.target_classes:
            scan.complex_weight_gradient(node)
        for idx in range(len(node.args)):
            op_class = _operand_class(node, idx, reach, bwd, facts.static, full)
            if op_class is None or op_class not in cfg.target_classes:
                continue
            if op_class is OpClass.GELU and cfg.gelu_mode is not GeluEncoding.TOPK:
                continue  # encode_derivative stores gelu'(x) instead of the GELU input
            path = module_path(node)
            if not matches(path, cfg.include, cfg.exclude):
                continue
            use = scan.batchnorm_use(node, path) if op_class is OpClass.BATCHNORM else \
                scan.operand_use(node, idx, op_class, path)
            if use is not None:
                scan.add(*use, op_class)
    return scan


def _plan(scan: _Scan, ctx: PassContext, merged: dict[fx.Node, list[fx.Node]]) -> list[Plan]:
    """One plan per (root, group size): one encoding per root. A root some top-k class
    reads (the softmax output, also the P of P·V) is stored top-k for all its uses,
    otherwise quantized."""
    cfg, too_small = ctx.config, set()
    plans: dict[tuple[fx.Node, int], Plan] = {}
    for root, uses in scan.cands.items():
        quant = all(cfg.encoding_of(c) is Storage.QUANT for _, _, c in uses)
        val = root.meta["val"]
        if quant and ctx.budget_bits.get(root.name) == 0:
            scan.skipped.append(Skip(root.name, SkipReason.BUDGET_DENSE))
            continue
        for sites, topk_group, op_class in uses:
            if quant:
                group, keep, bits = (cfg.quant_group([c for _, _, c in uses]), 0,
                                     ctx.budget_bits.get(root.name, cfg.quant_bits))
            else:
                group, bits = topk_group, 0
                if isinstance(group, Skip):
                    scan.skipped.append(dataclasses.replace(group, node=root.name))
                    continue
                keep = int(cfg.keep_count(group))
            if (quant and not_smaller_quantized(val, group, bits, quant_encoding(cfg, [c for _, _, c in uses]))) or (not quant and not_smaller(val, group, keep, cfg)):
                # the size rule: a copy no smaller than the tensor saves nothing (and the
                # partitioner may then recompute the root instead of saving the copy)
                if root not in too_small:
                    too_small.add(root)
                    scan.skipped.append(Skip(root.name, SkipReason.NOT_SMALLER))
                continue
            plan = plans.setdefault((root, group), Plan(root, group_size=group, keep=keep, bits=bits,
                                                        derived=merged.get(root, [])))
            plan.sites.extend(sites)
    return list(plans.values())


def analyse(gm: fx.GraphModule, ctx: PassContext) -> tuple[list[Plan], list[Skip]]:
    """The plans for ``gm``, and the tensors left alone with why."""
    if not ctx.config.target_classes:
        return [], []
    scan = _scan(gm, ctx)
    merged = _merge_derived(scan.cands, ctx.config, scan.facts.backward)
    plans = _plan(scan, ctx, merged)
    return plans, scan.skipped


def apply(gm: fx.GraphModule, ctx: PassContext, plans: list[Plan]) -> list:
    """Encode each plan's root after it is computed and decode it before its first
    targeted backward use: ``QuantizedRoot`` / ``CompressedRoot`` records."""
    records = []
    with Rewriter(gm) as rw:
        for plan in plans:
            val, group, bits = plan.root.meta["val"], plan.group_size, plan.bits
            if bits:
                codec = CODECS[quant_encoding(ctx.config, {s.op_class for s in plan.sites})]
                done = rw.reroute(plan.root, plan.sites, codec, (group, bits),
                                  lambda enc, sizes: (*enc, sizes, group, bits, val.dtype))
            else:
                codec = CODECS[topk_encoding(ctx.config, group, plan.keep)]
                done = rw.reroute(plan.root, plan.sites, codec, (group, plan.keep, value_dtype_of(ctx.config, val.dtype)),
                                  lambda enc, sizes: (enc[0], enc[1], sizes, group, val.dtype))
            modules = tuple(s.module for s in plan.sites)
            common = dict(**done.record_fields(), layer=layer_label(modules), modules=modules,
                          op_classes=tuple(sorted({s.op_class for s in plan.sites})), consumers=len(plan.sites),
                          group_size=group)
            if bits:
                derived = sum(d.meta["val"].numel() * d.meta["val"].element_size() for d in plan.derived)
                records.append(codec.record(**common, bits=bits, derived_bytes=derived))
            else:
                records.append(codec.record(**common, keep=plan.keep))
    return records


def layer_label(modules: list[str]) -> str:
    """One label for the layers that share a compressed tensor: "a.b.{query,key,value}"."""
    mods = sorted(set(modules))
    if len(mods) <= 1:
        return mods[0] if mods else ""
    split = [m.split(".") for m in mods]
    prefix = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        prefix.append(parts[0])
    tails = ",".join(".".join(p[len(prefix):]) for p in split)
    return ".".join(prefix + ["{" + tails + "}"])


def run(gm: fx.GraphModule, ctx: PassContext) -> EncodeResult:
    plans, skipped = analyse(gm, ctx)
    encoded = apply(gm, ctx, plans) if plans else []
    return EncodeResult(count=len(encoded), encoded=encoded, skipped=skipped)


PASS = GraphPass("compress_saved", Stage.JOINT, run)
