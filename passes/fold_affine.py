"""fold-affine: a Linear after a normalization computes its weight gradient from the
decoded x̂, without writing the replayed γ·x̂ + β out.

Runs on the partitioned backward graph. Where ``compress_saved`` merged a Linear's input
into its normalization's code, the backward replays the affine on the decoded x̂ and
the weight gradient reads it: ``dW = dYᵀ · (γ·x̂ + β)``. The matmul is opaque to the
compiler, so the replay is written out as a full activation-sized buffer (one per
query / key / value and MLP-input weight gradient of a transformer block) and is live
with everything else the block's backward holds. Since γ and β are per column,

    dYᵀ · (γ·x̂ + β) = (dYᵀ · x̂) · diag(γ) + (dYᵀ · 1) · βᵀ

so each ``mm(a, view(add(mul(x̂, γ), β)))`` with ``x̂`` a decode becomes
``mm(a, view(x̂)) * γ + sum(a, 1) * β``: a (out × in) scaling and a rank-1 update instead
of the activation-sized buffer (``dYᵀ · 1`` is the bias gradient, which the compiler
computes once for both). The same value up to float rounding; a ``mul`` without
``add`` (no β) folds the same way. The result counts the folds.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .codecs import value_decode_ops
from .common import replay_chain
from .context import PassContext
from .framework import GraphPass, PassResult, Stage
from .rewrite import Rewriter

__all__ = ["run", "PASS"]

aten = torch.ops.aten

_RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _per_column(p, columns: int) -> bool:
    """``p`` is a float tensor of ``columns`` values broadcast along the last dim only."""
    v = _val(p)
    return (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1
            and all(isinstance(d, int) for d in v.shape) and v.shape[-1] == columns
            and all(d == 1 for d in v.shape[:-1]))


def _decoded(x) -> bool:
    """``x`` is a decode's output, possibly through reshapes."""
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _RESHAPES:
        x = x.args[0]
    return isinstance(x, fx.Node) and x.op == "call_function" and x.target in value_decode_ops()


def _affine(b: fx.Node):
    """(x̂, γ, β or None, reshapes from the affine to ``b``) when ``b`` is a reshape of
    ``x̂·γ + β`` (or ``x̂·γ``) of a decoded x̂ with per-column γ, β; else None. (Other
    readers of the replay keep it; the fold is exact either way.)"""
    chain, n = [], b
    while n.op == "call_function" and n.target in _RESHAPES:
        chain.append(n)
        n = n.args[0]
    if not chain:
        return None
    out = _val(n)
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or not isinstance(out.shape[-1], int):
        return None
    columns = out.shape[-1]
    if _val(b).shape[-1] != columns:  # the reshapes merge leading dims only
        return None
    beta = None
    if n.target is aten.add.Tensor and len(n.args) == 2 and not n.kwargs:
        left, right = n.args
        scaled, beta = (left, right) if _per_column(right, columns) else (right, left)
        if not _per_column(beta, columns) or not isinstance(scaled, fx.Node):
            return None
        n = scaled
    if n.target is not aten.mul.Tensor or len(n.args) != 2 or n.kwargs:
        return None
    left, right = n.args
    x, gamma = (left, right) if _per_column(right, columns) else (right, left)
    if not _per_column(gamma, columns) or not _decoded(x):
        return None
    xv = _val(x)
    if xv.dtype != out.dtype or list(xv.shape) != list(out.shape):
        return None
    return x, gamma, beta, chain[::-1]


def _call(rw: Rewriter, target, args) -> fx.Node:
    node = rw.graph.call_function(target, args)
    with rw.fake_mode:
        node.meta["val"] = target(*fx.node.map_arg(args, lambda a: a.meta["val"]))
    node.meta["partitioner_tag"] = "is_backward"
    return node


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    folded = 0
    with Rewriter(gm) as rw:  # on exit: the replay left unread is removed
        for mm in list(rw.graph.find_nodes(op="call_function", target=aten.mm.default)):
            a, b = mm.args
            found = _affine(b) if isinstance(b, fx.Node) else None
            if found is None or _val(mm).dtype != _val(b).dtype:
                continue
            x, gamma, beta, chain = found
            columns = _val(b).shape[-1]
            with rw.graph.inserting_before(mm):
                cur = replay_chain(rw.graph, rw.fake_mode, chain, x, chain[0].args[0])  # the same reshapes, on x̂
                prod = _call(rw, aten.mm.default, (a, cur))
                new = _call(rw, aten.mul.Tensor, (prod, _call(rw, aten.view.default, (gamma, [1, columns]))))
                if beta is not None:
                    ones = _call(rw, aten.sum.dim_IntList, (a, [1], True))
                    outer = _call(rw, aten.mul.Tensor, (ones, _call(rw, aten.view.default, (beta, [1, columns]))))
                    new = _call(rw, aten.add.Tensor, (new, outer))
            new.meta.update({k: v for k, v in mm.meta.items() if k not in ("val", "partitioner_tag")})
            mm.replace_all_uses_with(new)
            rw.graph.erase_node(mm)
            folded += 1
    return PassResult(folded)


PASS = GraphPass("fold_affine", Stage.POST_PARTITION, run)
