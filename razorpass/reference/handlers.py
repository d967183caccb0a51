"""The reference's handler table: one handler per torch function that the reference runs
differently from the plain call, registered with ``@implements([...])``.

The mode calls ``handler(mode, func, args, kwargs)`` after the checks that come before
any lookup (a light function of free tensors, a view of a parameter or of a top-k
stored output: ``mode.py``). A handler returns the result, or ``DECLINED`` when the
call is not one it takes (its class not targeted, its layer not selected or not
trained, arguments it does not support); the mode then makes the plain call. A function
has one handler: registering it again raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .attention import _Matmul
from .casts import _op_dtype
from .codecs import _Quantized
from .gelu import _Gelu, _GeluDerivative
from .layers import _Conv, _Linear, _WeightMatmul
from .norms import _BatchNorm, _LayerNorm
from .ops import (_ADDMM, _BMM, _DERIVING, _DROPOUT, _MATMUL, _MM, _SOFTMAX, _is_basic_index, _is_constant_pad,
                  _is_identity_dropout)
from .sdpa import _sdpa

if TYPE_CHECKING:
    from .mode import _ReferenceMode

Handler = Callable[["_ReferenceMode", Callable, tuple, dict], Any]


class _Declined:
    def __repr__(self) -> str:
        return "DECLINED"


# What a handler returns for a call it does not take: the mode makes the plain call.
DECLINED = _Declined()
# torch function or Tensor method -> its handler
HANDLERS: dict[Callable, Handler] = {}


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def implements(funcs: Iterable[Callable]) -> Callable[[Handler], Handler]:
    """Register the decorated handler for each of ``funcs``. Raises ValueError, and
    registers none of them, when one already has a handler or is listed twice."""
    funcs = tuple(funcs)

    def register(handler: Handler) -> Handler:
        seen: dict[Callable, Handler] = {}
        for func in funcs:
            owner = HANDLERS.get(func) or seen.get(func)
            if owner is not None:
                raise ValueError(f"{_name(func)} is registered twice: for {owner.__name__} and {handler.__name__}")
            seen[func] = handler
        HANDLERS.update(seen)
        return handler

    return register


# ---------------------------------------------------------------- normalizations


@implements([F.layer_norm])
def _layer_norm(mode: _ReferenceMode, func, args, kwargs):
    if "layernorm" not in mode.config.target_classes:
        return DECLINED
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    a = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(names, args)), **kwargs}
    if not mode.selected(a["input"], a["weight"], a["bias"]):
        return DECLINED
    enc, sink = mode.encoding(a["input"], cls="layernorm", exact_if_free=False), []
    out = _LayerNorm.apply(a["input"], tuple(a["normalized_shape"]), a["weight"], a["bias"], a["eps"],
                           enc, sink if isinstance(enc, _Quantized) else None)
    return mode.track(out, sink)


@implements([F.batch_norm])
def _batch_norm(mode: _ReferenceMode, func, args, kwargs):
    if "batchnorm" not in mode.config.target_classes:
        return DECLINED
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    a = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
         **dict(zip(names, args)), **kwargs}
    if not a["training"] and a["running_mean"] is None:  # eval mode needs running statistics
        return DECLINED
    x = a["input"]
    if not mode.selected(x, a["weight"], a["bias"]):
        return DECLINED
    enc, sink = mode.encoding(x, cls="batchnorm"), []
    out = _BatchNorm.apply(x, a["running_mean"], a["running_var"], a["weight"], a["bias"],
                           a["training"], a["momentum"], a["eps"], enc,
                           sink if isinstance(enc, _Quantized) else None)
    return mode.track(out, sink)


# ---------------------------------------------------------------- pointwise


@implements([F.gelu])
def _gelu(mode: _ReferenceMode, func, args, kwargs):
    if "gelu" not in mode.config.target_classes or not mode.selected(args[0]):
        return DECLINED
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    if mode.config.gelu_mode != "topk":
        return _GeluDerivative.apply(args[0], approximate, mode.config.gelu_derivative_bits)
    return _Gelu.apply(args[0], approximate, mode.encoding(args[0], cls="gelu", exact_if_free=False))


@implements(_SOFTMAX)
def _softmax(mode: _ReferenceMode, func, args, kwargs):
    if "softmax" not in mode.config.target_classes or not mode.selected(args[0]):
        return DECLINED
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    extra = {k: v for k, v in kwargs.items() if k not in ("dim", "dtype", "_stacklevel")}
    if extra or len(args) > 2:
        return DECLINED
    # softmax(x, dim, dtype=d) is softmax(x.to(d), dim): it saves its output in d
    x = args[0] if kwargs.get("dtype") is None else args[0].to(kwargs["dtype"])
    return mode.softmax(x, dim)


# ---------------------------------------------------------------- matmuls and layers


@implements(_ADDMM + _MM)
def _weight_matmul(mode: _ReferenceMode, func, args, kwargs):
    """A matmul with a weight (a 2-D parameter that gets a gradient) as the right operand
    is a linear layer whatever the function: ``torch.addmm(b, x, W)``."""
    if "linear" not in mode.config.target_classes:
        return DECLINED
    if func in _ADDMM:
        a = {"beta": 1, "alpha": 1, **dict(zip(("input", "mat1", "mat2"), args)), **kwargs}
        bias, x, w, beta, alpha = a["input"], a["mat1"], a["mat2"], a["beta"], a["alpha"]
    elif len(args) == 2 and not kwargs:
        (x, w), bias, beta, alpha = args, None, 1, 1
    else:
        return DECLINED
    if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.dim() == 2 and id(w) in mode.state
            and id(x) not in mode.state and w.requires_grad and mode.selected(w)):
        return _WeightMatmul.apply(x, w, bias, beta, alpha, mode.layer_encoding(x, _op_dtype(x, w), "linear"))
    return DECLINED


@implements(_BMM)
def _activation_matmul(mode: _ReferenceMode, func, args, kwargs):
    """Two activations multiplied: each saved for the other's gradient."""
    if "matmul" not in mode.config.target_classes or len(args) != 2 or not mode.selected(*args):
        return DECLINED
    a, b = args
    if isinstance(a, torch.nn.Parameter) or isinstance(b, torch.nn.Parameter):
        return DECLINED
    dt = _op_dtype(a, b)
    return _Matmul.apply(a, b, mode.encoding(a, dt, cls="matmul"), mode.encoding(b, dt, cls="matmul"))


@implements(_MATMUL)
def _matmul(mode: _ReferenceMode, func, args, kwargs):
    """``matmul`` / ``@``: a linear layer when its right operand is a weight, else a matmul
    of two activations."""
    out = _weight_matmul(mode, func, args, kwargs)
    return _activation_matmul(mode, func, args, kwargs) if out is DECLINED else out


@implements([F.scaled_dot_product_attention])
def _attention(mode: _ReferenceMode, func, args, kwargs):
    if "sdpa" not in mode.config.target_classes or not mode.selected(*args[:3]):
        return DECLINED
    dt = _op_dtype(*args[:3])
    return _sdpa(*args, **kwargs, cfg=lambda t: mode.encoding(t, dt, cls="matmul"), softmax=mode.softmax)


@implements([F.linear])
def _linear(mode: _ReferenceMode, func, args, kwargs):
    if "linear" not in mode.config.target_classes:
        return DECLINED
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    if not (mode.selected(w) and w.requires_grad):
        return DECLINED
    return _Linear.apply(x, w, b, mode.layer_encoding(x, _op_dtype(x, w), "linear"))


@implements([F.conv1d, F.conv2d, F.conv3d])
def _conv(mode: _ReferenceMode, func, args, kwargs):
    if "conv" not in mode.config.target_classes:
        return DECLINED
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    a = {**defaults, **dict(zip(names, args)), **kwargs}
    if not (mode.selected(a["weight"]) and a["weight"].requires_grad and not isinstance(a["padding"], str)):
        return DECLINED
    return _Conv.apply(a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"],
                       mode.layer_encoding(a["input"], _op_dtype(a["input"], a["weight"]), "conv"))


# ---------------------------------------------------------------- derived from a normalization's x̂
# A function through which a layer input stays derived from a normalization's stored x̂
# (as the compiled path replays it): tracked while some output is (``mode.from_norm``).


@implements(_DERIVING)
def _pointwise(mode: _ReferenceMode, func, args, kwargs):
    return mode.derive(func, args, kwargs) if mode.from_norm else DECLINED


@implements(_DROPOUT)
def _dropout(mode: _ReferenceMode, func, args, kwargs):
    return mode.derive(func, args, kwargs) if mode.from_norm and _is_identity_dropout(args, kwargs) else DECLINED


@implements([torch.Tensor.__getitem__])
def _getitem(mode: _ReferenceMode, func, args, kwargs):
    return mode.derive(func, args, kwargs) if mode.from_norm and _is_basic_index(args) else DECLINED


@implements([F.pad])
def _pad(mode: _ReferenceMode, func, args, kwargs):
    return mode.derive(func, args, kwargs) if mode.from_norm and _is_constant_pad(args, kwargs) else DECLINED
