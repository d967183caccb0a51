"""Eager reference implementation of razorpass's rule, for tests and for users who
want the same semantics without the compiler.

Written independently of the compiler path (no custom ops, no packed format): one
``torch.autograd.Function`` per op class stores the sparsified copy of its input and
computes the weight gradient from it, while the input gradient uses the weight alone.
``sparsify`` selects with a stable descending sort (NaN first, ties to the lower index).
With ``gelu_encoding="derivN"`` the GELU saves gelu'(x) as N-bit levels
(``quantize_levels``: unpacked, one byte per element, its own rounding code).
The size rule (``not_smaller``): a tensor whose compressed copy is not smaller than the
dense tensor stays dense (exact). Under autocast, linear / conv / matmul sparsify the
autocast copy of their input (what autograd keeps for the weight gradient; the size
rule is judged on it) and compute backward in the autocast dtype. ``torch.addmm`` /
``mm`` / ``matmul`` with a trainable 2-D parameter as the right operand (GPT-2's Conv1D)
follow the "linear" rule; ``softmax(x, dim, dtype=d)`` is ``softmax(x.to(d), dim)``.
Under a quantized encoding, a Linear / conv input computed from a LayerNorm / BatchNorm
output by pointwise functions (``_DERIVING``: the affine, ReLU / ReLU6 / clamp, casts,
order-keeping reshapes, a dropout that drops nothing, a constant ``F.pad``) reads those functions applied to
the norm's own quantized x̂ instead of a code of its own, as the compiled path does.

    with razorpass.reference.apply(model, RazorConfig(sparsity=0.9)):
        model(x).sum().backward()
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import RazorConfig

__all__ = ["sparsify", "apply", "not_smaller", "quantize_levels", "dequantize_levels", "quantize_group",
           "not_smaller_quantized"]

_VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _keep(group: int, sparsity: float) -> int:
    # Independent of RazorConfig.keep_count: ceil((1 - s) * g) with exact rationals.
    from fractions import Fraction

    s = Fraction(sparsity).limit_denominator(1_000_000)
    return -((-(1 - s) * group).__floor__())  # ceil


def _group(shape, config: RazorConfig) -> int:
    n = math.prod(shape)
    if config.granularity == "sample":
        return n // shape[0] if len(shape) > 0 and shape[0] else max(n, 1)
    return config.block_size


def not_smaller(shape, dtype: torch.dtype, config: RazorConfig) -> bool:
    """The size rule: True when the compressed copy of a ``dtype`` tensor of ``shape``
    (one bit per element of every group, padded to whole bytes per group, or two bytes
    per kept element, four for groups of 32768 and more, whichever ``topk_layout``
    takes, plus the kept values) is not smaller than the tensor itself, which then stays
    dense (exact)."""
    n = math.prod(shape)
    group = _group(shape, config)
    if n == 0 or group == 0:
        return True
    groups = -(-n // group)
    itemsize = torch.empty((), dtype=dtype).element_size()
    vdtype = dtype if config.value_dtype == "same" else _VALUE_DTYPES[config.value_dtype]
    value_bytes = torch.empty((), dtype=vdtype).element_size()
    k = _keep(group, config.sparsity)
    mask, offsets = -(-group // 8), k * (2 if group < 32768 else 4)
    index = {"mask": mask, "offsets": offsets}.get(config.topk_layout, min(mask, offsets))
    return groups * index + groups * k * value_bytes >= n * itemsize


def _autocast_dtype(t) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to for a lower-precision op (linear, conv,
    matmul), or None when autocast is off for its device or leaves it alone."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    dev = t.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return dt if dt != t.dtype else None


def _cast(t, dtype):
    """``t`` as a lower-precision op under autocast reads it (floating point, not double)."""
    return t.to(dtype) if dtype is not None and _autocast_dtype(t) is not None else t


def sparsify(x: torch.Tensor, config: RazorConfig | None) -> torch.Tensor:
    """The dense tensor razorpass's compress + decompress produce for ``x``
    (``config=None``: ``x`` itself, for tensors that are not compressed)."""
    if config is None:
        return x.detach()
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    group = _group(tuple(x.shape), config)
    groups = -(-n // group)
    k = _keep(group, config.sparsity)
    vdtype = x.dtype if config.value_dtype == "same" else _VALUE_DTYPES[config.value_dtype]
    out = torch.zeros(groups * group, dtype=x.dtype)
    for g in range(groups):
        seg = flat[g * group : (g + 1) * group]
        # torch.sort orders NaN above every number; stable keeps lower indices first.
        order = torch.sort(seg.abs().to(torch.float64), descending=True, stable=True).indices[:k]
        out[g * group + order] = seg[order].to(vdtype).to(x.dtype)
    return out[:n].view(x.shape)


class _Quantized:
    """The "accurate" policy's per-group quantization of one tensor (its own code: no
    custom op, no packing)."""

    def __init__(self, group: int, bits: int):
        self.group, self.bits = group, bits


def quantize_group(x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """The dense tensor razorpass's quantize_group + dequantize_group produce for ``x``:
    per group of ``group`` consecutive elements (flattened), ``2**bits`` uniform levels
    from the group's min to its max, both rounded outwards to bfloat16; level
    ``round((x - lo) / step)`` in float32 (half to even, clamped; 0 when the step is 0 or
    the quotient NaN); a group whose bounds are not finite decodes to NaN."""
    flat = x.detach().contiguous().reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        return x.detach().clone()
    rows = -(-n // group)
    padded = torch.full((rows * group,), math.nan)
    padded[:n] = flat
    g = padded.view(rows, group)
    real = ~torch.isnan(g)
    real[:-1] = True  # only the last row has padding; a NaN element elsewhere is an element
    real.view(-1)[:n] = True
    lo = torch.where(real, g, torch.tensor(math.inf)).min(1).values
    hi = torch.where(real, g, torch.tensor(-math.inf)).max(1).values
    has_nan = (torch.isnan(g) & real).any(1)
    lo_b, hi_b = lo.to(torch.bfloat16), hi.to(torch.bfloat16)
    lo_b = torch.where(lo_b.float() > lo, torch.nextafter(lo_b, torch.tensor(-math.inf, dtype=torch.bfloat16)), lo_b)
    hi_b = torch.where(hi_b.float() < hi, torch.nextafter(hi_b, torch.tensor(math.inf, dtype=torch.bfloat16)), hi_b)
    lo32, hi32 = lo_b.float().unsqueeze(1), hi_b.float().unsqueeze(1)
    step = (hi32 - lo32) / (2**bits - 1)
    t = (g - lo32) / step
    t = torch.where(t.isnan() | (step == 0), torch.zeros_like(t), t)
    out = torch.round(t).clamp(0, 2**bits - 1) * step + lo32
    bad = has_nan | ~torch.isfinite(lo32.squeeze(1)) | ~torch.isfinite(hi32.squeeze(1))
    out[bad] = math.nan
    return out.reshape(-1)[:n].to(x.dtype).view(x.shape)


def not_smaller_quantized(shape, dtype: torch.dtype, group: int, bits: int) -> bool:
    """The size rule of a quantized copy: whole groups of ``bits`` per element plus two
    bfloat16 bounds per group, against the tensor dense."""
    n = math.prod(shape)
    rows = -(-n // group)
    return n == 0 or rows * group * bits // 8 + rows * 4 >= n * torch.empty((), dtype=dtype).element_size()


class _Derived:
    """A layer input computed pointwise from a normalization's quantized x̂ (its affine
    part, a ReLU / ReLU6, a cast): backward reads that computation on the decoded x̂,
    ``value``, rather than a code of its own."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def _encode(x: torch.Tensor, enc) -> torch.Tensor:
    """``x`` as backward reads it: exact (None), top-k (a RazorConfig), quantized, or
    derived from a normalization's quantized x̂."""
    if isinstance(enc, _Derived):
        return enc.value.to(x.dtype)
    if isinstance(enc, _Quantized):
        return quantize_group(x, enc.group, enc.bits)
    return sparsify(x, enc)


def _dtypes(*ts):
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in ts)


def _back(g, dtype):
    return None if g is None else g.to(dtype)


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


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype a pointwise backward computes in (half precision computes in float32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def quantize_levels(d: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """Level index of every element of ``d``: ``round((d - lo) / step)`` with
    ``step = (hi - lo) / (2**bits - 1)``, in float32, half to even, clamped to the
    levels, NaN to level 0; one uint8 per element (no packing)."""
    top = 2**bits - 1
    t = (d.to(torch.float32) - lo) / ((hi - lo) / top)
    t = torch.where(t.isnan(), torch.zeros_like(t), t)
    return torch.round(t).clamp(0, top).to(torch.uint8)


def dequantize_levels(q: torch.Tensor, bits: int, lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor:
    """The level values ``q * step + lo`` (float32), cast to ``dtype``."""
    return (q.to(torch.float32) * ((hi - lo) / (2**bits - 1)) + lo).to(dtype)


class _GeluDerivative(torch.autograd.Function):
    """gelu_encoding "derivN": saves gelu'(x) as N-bit levels on the range of gelu'
    (the GELU input is not saved); backward is grad * the dequantized derivative,
    computed in float32 for half-precision inputs as the decomposed backward does."""

    @staticmethod
    def forward(ctx, x, approximate, bits):
        from .config import GELU_DERIVATIVE_RANGE

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


def _unbroadcast(g, shape):
    if g is None or not shape or g.shape == shape:
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


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


# Functions that are not "light" (the compiled path's HEAVY_OPS and random ops): their
# outputs are never free to recompute.
_HEAVY = frozenset({
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum,
    F.embedding, F.scaled_dot_product_attention, F.multi_head_attention_forward, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.rand, torch.rand_like, torch.randn,
    torch.randn_like, torch.randint, torch.bernoulli, torch.Tensor.bernoulli_, torch.Tensor.uniform_,
    torch.Tensor.normal_,
})
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
_ADDMM = (torch.addmm, torch.Tensor.addmm)
# Reshapes that keep the flattened element order: a top-k copy of the result is the
# top-k copy of the source (the same blocks), as the compiled path replays them on the
# decoded root.
_ORDER_KEEPING = frozenset({
    torch.flatten, torch.Tensor.flatten, torch.reshape, torch.Tensor.reshape, torch.Tensor.view,
    torch.Tensor.view_as, torch.Tensor.reshape_as, torch.unsqueeze, torch.Tensor.unsqueeze, torch.squeeze,
    torch.Tensor.squeeze, torch.Tensor.contiguous, torch.clone, torch.Tensor.clone,
})
# Pointwise functions through which a layer input stays derived from a normalization's
# stored x̂ (as the compiled path replays them: compress_saved.DERIVING_OPS).
_DERIVING = frozenset({
    F.relu, F.relu6, F.hardtanh, torch.relu, torch.Tensor.relu, torch.clamp, torch.Tensor.clamp,
    torch.clamp_min, torch.clamp_max, torch.Tensor.clamp_min, torch.Tensor.clamp_max, F.relu_, torch.relu_,
    torch.Tensor.relu_, F.hardtanh_, torch.Tensor.clamp_, torch.Tensor.to, torch.Tensor.float, torch.Tensor.double,
    torch.Tensor.half, torch.Tensor.bfloat16, torch.add, torch.sub, torch.mul, torch.div, torch.Tensor.add,
    torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.Tensor.__sub__, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__,
}) | _ORDER_KEEPING
# A parameter read through these (or _ORDER_KEEPING, or an identity dropout) is still the
# parameter's memory: the compiled path never saves a copy of it (compress_saved's
# _is_activation_operand strips views and clones down to the primal), so it stays exact.
_PARAM_VIEWS = _ORDER_KEEPING | frozenset({
    torch.Tensor.detach, torch.detach, torch.permute, torch.Tensor.permute, torch.transpose, torch.Tensor.transpose,
    torch.t, torch.Tensor.t, torch.Tensor.expand, torch.Tensor.expand_as,
})
_DROPOUT = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place op on it or a view of it)."""
    try:
        return t._version
    except RuntimeError:  # an inference tensor has none (and no backward to feed)
        return -1


def _is_identity_dropout(args, kwargs) -> bool:
    """A dropout that drops nothing (p = 0, or not training): the compiled graph has no
    dropout there at all."""
    a = {"p": 0.5, "training": True, **dict(zip(("input", "p", "training"), args)), **kwargs}
    return a["p"] == 0 or not a["training"]


def _is_basic_index(args) -> bool:
    """``x[...]`` with slices / ints only (no index tensor): a view; one that keeps every
    element (``x[:, 0:]``) keeps their order and is derived like a reshape."""
    return len(args) == 2 and not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(args[1]))


def _is_constant_pad(args, kwargs) -> bool:
    """``F.pad`` adding constants around its input (``nn.ZeroPad2d``, a "same" padding):
    derived like a pointwise function (the compiled path replays ``constant_pad_nd``)."""
    a = {"mode": "constant", **dict(zip(("input", "pad", "mode", "value"), args)), **kwargs}
    return a["mode"] == "constant"


_MM = (torch.mm, torch.Tensor.mm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _op_dtype(*operands) -> torch.dtype | None:
    """The autocast dtype a lower-precision op computes in, None without autocast."""
    return next((d for d in map(_autocast_dtype, operands) if d is not None), None)


class _ReferenceMode(TorchFunctionMode):
    def __init__(self, config: RazorConfig, paths: list[str], inputs: set[int], state: set[int],
                 choices: dict[tuple[str, int], int] | None = None):
        super().__init__()
        self.config, self.paths, self.inputs, self.state = config, paths, inputs, state
        self.choices = choices  # memory_budget's (module path, numel) -> bits, 0 dense
        self.derived: dict[int, torch.Tensor] = {}
        self.topk_stored: dict[int, torch.Tensor] = {}  # outputs a top-k class stores (softmax)
        self.param_views: dict[int, torch.Tensor] = {}  # parameters seen through _PARAM_VIEWS
        # outputs computed from a normalization's quantized x̂ -> (output, the same
        # computation on the stored x̂, the output's version then): a layer reading
        # one reads the second, while the output is unchanged
        self.from_norm: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _free(self, t: torch.Tensor) -> bool:
        """Held by the caller (a model input, parameter or buffer that needs no gradient)
        or computed from such tensors (and parameters) by light functions alone: the
        compiled path recomputes those instead of saving them, so they are never
        sparsified."""
        if self.derived.get(id(t)) is t:
            return True
        return (id(t) in self.inputs or id(t) in self.state) and not t.requires_grad

    def _caller_memory(self, t: torch.Tensor) -> bool:
        """A parameter, or one seen through ``_PARAM_VIEWS``: the compiled path never saves
        a copy of it, so it stays exact. (Not "free": a light function of a trainable
        parameter, ``W * 2``, is an activation, compressed on both sides.)"""
        return isinstance(t, torch.nn.Parameter) or self.param_views.get(id(t)) is t

    def _cfg(self, x: torch.Tensor, dtype: torch.dtype | None = None, *, cls: str,
             exact_if_free: bool = True):
        """How ``x`` (seen as ``dtype``: the autocast copy an op saves) is stored for
        backward by class ``cls``: None (exact: a free tensor when ``exact_if_free``, or
        one whose encoded copy is not smaller than itself, the size rule), the config
        (top-k) or a ``_Quantized``. A tensor a top-k class also stores (the softmax
        output read by P·V) is top-k for every class."""
        if exact_if_free and (self._free(x) or self._caller_memory(x)):
            return None
        cfg, dt = self.config, dtype or x.dtype
        if cfg.encoding_of(cls) == "quant" and not (dt == x.dtype and self.topk_stored.get(id(x)) is x):
            bits = cfg.quant_bits
            if self.choices is not None:  # a tensor memory_budget did not choose bits for stays exact
                bits = self.choices.get((self.paths[-1] if self.paths else "", x.numel()), 0)
                if not bits:
                    return None
            q = _Quantized(cfg.quant_group(cls), bits)
            return None if not_smaller_quantized(tuple(x.shape), dt, q.group, q.bits) else q
        return None if not_smaller(tuple(x.shape), dt, cfg) else cfg

    def _softmax(self, x: torch.Tensor, dim) -> torch.Tensor:
        enc = self._cfg(x, cls="softmax", exact_if_free=False)
        y = _Softmax.apply(x, dim, enc)
        if isinstance(enc, RazorConfig):
            self.topk_stored[id(y)] = y
        return y

    def _light_of_free(self, func, args, kwargs) -> bool:
        if func in _HEAVY:
            return False
        ts = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        free = [self._free(t) for t in ts]
        return any(free) and all(f or id(t) in self.state for f, t in zip(free, ts))

    def _selected(self, *needs_grad) -> bool:
        path = self.paths[-1] if self.paths else ""
        cfg = self.config
        return (
            any(isinstance(t, torch.Tensor) and t.requires_grad for t in needs_grad) and torch.is_grad_enabled()
            and any(fnmatch.fnmatchcase(path, p) for p in cfg.include)
            and not any(fnmatch.fnmatchcase(path, p) for p in cfg.exclude)
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._light_of_free(func, args, kwargs):
            out = func(*args, **kwargs)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.derived[id(t)] = t
            return out
        same = self._same_memory(func, args, kwargs)
        if same is not None:
            return same
        targets = self.config.target_classes
        if func is F.layer_norm and "layernorm" in targets:
            a = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)), **kwargs}
            if self._selected(a["input"], a["weight"], a["bias"]):
                enc, sink = self._cfg(a["input"], cls="layernorm", exact_if_free=False), []
                out = _LayerNorm.apply(a["input"], tuple(a["normalized_shape"]), a["weight"], a["bias"], a["eps"],
                                       enc, sink if isinstance(enc, _Quantized) else None)
                return self._track(out, sink)
        if func is F.batch_norm and "batchnorm" in targets:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            a = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
                 **dict(zip(names, args)), **kwargs}
            if a["training"] or a["running_mean"] is not None:  # eval mode needs running statistics
                x = a["input"]
                if self._selected(x, a["weight"], a["bias"]):
                    enc, sink = self._cfg(x, cls="batchnorm"), []
                    out = _BatchNorm.apply(x, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                           a["training"], a["momentum"], a["eps"], enc,
                                           sink if isinstance(enc, _Quantized) else None)
                    return self._track(out, sink)
        if func is F.gelu and "gelu" in targets and self._selected(args[0]):
            approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            if self.config.gelu_mode != "topk":
                return _GeluDerivative.apply(args[0], approximate, self.config.gelu_derivative_bits)
            return _Gelu.apply(args[0], approximate, self._cfg(args[0], cls="gelu", exact_if_free=False))
        if func in _SOFTMAX and "softmax" in targets and self._selected(args[0]):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            extra = {k: v for k, v in kwargs.items() if k not in ("dim", "dtype", "_stacklevel")}
            if not extra and len(args) <= 2:
                # softmax(x, dim, dtype=d) is softmax(x.to(d), dim): it saves its output in d
                x = args[0] if kwargs.get("dtype") is None else args[0].to(kwargs["dtype"])
                return self._softmax(x, dim)
        if "linear" in targets and (func in _ADDMM or (func in _MM and len(args) == 2 and not kwargs)):
            # a matmul with a weight (a 2-D parameter that gets a gradient) as the right
            # operand is a linear layer whatever the function: torch.addmm(b, x, W)
            if func in _ADDMM:
                a = {"beta": 1, "alpha": 1, **dict(zip(("input", "mat1", "mat2"), args)), **kwargs}
                bias, x, w, beta, alpha = a["input"], a["mat1"], a["mat2"], a["beta"], a["alpha"]
            else:
                (x, w), bias, beta, alpha = args, None, 1, 1
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.dim() == 2 and id(w) in self.state
                    and id(x) not in self.state and w.requires_grad and self._selected(w)):
                return _WeightMatmul.apply(x, w, bias, beta, alpha, self._layer_cfg(x, _op_dtype(x, w), "linear"))
        if func in _MATMUL and "matmul" in targets and len(args) == 2 and self._selected(*args):
            a, b = args
            if not isinstance(a, torch.nn.Parameter) and not isinstance(b, torch.nn.Parameter):
                dt = _op_dtype(a, b)
                return _Matmul.apply(a, b, self._cfg(a, dt, cls="matmul"), self._cfg(b, dt, cls="matmul"))
        if func is F.scaled_dot_product_attention and "sdpa" in targets and self._selected(*args[:3]):
            dt = _op_dtype(*args[:3])
            return _sdpa(*args, **kwargs, cfg=lambda t: self._cfg(t, dt, cls="matmul"), softmax=self._softmax)
        if func is F.linear and "linear" in self.config.target_classes:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self._selected(w) and w.requires_grad:
                return _Linear.apply(x, w, b, self._layer_cfg(x, _op_dtype(x, w), "linear"))
        if func in (F.conv1d, F.conv2d, F.conv3d) and "conv" in self.config.target_classes:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
            a = {**defaults, **dict(zip(names, args)), **kwargs}
            if self._selected(a["weight"]) and a["weight"].requires_grad and not isinstance(a["padding"], str):
                return _Conv.apply(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                                   a["dilation"], a["groups"],
                                   self._layer_cfg(a["input"], _op_dtype(a["input"], a["weight"]), "conv"))
        if self.from_norm and (func in _DERIVING or (func in _DROPOUT and _is_identity_dropout(args, kwargs))
                               or (func is torch.Tensor.__getitem__ and _is_basic_index(args))
                               or (func is F.pad and _is_constant_pad(args, kwargs))):
            return self._derive(func, args, kwargs)
        return func(*args, **kwargs)

    def _same_memory(self, func, args, kwargs):
        """A view of a parameter, or an order-keeping reshape of a top-k-stored softmax
        output: the result is tracked like its source (a parameter's view stays exact,
        P.view(...) read by P·V is the same top-k copy). None for anything else."""
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None:
            return None
        identity_dropout = func in _DROPOUT and _is_identity_dropout(args, kwargs)
        if self.topk_stored.get(id(src)) is src and (func in _ORDER_KEEPING or identity_dropout):
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.topk_stored[id(out)] = out
            return out
        if self._caller_memory(src):
            whole = func is torch.Tensor.__getitem__ and _is_basic_index(args)  # [0:n] of n rows is an alias
            if func in _PARAM_VIEWS or identity_dropout or whole:
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor) and (not whole or out.shape == src.shape):
                    self.param_views[id(out)] = out
                return out
        return None

    def _track(self, out: torch.Tensor, sink: list) -> torch.Tensor:
        if sink:
            self.from_norm[id(out)] = (out, sink[0].detach().to(out.dtype), _version(out))
        return out

    def _stored(self, t):
        """The value a tracked tensor was derived as, while ``t`` is unchanged: an in-place
        op this context does not replay (``h += residual``) bumps its version and ends
        the tracking (the compiled graph sees that op as a new, untracked tensor)."""
        hit = self.from_norm.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t and hit[2] == _version(t) else None

    def _derive(self, func, args, kwargs):
        """A pointwise function of one tracked tensor (the others smaller, broadcast):
        the result is tracked too, as the same function of the stored value."""
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tracked = [(t, v) for t in leaves if (v := self._stored(t)) is not None]  # before an in-place func
        out = func(*args, **kwargs)
        if (len(tracked) == 1 and isinstance(out, torch.Tensor)
                and (out.numel() == tracked[0][0].numel() or func is F.pad)
                and all(t is tracked[0][0] or t.numel() < out.numel() for t in leaves)):
            src, stored = tracked[0]
            swap = lambda t: stored.clone() if t is src else t  # noqa: E731
            with torch.no_grad():
                value = func(*torch.utils._pytree.tree_map(swap, args), **torch.utils._pytree.tree_map(swap, kwargs))
            self.from_norm[id(out)] = (out, value.detach(), _version(out))
        return out

    def _layer_cfg(self, x: torch.Tensor, dtype, cls: str):
        """A linear / conv input's encoding: derived from a normalization's stored x̂
        when it is computed from it pointwise, else its own (``_cfg``)."""
        stored = self._stored(x)
        if stored is not None and self.config.encoding_of(cls) == "quant" and not self._free(x):
            return _Derived(stored)
        return self._cfg(x, dtype, cls=cls)


@contextlib.contextmanager
def apply(model: torch.nn.Module, config: RazorConfig | None = None, *,
          choices: dict[tuple[str, int], int] | None = None, **options) -> Iterator[None]:
    """Run ``model`` eagerly with the reference rule while the block is active.

    ``memory_budget`` chooses bits per tensor from the whole graph's saved bytes, known
    only once it is partitioned: pass the compile's choices as ``choices`` ((module
    path, numel) -> bits, 0 for dense; ``BudgetRecord.reference_choices()``). Quantized
    tensors then take those bits, and one with no entry stays exact."""
    config = RazorConfig.from_options(config, **options)
    if config.memory_budget is not None and choices is None:
        raise ValueError("reference.apply with memory_budget needs choices=: the bits come from the compiled graph "
                         "(record_compiles()[i].budget.reference_choices())")
    paths: list[str] = []
    inputs: set[int] = set()
    handles = []

    def record_inputs(module, args, kwargs):
        inputs.update(id(t) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))

    handles.append(model.register_forward_pre_hook(record_inputs, with_kwargs=True))

    def enter(name):
        def hook(module, args):
            paths.append(name)
        return hook

    def leave(module, args, output):
        paths.pop()

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(enter(name)))
        handles.append(mod.register_forward_hook(leave))
    state = {id(t) for t in [*model.parameters(), *model.buffers()]}
    try:
        with _ReferenceMode(config, paths, inputs, state, choices):
            yield
    finally:
        for h in handles:
            h.remove()
