"""LayerNorm and BatchNorm: the normalized (LayerNorm) or centered (BatchNorm) input
sparsified, the statistics exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .codecs import _encode


def _affine(xhat: torch.Tensor, weight, bias, shape) -> torch.Tensor:
    """A normalization's output from its normalized input: x̂ · γ + β."""
    out = xhat if weight is None else xhat * weight.view(shape)
    return out if bias is None else out + bias.view(shape)


class _LayerNorm(torch.autograd.Function):
    """Saves the sparsified normalized input x̂ = (x - mean) * rstd; mean/rstd stay exact."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps, config, sink=None):
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            x = x.float()  # autocast runs layer_norm in float32: x̂ is a float32 tensor
        mean = x.mean(dims, keepdim=True)
        rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        xhat = (x - mean) * rstd
        stored = _encode(xhat, config)
        if sink is not None:  # the output as computed from the stored x̂
            sink.append(_affine(stored, weight, bias, [1] * (x.dim() - len(shape)) + list(shape)))
        ctx.save_for_backward(stored, rstd, weight)
        ctx.dims, ctx.has_bias = dims, bias is not None
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        dims = ctx.dims
        n = 1
        for d in dims:
            n *= grad.shape[d]
        batch = tuple(range(grad.dim() - len(dims)))
        gx_hat = grad * weight if weight is not None else grad
        gx = rstd / n * (n * gx_hat - gx_hat.sum(dims, keepdim=True) - xhat * (gx_hat * xhat).sum(dims, keepdim=True))
        gw = (grad * xhat).sum(batch) if weight is not None and ctx.needs_input_grad[2] else None
        gb = grad.sum(batch) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, None, gw, gb, None, None, None


class _BatchNorm(torch.autograd.Function):
    """Saves the sparsified centered input x - mean (the BatchNorm backward reads its
    input only that way); the per-channel mean and invstd stay exact. Training mode
    normalizes with the batch statistics (and updates the running ones, as
    F.batch_norm does), eval mode with the running ones."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, config, sink=None):
        axes = (0, *range(2, x.dim()))
        if training:
            mean = x.mean(axes)
            invstd = torch.rsqrt(x.var(axes, unbiased=False) + eps)
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        stored = _encode(x - mean.view(shape), config)
        if sink is not None:  # the output as computed from the stored x - mean
            sink.append(_affine(stored * invstd.view(shape), weight, bias, shape))
        ctx.save_for_backward(stored, invstd, weight)
        ctx.axes, ctx.training, ctx.has_bias = axes, training, bias is not None
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)

    @staticmethod
    def backward(ctx, grad):
        centered, invstd, weight = ctx.saved_tensors
        axes = ctx.axes
        shape = [1, -1] + [1] * (grad.dim() - 2)
        n = grad.numel() // grad.shape[1]
        g_sum = grad.sum(axes)
        dot = (grad * centered).sum(axes)
        scale = (invstd * weight if weight is not None else invstd).view(shape)
        if ctx.training:
            proj = centered * (dot / n * invstd * invstd).view(shape)
            gx = (grad - proj - (g_sum / n).view(shape)) * scale
        else:
            gx = grad * scale
        gw = dot * invstd if weight is not None and ctx.needs_input_grad[3] else None
        gb = g_sum if ctx.has_bias and ctx.needs_input_grad[4] else None
        return gx, None, None, gw, gb, None, None, None, None, None
