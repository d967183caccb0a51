"""Eager reference implementation of razorpass's rule, for tests and for users who
want the same semantics without the compiler.

    with razorpass.reference.apply(model, RazorConfig(sparsity=0.9)):
        model(x).sum().backward()

Written independently of the compiled path (no custom ops, no packed format, no import
from ``razorpass.passes`` or ``razorpass.kernels``; its byte rules are restated on
purpose): one ``torch.autograd.Function`` per op class stores what backward reads of
its input, top-k sparsified (``sparsify``) or quantized per group (``quantize_group``),
and computes the weight gradient from it, while the input gradient uses the weight
alone. ``sparsify`` selects with a stable descending sort (NaN first, ties to the lower
index). With ``gelu_encoding="derivN"`` the GELU saves gelu'(x) as N-bit levels
(``quantize_levels``: unpacked, one byte per element, its own rounding code).

The size rules (``not_smaller``, ``not_smaller_quantized``): a tensor whose compressed
copy is not smaller than the dense tensor stays dense (exact). Under autocast, linear /
conv / matmul encode the autocast copy of their input (what autograd keeps for the
weight gradient; the size rule is judged on it) and compute backward in the autocast
dtype. ``torch.addmm`` / ``mm`` / ``matmul`` with a trainable 2-D parameter as the
right operand (GPT-2's Conv1D) follow the "linear" rule; ``softmax(x, dim, dtype=d)``
is ``softmax(x.to(d), dim)``. Under a quantized encoding, a Linear / conv input
computed from a LayerNorm / BatchNorm output by pointwise functions (the affine, ReLU /
ReLU6 / clamp, casts, order-keeping reshapes, a dropout that drops nothing, a constant
``F.pad``: ``ops.py``) reads those functions applied to the norm's own quantized x̂
instead of a code of its own, as the compiled path does.

Modules: ``rules`` (group, keep and size rules), ``codecs`` (what backward reads of a
saved tensor), ``casts`` (autocast and gradient dtypes), the Functions by op class
(``layers``, ``norms``, ``gelu``, ``attention``, ``sdpa``), ``ops`` (which torch
functions are what), ``handlers`` (the table: one handler per torch function the
reference runs differently, registered with ``@implements([...])``) and ``mode`` (the
TorchFunctionMode that looks each call up in that table, and ``apply``).
"""

from __future__ import annotations

from .codecs import dequantize_levels, quantize_group, quantize_levels, quantize_normal, sparsify, stochastic_noise
from .mode import apply
from .rules import not_smaller, not_smaller_quantized

__all__ = ["sparsify", "apply", "not_smaller", "quantize_levels", "dequantize_levels", "quantize_group",
           "not_smaller_quantized", "stochastic_noise", "quantize_normal"]
