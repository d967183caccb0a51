"""Scaled dot-product attention as explicit math.

``scaled_dot_product_attention`` never materialises the attention probabilities and
its backward recomputes them from q, k and the log-sum-exp: sparsifying its saved
operands would make that recomputation inconsistent. When the "sdpa" target is on,
razorpass runs attention as this function instead (same signature, same result up to
floating-point rounding), so that Back Razor's rule applies to what attention really
saves: both operands of Q·Kᵀ, the softmax output and V ("matmul" and "softmax").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["math_sdpa"]


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(Q·Kᵀ · scale + mask) · V, with the semantics of F.scaled_dot_product_attention."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
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
