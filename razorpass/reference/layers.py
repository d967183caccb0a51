"""Layers with a weight that gets a gradient (linear, a matmul with a weight as its right
operand, convolution): the input sparsified for the weight gradient, the weight exact
for the input gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .casts import _back, _cast, _dtypes, _op_dtype, _unbroadcast
from .codecs import _encode


# Under autocast, linear / conv / matmul read copies of their operands cast to the
# autocast dtype, and autograd keeps those copies: the reference sparsifies the cast
# input (the size rule judged on it), computes backward in that dtype and casts each
# gradient back to the dtype of its input, as autocast's cast does.


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config):
        dt = _op_dtype(x, weight)
        ctx.dtypes = _dtypes(x, weight, bias)
        x, weight, bias = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        ctx.save_for_backward(_encode(x, config), weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        xs, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        gx = _back(grad @ weight, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = _back(grad.reshape(-1, grad.shape[-1]).t() @ xs.reshape(-1, xs.shape[-1]), ctx.dtypes[1])
        gb = (_back(grad.reshape(-1, grad.shape[-1]).sum(0), ctx.dtypes[2])
              if ctx.has_bias and ctx.needs_input_grad[2] else None)
        return gx, gw, gb, None


class _WeightMatmul(torch.autograd.Function):
    """``beta * bias + alpha * (x @ weight)`` with a 2-D weight (in, out) that gets a
    gradient (``torch.addmm`` / ``mm`` / ``matmul`` with a parameter as the right
    operand, as transformers' Conv1D computes): the "linear" rule, x sparsified for the
    weight gradient, the weight exact for the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, beta, alpha, config):
        dt = _op_dtype(x, weight)
        ctx.dtypes = _dtypes(x, weight, bias)
        x, weight, bias = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        ctx.save_for_backward(_encode(x, config), weight)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.beta, ctx.alpha = beta, alpha
        if bias is not None:
            return torch.addmm(bias, x, weight, beta=beta, alpha=alpha)
        out = torch.matmul(x, weight)
        return out if alpha == 1 else out * alpha

    @staticmethod
    def backward(ctx, grad):
        xs, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        g = grad if ctx.alpha == 1 else grad * ctx.alpha
        gx = _back(g @ weight.t(), ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = _back(xs.reshape(-1, xs.shape[-1]).t() @ g.reshape(-1, g.shape[-1]), ctx.dtypes[1])
        gb = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            gb = _back(_unbroadcast(grad if ctx.beta == 1 else grad * ctx.beta, ctx.bias_shape), ctx.dtypes[2])
        return gx, gw, gb, None, None, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, config):
        dt = _op_dtype(x, weight)
        ctx.dtypes = _dtypes(x, weight, bias)
        x, weight, bias = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        ctx.save_for_backward(_encode(x, config), weight)
        ctx.args = (stride, padding, dilation, groups, bias is not None)
        nd = weight.dim() - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        xs, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.args
        nd = weight.dim() - 2
        expand = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * nd  # noqa: E731
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.to(weight.dtype), xs, weight, [weight.shape[0]] if has_bias else None,
            expand(stride), expand(padding), expand(dilation), False, [0] * nd, groups,
            [ctx.needs_input_grad[0], True, has_bias],
        )
        gx, gw, gb = (_back(g, d) for g, d in zip((gx, gw, gb), ctx.dtypes))
        return gx, gw, gb, None, None, None, None, None
