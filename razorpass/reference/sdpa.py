"""The reference of the "sdpa" target: scaled dot-product attention as explicit math."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import _Matmul


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, cfg,
          softmax):
    """The reference of the "sdpa" target: attention as math with the matmul and
    softmax rules (razorpass.passes.decompose_sdpa.math_sdpa with reference autograd Functions).
    ``cfg(t)`` is the config that sparsifies ``t`` (None: exact)."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    scores = _Matmul.apply(query, key.transpose(-2, -1), cfg(query), cfg(key)) * scale
    if is_causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = softmax(scores, -1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return _Matmul.apply(probs, value, cfg(probs), cfg(value))
