"""The GELU: its input top-k sparsified, or its derivative saved as N-bit levels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .casts import _opmath
from .codecs import _encode, dequantize_levels, quantize_levels


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate, config):
        ctx.save_for_backward(_encode(x, config))
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        (xs,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, xs, approximate=ctx.approximate), None, None


class _GeluDerivative(torch.autograd.Function):
    """gelu_encoding "derivN": saves gelu'(x) as N-bit levels on the range of gelu'
    (the GELU input is not saved); backward is grad * the dequantized derivative,
    computed in float32 for half-precision inputs as the decomposed backward does."""

    @staticmethod
    def forward(ctx, x, approximate, bits):
        from ..config import GELU_DERIVATIVE_RANGE

        lo, hi = GELU_DERIVATIVE_RANGE[approximate]
        xo = x.detach().to(_opmath(x.dtype))
        d = torch.ops.aten.gelu_backward(torch.ones_like(xo), xo, approximate=approximate)
        ctx.save_for_backward(quantize_levels(d, bits, lo, hi))
        ctx.args = (bits, lo, hi)
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        bits, lo, hi = ctx.args
        d = dequantize_levels(q, bits, lo, hi, _opmath(grad.dtype))
        return (grad.to(d.dtype) * d).to(grad.dtype), None, None
