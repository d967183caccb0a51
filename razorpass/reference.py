"""Eager reference implementation of razorpass's rule, for tests and for users who
want the same semantics without the compiler.

Written independently of the compiler path (no custom ops, no packed format): one
``torch.autograd.Function`` per op class stores the sparsified copy of its input and
computes the weight gradient from it, while the input gradient uses the weight alone.
``sparsify`` selects with a stable descending sort (NaN first, ties to the lower index).

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

__all__ = ["sparsify", "apply"]

_VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _keep(group: int, sparsity: float) -> int:
    # Independent of RazorConfig.keep_count: ceil((1 - s) * g) with exact rationals.
    from fractions import Fraction

    s = Fraction(sparsity).limit_denominator(1_000_000)
    return -((-(1 - s) * group).__floor__())  # ceil


def sparsify(x: torch.Tensor, config: RazorConfig | None) -> torch.Tensor:
    """The dense tensor razorpass's compress + decompress produce for ``x``
    (``config=None``: ``x`` itself, for tensors that are not compressed)."""
    if config is None:
        return x.detach()
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    if config.granularity == "sample":
        group = n // x.shape[0] if x.dim() > 0 and x.shape[0] else max(n, 1)
    else:
        group = config.block_size
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


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config):
        ctx.save_for_backward(sparsify(x, config), weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        xs, weight = ctx.saved_tensors
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        gw = grad.reshape(-1, grad.shape[-1]).t() @ xs.reshape(-1, xs.shape[-1])
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, config):
        ctx.save_for_backward(sparsify(x, config), weight)
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
            grad, xs, weight, [weight.shape[0]] if has_bias else None,
            expand(stride), expand(padding), expand(dilation), False, [0] * nd, groups,
            [ctx.needs_input_grad[0], True, has_bias],
        )
        return gx, gw, gb, None, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    """Saves the sparsified normalized input x̂ = (x - mean) * rstd; mean/rstd stay exact."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps, config):
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        mean = x.mean(dims, keepdim=True)
        rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        xhat = (x - mean) * rstd
        ctx.save_for_backward(sparsify(xhat, config), rstd, weight)
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
        return gx, None, gw, gb, None, None


class _BatchNorm(torch.autograd.Function):
    """Saves the sparsified centered input x - mean (the BatchNorm backward reads its
    input only that way); the per-channel mean and invstd stay exact. Training mode
    normalizes with the batch statistics (and updates the running ones, as
    F.batch_norm does), eval mode with the running ones."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, config):
        axes = (0, *range(2, x.dim()))
        if training:
            mean = x.mean(axes)
            invstd = torch.rsqrt(x.var(axes, unbiased=False) + eps)
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        ctx.save_for_backward(sparsify(x - mean.view(shape), config), invstd, weight)
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
        return gx, None, None, gw, gb, None, None, None, None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate, config):
        ctx.save_for_backward(sparsify(x, config))
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        (xs,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, xs, approximate=ctx.approximate), None, None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, config):
        y = torch.softmax(x, dim)
        ctx.save_for_backward(sparsify(y, config))
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad):
        (ys,) = ctx.saved_tensors
        return ys * (grad - (grad * ys).sum(ctx.dim, keepdim=True)), None, None


class _Matmul(torch.autograd.Function):
    """activation x activation: each operand's gradient reads the other, sparsified."""

    @staticmethod
    def forward(ctx, a, b, config_a, config_b):
        ctx.save_for_backward(sparsify(a, config_a), sparsify(b, config_b))
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ga = grad @ b.transpose(-2, -1) if ctx.needs_input_grad[0] else None
        gb = a.transpose(-2, -1) @ grad if ctx.needs_input_grad[1] else None
        return (_unbroadcast(ga, ctx.needs_input_grad[0] and a.shape), _unbroadcast(gb, ctx.needs_input_grad[1] and b.shape),
                None, None)


def _unbroadcast(g, shape):
    if g is None or not shape or g.shape == shape:
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, config,
          cfg):
    """The reference of the "sdpa" target: attention as math with the matmul and
    softmax rules (razorpass.passes.decompose_sdpa.math_sdpa with reference autograd Functions).
    ``cfg(t)`` is the config that sparsifies the input operand ``t`` (None: exact)."""
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
    probs = _Softmax.apply(scores, -1, config)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return _Matmul.apply(probs, value, config, cfg(value))


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


class _ReferenceMode(TorchFunctionMode):
    def __init__(self, config: RazorConfig, paths: list[str], inputs: set[int], state: set[int]):
        super().__init__()
        self.config, self.paths, self.inputs, self.state = config, paths, inputs, state
        self.derived: dict[int, torch.Tensor] = {}

    def _free(self, t: torch.Tensor) -> bool:
        """Held by the caller (a model input, parameter or buffer that needs no gradient)
        or computed from such tensors (and parameters) by light functions alone: the
        compiled path recomputes those instead of saving them, so they are never
        sparsified."""
        if self.derived.get(id(t)) is t:
            return True
        return (id(t) in self.inputs or id(t) in self.state) and not t.requires_grad

    def _cfg(self, x: torch.Tensor) -> RazorConfig | None:
        """The config that sparsifies ``x``, or None for a free tensor (kept exact)."""
        return None if self._free(x) else self.config

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
        targets = self.config.targets
        if func is F.layer_norm and "layernorm" in targets:
            a = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)), **kwargs}
            if self._selected(a["input"], a["weight"], a["bias"]):
                return _LayerNorm.apply(a["input"], tuple(a["normalized_shape"]), a["weight"], a["bias"], a["eps"], self.config)
        if func is F.batch_norm and "batchnorm" in targets:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            a = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
                 **dict(zip(names, args)), **kwargs}
            if a["training"] or a["running_mean"] is not None:  # eval mode needs running statistics
                x = a["input"]
                if self._selected(x, a["weight"], a["bias"]):
                    return _BatchNorm.apply(x, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                            a["training"], a["momentum"], a["eps"], self._cfg(x))
        if func is F.gelu and "gelu" in targets and self._selected(args[0]):
            return _Gelu.apply(args[0], kwargs.get("approximate", args[1] if len(args) > 1 else "none"), self.config)
        if func in _SOFTMAX and "softmax" in targets and self._selected(args[0]):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if kwargs.get("dtype") is None:
                return _Softmax.apply(args[0], dim, self.config)
        if func in _MATMUL and "matmul" in targets and len(args) == 2 and self._selected(*args):
            a, b = args
            if not isinstance(a, torch.nn.Parameter) and not isinstance(b, torch.nn.Parameter):
                return _Matmul.apply(a, b, self._cfg(a), self._cfg(b))
        if func is F.scaled_dot_product_attention and "sdpa" in targets and self._selected(*args[:3]):
            return _sdpa(*args, **kwargs, config=self.config, cfg=self._cfg)
        if func is F.linear and "linear" in self.config.targets:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self._selected(w) and w.requires_grad:
                return _Linear.apply(x, w, b, self._cfg(x))
        if func in (F.conv1d, F.conv2d, F.conv3d) and "conv" in self.config.targets:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
            a = {**defaults, **dict(zip(names, args)), **kwargs}
            if self._selected(a["weight"]) and a["weight"].requires_grad and not isinstance(a["padding"], str):
                return _Conv.apply(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                                   a["dilation"], a["groups"], self._cfg(a["input"]))
        return func(*args, **kwargs)


@contextlib.contextmanager
def apply(model: torch.nn.Module, config: RazorConfig | None = None, **options) -> Iterator[None]:
    """Run ``model`` eagerly with the reference rule while the block is active."""
    config = RazorConfig.from_options(config, **options)
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
        with _ReferenceMode(config, paths, inputs, state):
            yield
    finally:
        for h in handles:
            h.remove()
