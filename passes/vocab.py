"""The typed vocabulary of razorpass: what an option or a record names is a member of one
of these enums, never a free string.

Every enum is a ``str`` enum: a member equals its value (``OpClass.LINEAR == "linear"``),
so strings stay accepted wherever a user writes one (``options={"policy": "backrazor"}``,
``targets=("linear",)``) and the config turns them into members once, when it is built.
``parse`` does that conversion with an error that names the field and the valid values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["OpClass", "Policy", "Granularity", "Rounding", "Codebook", "TopkLayout", "Encoding", "Storage", "Compiler", "CodecForm", "GeluEncoding", "SkipReason",
           "Skip", "parse"]


class _Named(str, enum.Enum):
    """A string enum that prints as its value (``f"{OpClass.LINEAR}"`` is ``linear``)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    def __repr__(self) -> str:
        return repr(self.value)


class OpClass(_Named):
    """What a saved tensor is to the backward that reads it (a config's ``targets``)."""

    LINEAR = "linear"  # the input of a linear / matmul-with-a-weight whose weight gets a gradient
    CONV = "conv"  # the input of a convolution whose weight gets a gradient
    MATMUL = "matmul"  # an operand of an activation x activation matmul (Q·Kᵀ, P·V)
    SOFTMAX = "softmax"  # the saved softmax output
    LAYERNORM = "layernorm"  # the normalized LayerNorm input x̂ (mean, rstd stay exact)
    GELU = "gelu"  # the saved GELU input, or its derivative (GeluEncoding)
    BATCHNORM = "batchnorm"  # the BatchNorm input centered on its channel mean (mean, invstd exact)
    SDPA = "sdpa"  # scaled_dot_product_attention as explicit math: implies MATMUL and SOFTMAX
    MASK = "mask"  # boolean masks saved for backward (dropout, ReLU / ReLU6), packed losslessly
    ALL = "all"  # every class above (a config name only)


class Policy(_Named):
    """How targeted classes are stored (see ``RazorConfig.policy``)."""

    ACCURATE = "accurate"  # the softmax top-k, the rest quantized, the GELU as its derivative
    BACKRAZOR = "backrazor"  # Back Razor's rule: every class top-k


class Granularity(_Named):
    """Which elements form one top-k group."""

    BLOCK = "block"  # ``block_size`` consecutive elements of the flattened activation
    SAMPLE = "sample"  # one index of dim 0 of the activation as its layer receives it


class Storage(_Named):
    """How a policy stores a targeted class (``RazorConfig.encoding_of``)."""

    TOPK = "topk"  # the k largest magnitudes per group (Encoding.TOPK_MASK / TOPK_OFFSETS)
    QUANT = "quant"  # uniform levels per group (Encoding.GROUP / GROUP_CENTERED)


class Rounding(_Named):
    """How per-group codes round a value between two levels (``RazorConfig.quant_rounding``)."""

    NEAREST = "nearest"  # the nearest level, half to even
    STOCHASTIC = "stochastic"  # up with probability the fractional part: an unbiased code


class Codebook(_Named):
    """The levels of the per-group codes (``RazorConfig.quant_codebook``)."""

    UNIFORM = "uniform"  # 2**bits levels evenly from the group's min to its max (Encoding.GROUP)
    NORMAL = "normal"  # a unit Gaussian's Lloyd-Max levels at the group's mean and deviation (GROUP_NORMAL)


class TopkLayout(_Named):
    """How a top-k copy records which elements it kept."""

    AUTO = "auto"  # per tensor, whichever takes fewer bytes
    MASK = "mask"  # one bit per element
    OFFSETS = "offsets"  # the kept positions inside the group


class Compiler(_Named):
    """The inner compiler the razor backend hands the partitioned graphs to."""

    INDUCTOR = "inductor"
    EAGER = "eager"


class CodecForm(_Named):
    """Which form of a codec runs under Inductor (``RazorConfig.codec_form``)."""

    AUTO = "auto"  # per codec and device: the registry's measured choice (``Codec.generated_on``)
    KERNEL = "kernel"  # the op and its native / Triton kernel, opaque to the compiler
    GENERATED = "generated"  # the plain-op form wherever a codec has one: fused by the compiler


class GeluEncoding(_Named):
    """What the "gelu" class saves."""

    TOPK = "topk"  # the GELU input, top-k sparsified
    DERIV2 = "deriv2"  # gelu'(x) on 2 / 3 / 4-bit uniform levels
    DERIV3 = "deriv3"
    DERIV4 = "deriv4"

    @property
    def bits(self) -> int | None:
        return None if self is GeluEncoding.TOPK else int(self.value.removeprefix("deriv"))


class Encoding(_Named):
    """One codec of the family (``passes/codecs.py`` holds what each one is)."""

    TOPK_MASK = "topk_mask"  # the k largest |x| per group: packed mask + values
    TOPK_OFFSETS = "topk_offsets"  # the same selection: in-group offsets + values
    GROUP = "group"  # uniform levels on each group's own [min, max]
    GROUP_CENTERED = "group_centered"  # GROUP of x - mean (a BatchNorm input), one op
    GROUP_STOCHASTIC = "group_stochastic"  # GROUP, levels rounded stochastically (unbiased)
    GROUP_NORMAL = "group_normal"  # a unit Gaussian's levels per group, scaled; two outliers apart
    UNIFORM = "uniform"  # uniform levels on one fixed range (a GELU derivative)
    PACKED_MASK = "packed_mask"  # a boolean tensor, 8 elements per byte (lossless)


class SkipReason(_Named):
    """Why a pass left a tensor as it was (``Skip.reason``)."""

    UNSUPPORTED_DTYPE = "unsupported dtype, saved dense"
    NOT_CENTERED = "a BatchNorm backward that does not read its input as input - mean"
    RECOMPUTABLE = "recomputable from the inputs the caller holds"
    NO_SAMPLE_SIZE = "no static per-sample size"
    NOT_SMALLER = "compressed copy not smaller than the dense tensor"
    BUDGET_DENSE = "kept dense by memory_budget"
    RETRY_DENSE = "saved dense by the partitioner (retry)"
    NOT_ONE_FACTOR = "not one derivative factor"
    NOT_COMPUTED = "not a computed tensor"
    NO_GELU_FORMULA = "a GELU backward computing neither erf nor tanh"
    EXPOSED = "a forward output exposes it"
    DATA_DEPENDENT_SHAPE = "data-dependent shape"
    EMPTY = "empty"
    RECOMPUTABLE_FROM_INPUTS = "recomputable from graph inputs"


@dataclass(frozen=True)
class Skip:
    """A tensor a pass left alone: ``node`` (its name in the joint graph), ``reason``, and
    ``detail`` for the specifics (shapes, sizes, which layer). ``str()`` reads
    "node: detail: reason" as the log does."""

    node: str
    reason: SkipReason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.node}: {self.detail}: {self.reason}" if self.detail else f"{self.node}: {self.reason}"


E = TypeVar("E", bound=_Named)


def parse(kind: type[E], value, field: str) -> E:
    """``value`` (a member or its string) as a member of ``kind``; a ValueError naming
    ``field`` and the valid values otherwise."""
    try:
        return kind(value)
    except ValueError:
        valid = tuple(m.value for m in kind)
        raise ValueError(f"RazorConfig.{field} must be one of {valid}, got {value!r}") from None
