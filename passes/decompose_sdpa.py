"""decompose-sdpa: run ``scaled_dot_product_attention`` as explicit math when the
"sdpa" target is on (pre-autograd, on the Dynamo graph).

The fused op saves q, k, v, its output and the log-sum-exp, and its backward
recomputes the probabilities from them; compressing those would break that
recomputation. Replacing the call with :func:`math_sdpa` (same
signature and result) lets compress-saved handle attention with the "matmul" and
"softmax" classes, as Back Razor does. Nothing else in the graph changes.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from .context import PreAutogradContext
from .framework import GraphPass, PassResult, Stage
from .vocab import OpClass

__all__ = ["run", "math_sdpa", "PASS"]

SDPA_TARGETS = frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})


def run(gm: fx.GraphModule, ctx: PreAutogradContext) -> PassResult:
    if OpClass.SDPA not in ctx.config.target_classes:
        return PassResult()
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            node.target = math_sdpa
            changed += 1
    return PassResult(changed)


PASS = GraphPass("decompose_sdpa", Stage.PRE_AUTOGRAD, run)


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(Q·Kᵀ · scale + mask) · V, with the semantics of F.scaled_dot_product_attention
    (same result up to floating-point rounding); its Q·Kᵀ / P·V operands and softmax
    output are ordinary graph values that compress-saved can target."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    # the scale as a 0-d float64 tensor, not a Python number: the product is the same
    # (a 0-d operand takes the other's dtype, computed as with a scalar), but Inductor's
    # attention patterns (fx_passes/fuse_attention) only match a constant number there,
    # so they cannot fuse this math back into one SDPA op before razorpass's joint pass
    # runs (it did on Whisper: attention left uncompressed, unlike the reference)
    scale_t = torch.full((), scale, dtype=torch.float64, device=query.device)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale_t
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value)
