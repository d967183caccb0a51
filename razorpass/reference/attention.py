"""Activation x activation: the softmax (its output saved) and the matmul of two
activations (each operand saved for the other's gradient)."""

from __future__ import annotations

import torch

from .casts import _back, _cast, _dtypes, _op_dtype, _opmath, _unbroadcast
from .codecs import _encode


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, config):
        y = torch.softmax(x, dim)
        ctx.save_for_backward(_encode(y, config))
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad):
        # in float32 for half-precision outputs, as aten's softmax backward computes
        (ys,) = ctx.saved_tensors
        y, g = ys.to(_opmath(ys.dtype)), grad.to(_opmath(ys.dtype))
        gy = g * y
        return (gy - y * gy.sum(ctx.dim, keepdim=True)).to(ys.dtype), None, None


class _Matmul(torch.autograd.Function):
    """activation x activation: each operand's gradient reads the other, sparsified."""

    @staticmethod
    def forward(ctx, a, b, config_a, config_b):
        dt = _op_dtype(a, b)
        ctx.dtypes = _dtypes(a, b)
        a, b = _cast(a, dt), _cast(b, dt)
        ctx.save_for_backward(_encode(a, config_a), _encode(b, config_b))
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.to(torch.promote_types(a.dtype, b.dtype))
        ga = grad @ b.transpose(-2, -1) if ctx.needs_input_grad[0] else None
        gb = a.transpose(-2, -1) @ grad if ctx.needs_input_grad[1] else None
        return (_back(_unbroadcast(ga, ctx.needs_input_grad[0] and a.shape), ctx.dtypes[0]),
                _back(_unbroadcast(gb, ctx.needs_input_grad[1] and b.shape), ctx.dtypes[1]), None, None)
