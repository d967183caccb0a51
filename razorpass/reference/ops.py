"""Which torch functions are what to the reference: heavy (never free to recompute),
order-keeping reshapes, the pointwise functions a normalization's x̂ is derived
through, views that keep a parameter's memory, and the dropouts, indexing and padding
that are identities or views."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
# Matmuls: of two matrices, with a bias, batched, of any ranks.
_MM = (torch.mm, torch.Tensor.mm)
_ADDMM = (torch.addmm, torch.Tensor.addmm)
_BMM = (torch.bmm, torch.Tensor.bmm)
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
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
