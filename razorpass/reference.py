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


def sparsify(x: torch.Tensor, config: RazorConfig) -> torch.Tensor:
    """The dense tensor razorpass's compress + decompress produce for ``x``."""
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


class _ReferenceMode(TorchFunctionMode):
    def __init__(self, config: RazorConfig, paths: list[str]):
        super().__init__()
        self.config, self.paths = config, paths

    def _selected(self, weight) -> bool:
        path = self.paths[-1] if self.paths else ""
        cfg = self.config
        return (
            isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled()
            and any(fnmatch.fnmatchcase(path, p) for p in cfg.include)
            and not any(fnmatch.fnmatchcase(path, p) for p in cfg.exclude)
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and "linear" in self.config.targets:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self._selected(w):
                return _Linear.apply(x, w, b, self.config)
        if func in (F.conv1d, F.conv2d, F.conv3d) and "conv" in self.config.targets:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
            a = {**defaults, **dict(zip(names, args)), **kwargs}
            if self._selected(a["weight"]) and not isinstance(a["padding"], str):
                return _Conv.apply(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                                   a["dilation"], a["groups"], self.config)
        return func(*args, **kwargs)


@contextlib.contextmanager
def apply(model: torch.nn.Module, config: RazorConfig | None = None, **options) -> Iterator[None]:
    """Run ``model`` eagerly with the reference rule while the block is active."""
    config = RazorConfig.from_options(config, **options)
    paths: list[str] = []
    handles = []

    def enter(name):
        def hook(module, args):
            paths.append(name)
        return hook

    def leave(module, args, output):
        paths.pop()

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(enter(name)))
        handles.append(mod.register_forward_hook(leave))
    try:
        with _ReferenceMode(config, paths):
            yield
    finally:
        for h in handles:
            h.remove()
