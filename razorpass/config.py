"""The one frozen, validated configuration object of razorpass.

Every public option of ``torch.compile(model, backend="razor", options=...)`` and of
``razorpass.compile`` is a field of :class:`RazorConfig`. Validation happens once, in
``__post_init__``, and every error names the field and its valid range, so a typo in
an ``options`` dict never compiles silently into something else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .passes.vocab import (Codebook, CodecForm, Compiler, GeluEncoding, Granularity, OpClass, Policy, Rounding, Storage,
                           TopkLayout, parse)

__all__ = ["RazorConfig", "TARGETS", "DEFAULT_TARGETS", "BACKRAZOR_TARGETS", "VALUE_DTYPES", "GRANULARITIES",
           "COMPILERS", "CODEC_FORMS", "GELU_ENCODINGS", "TOPK_LAYOUTS", "GELU_DERIVATIVE_RANGE", "POLICIES", "QUANT_BITS", "TOPK_CLASSES",
           "OpClass", "Policy", "Granularity", "TopkLayout", "Compiler", "CodecForm", "GeluEncoding", "Storage"]

# The names a config's fields take are the members of the enums in
# ``razorpass.passes.vocab`` (strings are accepted and converted); the tuples below list
# their values.
TARGETS: tuple[str, ...] = tuple(c.value for c in OpClass)
# Back Razor's coverage of a ViT: every Linear input, both operands of Q·Kᵀ, the softmax
# output and V of P·V, the LayerNorm inputs; convolution inputs for CNNs. Plus the
# boolean masks, packed losslessly (free in accuracy). The "backrazor" policy's targets.
BACKRAZOR_TARGETS: tuple[OpClass, ...] = (OpClass.LINEAR, OpClass.CONV, OpClass.MATMUL, OpClass.SOFTMAX,
                                          OpClass.LAYERNORM, OpClass.SDPA, OpClass.MASK)
# The "accurate" policy (the default) covers the GELU too (its derivative, at 3 bits)
# and the BatchNorm input.
DEFAULT_TARGETS: tuple[OpClass, ...] = (OpClass.LINEAR, OpClass.CONV, OpClass.MATMUL, OpClass.SOFTMAX,
                                        OpClass.LAYERNORM, OpClass.GELU, OpClass.BATCHNORM, OpClass.SDPA, OpClass.MASK)
# How a targeted class is stored (``Policy``):
#   "backrazor": every class top-k sparsified (Back Razor's rule; the GELU input, when
#                targeted, too): keep ceil((1 - sparsity) * group) values per group.
#   "accurate":  the softmax output top-k sparsified as above (probabilities are sparse);
#                linear / conv / matmul / layernorm / batchnorm tensors quantized per group
#                of ``quant_group_size`` to ``quant_bits`` bits on the group's own range;
#                the GELU as its 3-bit derivative (``gelu_encoding`` "deriv3"). A Linear
#                / conv input computed pointwise from a LayerNorm / BatchNorm output
#                (x̂ · γ + β, then a ReLU / ReLU6 or a cast) stores no code of its own:
#                its weight gradient reads that computation on the decoded x̂.
POLICIES: tuple[str, ...] = tuple(p.value for p in Policy)
TOPK_CLASSES: frozenset[OpClass] = frozenset({OpClass.SOFTMAX})  # top-k under "accurate"
QUANT_BITS: tuple[int, ...] = (2, 3, 4, 8)
VALUE_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32", "same")
GRANULARITIES: tuple[str, ...] = tuple(g.value for g in Granularity)
# How a top-k copy records which elements it kept: "mask" (1 bit per element), "offsets"
# (the kept positions in the group, 2 bytes each, 4 for groups of 2**15 and more), or
# "auto": per tensor, whichever is smaller (offsets above sparsity 15/16). Lossless:
# the decoded tensor is the same either way.
TOPK_LAYOUTS: tuple[str, ...] = tuple(t.value for t in TopkLayout)
COMPILERS: tuple[str, ...] = tuple(c.value for c in Compiler)
CODEC_FORMS: tuple[str, ...] = tuple(f.value for f in CodecForm)
# How the "gelu" target stores what the GELU backward reads:
#   topk:   the GELU input x, top-k sparsified like every other class;
#   derivN: the derivative gelu'(x) (all the backward needs: grad_in = grad * gelu'(x)),
#           quantized to N bits on GELU_DERIVATIVE_RANGE (the encode_derivative pass).
GELU_ENCODINGS: tuple[str, ...] = tuple(g.value for g in GeluEncoding)
# The codebook range of the derivN encodings: see razorpass.kernels.quantize.
from .kernels.quantize import GELU_DERIVATIVE_RANGE, NORMAL_BITS  # noqa: E402

# Options that torch.compile itself passes through to a backend and that are not ours.
_PASSTHROUGH = frozenset({"mode"})


def _as_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"RazorConfig.{name} must be a sequence of glob strings, got {value!r}")
    return tuple(value)


def _as_indices(name: str, value: Any, none_ok: bool = False) -> tuple[int, ...] | None:
    if value is None and none_ok:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"RazorConfig.{name} must be a sequence of block indices (ints), got {value!r}")
    return tuple(value)


def _as_targets(targets: Any) -> tuple[OpClass, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, Sequence):
        raise ValueError(f"RazorConfig.targets must be a sequence of names from {TARGETS}, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"RazorConfig.targets: unknown name(s) {unknown}; valid names are {TARGETS}")
    classes = [OpClass(t) for t in targets]
    if OpClass.ALL in classes:
        classes = [c for c in OpClass if c is not OpClass.ALL]
    if OpClass.SDPA in classes:
        classes = [*classes, OpClass.MATMUL, OpClass.SOFTMAX]
    return tuple(dict.fromkeys(classes))


@dataclass(frozen=True)
class RazorConfig:
    """What razorpass compresses and how.

    Only the copy of an activation that autograd keeps *for a weight gradient* is
    sparsified; the forward pass and every input gradient stay exact.
    """

    # Fraction of each group dropped from the saved copy, in [0, 1).
    sparsity: float = 0.9
    # "block": groups of ``block_size`` consecutive elements of the flattened,
    # contiguous activation (the last block is padded; padding is never kept).
    # "sample": one group per index of dim 0 of the activation as the layer
    # receives it (Back Razor's own rule).
    granularity: Granularity = Granularity.BLOCK
    # Group size of the "block" granularity; a positive multiple of 8 so that every
    # group owns whole bytes of the packed mask.
    block_size: int = 1024
    # dtype of the kept values: "bfloat16", "float16", "float32" or "same" (the
    # activation's own dtype). Decompressed values are rounded through it.
    value_dtype: str = "bfloat16"
    # Which elements a top-k copy kept, as a packed mask or as offsets (``TOPK_LAYOUTS``);
    # "auto" takes the smaller per tensor. Changes bytes, never values.
    topk_layout: TopkLayout = TopkLayout.AUTO
    # Which saved activations to compress (names from ``TARGETS``); None: the policy's
    # (``DEFAULT_TARGETS`` for "accurate", ``BACKRAZOR_TARGETS`` for "backrazor").
    # ``target_classes`` is the resolved tuple.
    targets: tuple[OpClass, ...] | None = None
    # Glob patterns over module paths ("encoder.layer.*.attention.*"). A layer is
    # compressed when it matches some ``include`` pattern and no ``exclude`` pattern.
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    # Inner compiler: "inductor" (default) or "eager" (AOTAutograd, no codegen).
    compiler: Compiler = Compiler.INDUCTOR
    # Under Inductor, which form of each codec runs (``CODEC_FORMS``): "kernel" keeps the
    # encode and decode ops (their native / Triton kernels); "generated" gives Inductor
    # their plain-op form, which it writes into the kernels that produce and read the
    # activation; "auto" takes, per codec and device, the form the registry names
    # (``passes/codecs.py``). The codes are the same bit for bit on CPU; gradients then
    # agree to float rounding (Inductor may sum around a fused decode in another order).
    codec_form: CodecForm = CodecForm.AUTO
    # What the "gelu" target saves (names from ``GELU_ENCODINGS``): "topk" sparsifies
    # the GELU input; "deriv2" / "deriv3" / "deriv4" save gelu'(x) quantized to 2 / 3 / 4
    # bits instead (the GELU input is then not saved for the GELU backward at all).
    # None: the policy's ("deriv3" for "accurate", "topk" for "backrazor").
    gelu_encoding: GeluEncoding | None = None
    # How targeted tensors are stored (names from ``POLICIES``, see there). "backrazor"
    # is Back Razor's rule exactly (the behaviour of razorpass before the policy existed).
    policy: Policy = Policy.ACCURATE
    # Bits per element and group size of the "accurate" policy's quantized classes.
    quant_bits: int = 3
    quant_group_size: int = 256
    # How those codes round a value between two levels: "nearest" (half to even) or
    # "stochastic": up with probability the fractional part, so the decoded tensor and
    # the gradients computed linearly from it are unbiased; one seed per step from
    # PyTorch's generator, so ``torch.manual_seed`` reproduces it. A LayerNorm /
    # BatchNorm x̂ stays rounded to nearest (its backward is not linear in x̂;
    # ``passes/stochastic_round.py``).
    quant_rounding: Rounding = Rounding.NEAREST
    # Their levels: "uniform" (2**bits levels from each group's min to its max, bf16
    # bounds) or "normal": LayerNorm x̂ and Linear / conv inputs on a unit Gaussian's
    # Lloyd-Max levels at each group's mean and deviation, the group's two elements
    # farthest from the mean kept apart in bf16 (2-4 bits; ``kernels/quantize.py``), the
    # other classes uniform.
    quant_codebook: Codebook = Codebook.UNIFORM
    # Group size of the batchnorm class: it stores x - mean, not divided by the channel's
    # deviation, and where a channel's map is smaller than a group, one group spans
    # channels of different scales (bench/README.md, "Gradient fidelity", measures the
    # difference). A positive multiple of 8.
    batchnorm_group_size: int = 64
    # Fraction of the dense saved-for-backward bytes each compiled graph may keep, in
    # (0, 1]; None: no budget (every quantized class at ``quant_bits``). With a budget,
    # each quantized tensor gets its own bits (2, 3, 4, 8) or stays dense, chosen for
    # the least gradient error by a static proxy (``passes/memory_budget.py``); needs
    # the "accurate" policy. The choices are in ``record_compiles()`` (``.budget``).
    memory_budget: float | None = None

    # ---- BSR (block selective reprogramming) ----
    # Indices of the blocks to train (negative indices count from the end); the final
    # norm and head after the last block train too, everything else gets no gradient.
    # None trains every parameter that requires grad.
    trainable_blocks: tuple[int, ...] | None = None
    # Indices of the token-selection blocks; after each, only ceil(keep_rate * (N - 1))
    # most CLS-attended tokens are kept (razorpass.compile only: shapes change).
    drop_layers: tuple[int, ...] = ()
    # Fraction of the non-CLS tokens kept at each selection block, in (0, 1].
    keep_rate: float = 0.5
    # Fuse the dropped tokens into one extra token weighted by their CLS attention.
    fuse_token: bool = True
    # Module-path glob of the repeated block list (e.g. "encoder.layer.*"); None finds
    # the block sequence automatically.
    blocks: str | None = None

    # ---- debugging ----
    # Raise when a pass cannot apply instead of compiling that graph without
    # compression (the environment variable RAZORPASS_STRICT=1 does the same; the
    # test suite sets it).
    strict: bool = False

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s < 1.0:
            raise ValueError(f"RazorConfig.sparsity must be a float in [0, 1), got {s!r}")
        object.__setattr__(self, "sparsity", float(s))
        object.__setattr__(self, "granularity", parse(Granularity, self.granularity, "granularity"))
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b % 8:
            raise ValueError(f"RazorConfig.block_size must be a positive multiple of 8, got {b!r}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(
                f"RazorConfig.value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}"
            )
        object.__setattr__(self, "topk_layout", parse(TopkLayout, self.topk_layout, "topk_layout"))
        object.__setattr__(self, "policy", parse(Policy, self.policy, "policy"))
        q = self.quant_bits
        if isinstance(q, bool) or q not in QUANT_BITS:
            raise ValueError(f"RazorConfig.quant_bits must be one of {QUANT_BITS}, got {q!r}")
        g = self.quant_group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 8:
            raise ValueError(f"RazorConfig.quant_group_size must be a positive multiple of 8, got {g!r}")
        object.__setattr__(self, "quant_rounding", parse(Rounding, self.quant_rounding, "quant_rounding"))
        object.__setattr__(self, "quant_codebook", parse(Codebook, self.quant_codebook, "quant_codebook"))
        if self.quant_codebook is Codebook.NORMAL:
            if self.quant_bits not in NORMAL_BITS:
                raise ValueError(f"RazorConfig.quant_codebook='normal' has levels for quant_bits {NORMAL_BITS}, "
                                 f"got {self.quant_bits}")
            if self.quant_rounding is Rounding.STOCHASTIC:
                raise ValueError("RazorConfig.quant_rounding='stochastic' rounds between uniform levels; "
                                 "quant_codebook='normal' rounds to the nearest level")
            if self.memory_budget is not None:
                raise ValueError("RazorConfig.memory_budget chooses among uniform codes; quant_codebook='normal' "
                                 "takes none")
        if self.quant_rounding is Rounding.STOCHASTIC and self.policy is not Policy.ACCURATE:
            raise ValueError(f"RazorConfig.quant_rounding='stochastic' rounds quantized codes and needs "
                             f"policy='accurate'; policy={self.policy!r} quantizes nothing")
        m = self.memory_budget
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or not 0.0 < m <= 1.0:
                raise ValueError(f"RazorConfig.memory_budget must be a fraction in (0, 1] or None, got {m!r}")
            if self.policy is not Policy.ACCURATE:
                raise ValueError(f"RazorConfig.memory_budget needs policy='accurate' (it chooses bits per quantized "
                                 f"tensor); policy={self.policy!r} quantizes nothing")
            object.__setattr__(self, "memory_budget", float(m))
        g = self.batchnorm_group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 8:
            raise ValueError(f"RazorConfig.batchnorm_group_size must be a positive multiple of 8, got {g!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", _as_targets(self.targets))
        object.__setattr__(self, "include", _as_patterns("include", self.include))
        object.__setattr__(self, "exclude", _as_patterns("exclude", self.exclude))
        object.__setattr__(self, "compiler", parse(Compiler, self.compiler, "compiler"))
        object.__setattr__(self, "codec_form", parse(CodecForm, self.codec_form, "codec_form"))
        if self.gelu_encoding is not None:
            object.__setattr__(self, "gelu_encoding", parse(GeluEncoding, self.gelu_encoding, "gelu_encoding"))
        object.__setattr__(self, "trainable_blocks", _as_indices("trainable_blocks", self.trainable_blocks, none_ok=True))
        object.__setattr__(self, "drop_layers", _as_indices("drop_layers", self.drop_layers))
        r = self.keep_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ValueError(f"RazorConfig.keep_rate must be a float in (0, 1], got {r!r}")
        object.__setattr__(self, "keep_rate", float(r))
        if not isinstance(self.fuse_token, bool):
            raise ValueError(f"RazorConfig.fuse_token must be True or False, got {self.fuse_token!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"RazorConfig.strict must be True or False, got {self.strict!r}")
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise ValueError(f"RazorConfig.blocks must be a module-path glob string or None, got {self.blocks!r}")

    # ---------------------------------------------------------------- derived
    @property
    def sparsity_fraction(self) -> Fraction:
        """The sparsity as an exact fraction, so k is integer arithmetic (SymInt-safe)."""
        return Fraction(self.sparsity).limit_denominator(1_000_000)

    @property
    def target_classes(self) -> tuple[OpClass, ...]:
        """The classes compressed: ``targets``, or the policy's default when it is None."""
        if self.targets is not None:
            return self.targets
        return _as_targets(DEFAULT_TARGETS if self.policy is Policy.ACCURATE else BACKRAZOR_TARGETS)

    @property
    def gelu_mode(self) -> GeluEncoding:
        """What the "gelu" class saves: ``gelu_encoding``, or the policy's default."""
        if self.gelu_encoding is not None:
            return self.gelu_encoding
        return GeluEncoding.DERIV3 if self.policy is Policy.ACCURATE else GeluEncoding.TOPK

    @property
    def gelu_derivative_bits(self) -> int | None:
        """Bits per element of the saved GELU derivative, or None ("topk": the input is
        top-k sparsified instead)."""
        return self.gelu_mode.bits

    def encoding_of(self, op_class: OpClass | str) -> Storage:
        """How a tensor of ``op_class`` is stored: ``Storage.TOPK`` (``razor::compress``) or
        ``Storage.QUANT`` (``razor::quantize_group`` at ``quant_bits``). The GELU follows
        ``gelu_mode``."""
        if self.policy is Policy.BACKRAZOR or op_class in TOPK_CLASSES or op_class == OpClass.GELU:
            return Storage.TOPK
        return Storage.QUANT

    def quant_group(self, op_classes) -> int:
        """Group size of a quantized tensor read by ``op_classes`` (a class or classes):
        ``batchnorm_group_size`` when the batchnorm class reads it, else
        ``quant_group_size``."""
        classes = (op_classes,) if isinstance(op_classes, str) else tuple(op_classes)
        return self.batchnorm_group_size if OpClass.BATCHNORM in classes else self.quant_group_size

    def topk_offsets(self, group_size: int, k: int) -> bool:
        """True when a top-k copy with ``k`` of every ``group_size`` elements records its
        kept elements as offsets (``topk_layout``; "auto": when they take fewer bytes per
        group than the mask). Integers only (the group size is static)."""
        if self.topk_layout is not TopkLayout.AUTO:
            return self.topk_layout is TopkLayout.OFFSETS
        return self._offsets_bytes(group_size, k) < -(-group_size // 8)

    def topk_index_bytes(self, group_size: int, k: int) -> int:
        """Bytes per group of what records a top-k copy's kept elements: the packed mask,
        or the offsets where ``topk_offsets`` picks them."""
        return self._offsets_bytes(group_size, k) if self.topk_offsets(group_size, k) else -(-group_size // 8)

    @staticmethod
    def _offsets_bytes(group_size: int, k: int) -> int:
        from .kernels.topk_compress import offsets_dtype

        return k * offsets_dtype(group_size).itemsize

    def keep_count(self, group_size):
        """k = ceil((1 - sparsity) * group_size), computed as group - floor(s * group).

        Works on ints and SymInts alike (no float math on sizes).
        """
        f = self.sparsity_fraction
        return group_size - (group_size * f.numerator) // f.denominator

    # ---------------------------------------------------------------- building
    @classmethod
    def from_options(cls, options: RazorConfig | Mapping[str, Any] | None = None, **overrides: Any) -> RazorConfig:
        """Build a config from ``None``, a dict (``torch.compile(options=...)``) or a config."""
        if options is None:
            options = {}
        if isinstance(options, RazorConfig):
            return dataclasses.replace(options, **overrides) if overrides else options
        if not isinstance(options, Mapping):
            raise TypeError(f"razor options must be a dict or a RazorConfig, got {type(options).__name__}")
        merged = {k: v for k, v in {**options, **overrides}.items() if k not in _PASSTHROUGH}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise ValueError(f"unknown razor option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**merged)
