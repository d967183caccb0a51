"""gelu_encoding="derivN": the GELU backward reads gelu'(x) quantized to N bits
(``razor::quantize_uniform`` / ``razor::dequantize_uniform``, the encode_derivative
pass) instead of a top-k copy of the GELU input. The ops are bit-exact against an
independent packing of the reference's levels; compiled gradients equal the eager
reference; the codes take ceil(numel * bits / 8) bytes and the GELU input is no
longer saved."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import razorpass
from razorpass import RazorConfig, reference
from razorpass.config import GELU_DERIVATIVE_RANGE
from razorpass.kernels import ops, quantize
from razorpass.passes.records import QuantizedDerivative

from .models import loss_of, tiny_bert

BITS = [2, 3, 4, 8]
SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 0, 3), (4, 1, 13, 3)]
LO, HI = GELU_DERIVATIVE_RANGE["none"]

# ---------------------------------------------------------------- the ops


def _sample(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 1.6 - 0.3  # beyond [lo, hi] on both sides: clamping
    return x.to(dtype)


def _np_bitstream(levels: torch.Tensor, bits: int) -> np.ndarray:
    """Independent packing: element i's level in stream bits [bits*i, bits*i + bits),
    little-endian bit order within bytes (numpy packbits)."""
    q = levels.reshape(-1).numpy().astype(np.int64)
    stream = ((q[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ops_bit_exact_against_reference_levels(shape, bits, dtype):
    x = _sample(shape, dtype, seed=bits + len(shape) + sum(shape))
    codes = ops.quantize_uniform(x, bits, LO, HI)
    n = x.numel()
    assert codes.dtype == torch.uint8 and codes.shape == (math.ceil(n * bits / 8),)
    levels = reference.quantize_levels(x, bits, LO, HI)
    np.testing.assert_array_equal(codes.numpy(), _np_bitstream(levels, bits))
    out = ops.dequantize_uniform(codes, list(shape), bits, LO, HI, dtype)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, reference.dequantize_levels(levels, bits, LO, HI, dtype))
    # the op is its PyTorch reference function
    assert torch.equal(codes, quantize.torch_quantize_uniform(x, bits, LO, HI))
    if n:  # round trip: within half a step (clamped values go to the end levels)
        step = (HI - LO) / (2**bits - 1)
        err = (out.float() - x.float().clamp(LO, HI)).abs().max().item()
        assert err <= step / 2 * (1 + 1e-5) + (0.01 if dtype == torch.bfloat16 else 0)


_FUSED_CASES = ([(shape, bits, False) for bits in BITS for shape in [(1,), (7,), (8,), (9,), (3, 5, 7), (4, 1, 13, 3)]]
                + [(shape, bits, True) for bits in BITS for shape in [(9,), (2, 197, 48)]])


@pytest.mark.vectorized
@pytest.mark.parametrize("shape,bits,compiled", _FUSED_CASES, ids=str)
def test_fused_decode_is_bit_identical_to_the_op(shape, bits, compiled):
    """The plain-op decode inline_codecs hands to Inductor gives the op's values, bit
    for bit, as written and as Inductor compiles it into a multiply (the GELU
    backward)."""
    x = _sample(shape, torch.float32, seed=bits + sum(shape))
    g = _sample(shape, torch.float32, seed=bits + sum(shape) + 1)
    codes = ops.quantize_uniform(x, bits, LO, HI)
    want = g * ops.dequantize_uniform(codes, list(shape), bits, LO, HI, torch.float32)

    def fused(c, g):
        return g * ops.fused_dequantize_uniform(c, list(shape), bits, LO, HI, torch.float32)

    if compiled:
        torch._dynamo.reset()
        fused = torch.compile(fused, dynamic=False, fullgraph=True)
    got = fused(codes, g)
    assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_rounding_rule_half_to_even_clamped_nan_to_zero():
    # lo=0, hi=3, 2 bits: step 1, levels 0..3
    x = torch.tensor([0.5, 1.5, 2.5, 1.49, -1.0, 7.0, float("nan"), float("inf"), -float("inf")])
    codes = ops.quantize_uniform(x, 2, 0.0, 3.0)
    levels = [0, 2, 2, 1, 0, 3, 0, 3, 0]
    np.testing.assert_array_equal(codes.numpy(), _np_bitstream(torch.tensor(levels), 2))
    assert ops.dequantize_uniform(codes, [9], 2, 0.0, 3.0, torch.float32).tolist() == levels


def test_three_bit_layout_straddles_bytes():
    # eight 3-bit codes fill three bytes, low bits first: codes 0..7 -> 0b...111 110 ... 000
    codes = ops.quantize_uniform(torch.arange(8.0), 3, 0.0, 7.0)
    word = sum(c << (3 * i) for i, c in enumerate(range(8)))
    assert codes.tolist() == [word & 255, (word >> 8) & 255, word >> 16]
    # padding bits of the last byte are 0
    assert ops.quantize_uniform(torch.full((3,), 7.0), 3, 0.0, 7.0).tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", BITS)
def test_non_contiguous_input_uses_logical_order(bits):
    x = _sample((5, 6, 7), torch.float32, 11).transpose(0, 2)[:, ::2]
    assert not x.is_contiguous()
    assert torch.equal(ops.quantize_uniform(x, bits, LO, HI), ops.quantize_uniform(x.contiguous(), bits, LO, HI))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [37, 64, 1])
def test_chunked_kernel_equals_one_chunk(monkeypatch, bits, n):
    x = _sample((n,), torch.float32, n)
    whole = ops.quantize_uniform(x, bits, LO, HI)
    monkeypatch.setattr(quantize, "_CHUNK_ELEMS", 16)
    assert torch.equal(quantize.torch_quantize_uniform(x, bits, LO, HI), whole)
    assert torch.equal(quantize.torch_dequantize_uniform(whole, [n], bits, LO, HI, torch.float32),
                       ops.dequantize_uniform(whole, [n], bits, LO, HI, torch.float32))


def test_ops_reject_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        ops.quantize_uniform(torch.zeros(3), 5, LO, HI)
    with pytest.raises(ValueError, match="lo < hi"):
        ops.quantize_uniform(torch.zeros(3), 2, 1.0, 1.0)
    with pytest.raises(ValueError, match="expects 3 uint8 bytes"):
        ops.dequantize_uniform(torch.zeros(2, dtype=torch.uint8), [2, 4], 3, LO, HI, torch.float32)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("shape", [(0,), (9,), (3, 5, 7)], ids=str)
def test_opcheck(shape, bits):
    x = _sample(shape, torch.float32, 3)
    torch.library.opcheck(torch.ops.razor.quantize_uniform.default, (x, bits, LO, HI))
    codes = ops.quantize_uniform(x, bits, LO, HI)
    torch.library.opcheck(torch.ops.razor.dequantize_uniform.default,
                          (codes, list(shape), bits, LO, HI, torch.bfloat16))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_range_constants_cover_and_bound_gelu_derivative(approximate):
    lo, hi = GELU_DERIVATIVE_RANGE[approximate]
    assert lo == pytest.approx(1 - hi, abs=1e-12)  # gelu'(-x) = 1 - gelu'(x)
    x = torch.linspace(-8, 8, 1_600_001, dtype=torch.float64)
    d = torch.ops.aten.gelu_backward(torch.ones_like(x), x, approximate=approximate)
    assert lo <= d.min().item() < lo + 2e-6 and hi - 2e-6 < d.max().item() <= hi
    x32 = x.float()
    d32 = torch.ops.aten.gelu_backward(torch.ones_like(x32), x32, approximate=approximate)
    assert lo <= d32.min().item() and d32.max().item() <= hi


# ---------------------------------------------------------------- config


def test_config_gelu_encoding():
    assert RazorConfig().gelu_encoding is None and RazorConfig().gelu_derivative_bits == 3  # the accurate policy's
    assert RazorConfig(policy="backrazor").gelu_derivative_bits is None
    assert RazorConfig(gelu_encoding="topk").gelu_derivative_bits is None
    assert RazorConfig(gelu_encoding="deriv3").gelu_derivative_bits == 3
    with pytest.raises(ValueError, match="gelu_encoding must be one of"):
        RazorConfig(gelu_encoding="deriv5")


# ---------------------------------------------------------------- the pass


class GeluMLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, approximate="none", d_in=24, hidden=96, d_out=6):
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)
        self.head = nn.Linear(hidden, d_out)
        self.approximate = approximate

    def forward(self, x):
        return self.head(F.gelu(self.fc(x), approximate=self.approximate))


class TanhMathMLP(GeluMLP):
    """GPT-2's gelu_new: the tanh formula written out, no aten.gelu."""

    def forward(self, x):
        h = self.fc(x)
        return self.head(0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3)))))


def _mlp(approximate="none"):
    return GeluMLP(approximate), (torch.randn(4, 8, 24),)


def _bert():
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return tiny_bert(), (ids, mask)


BUILDERS = {"mlp": _mlp, "mlp_tanh": lambda: _mlp("tanh"), "bert": _bert}
# The input shape of each GELU of a model
GELUS = {"mlp": [(4, 8, 96)], "mlp_tanh": [(4, 8, 96)], "bert": [(2, 12, 64)] * 2}


def _grads(model, inputs, fn):
    model.zero_grad(set_to_none=True)
    loss_of(fn(*inputs)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled(name, **options):
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    model.train()
    cfg = RazorConfig(**{"value_dtype": "float32", "block_size": 64, **options})
    with razorpass.record_compiles() as records:
        got = _grads(model, inputs, razorpass.compile(model, cfg, fullgraph=True))
    (rec,) = records
    assert rec.fallback is None
    return model, inputs, cfg, got, rec


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("name", ["mlp", "mlp_tanh", "bert"])
def test_gradients_match_reference(name, compiler):
    model, inputs, cfg, got, rec = _compiled(name, targets=("gelu",), gelu_encoding="deriv3", compiler=compiler)
    dense = _grads(model, inputs, model)
    with reference.apply(model, cfg):
        ref = _grads(model, inputs, model)
    assert len(rec.quantized) == len(GELUS[name]) and rec.compressed == []
    # Inductor gets the decode as plain ops (inline_codecs), fused into the GELU backward
    assert rec.count("inline_codecs") == (len(GELUS[name]) if compiler == "inductor" else 0)
    # The levels are exact; what differs is fp32 rounding of the same products and
    # sums (decomposed vs fused kernels; inductor fuses further), relative to each
    # gradient's scale (floored: a key bias's gradient is zero up to rounding).
    rtol = 1e-5 if compiler == "eager" else 1e-4
    assert ref.keys() == got.keys()
    top = max(g.abs().max().item() for g in ref.values())
    for k in ref:
        scale = max(ref[k].abs().max().item(), 1e-3 * top)
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}/{k}: {m}")
    # the rule is active: the dense gradient is far from the reference
    gap = max(((dense[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
    assert gap > 100 * rtol, "the quantization had no visible effect"


def _saved_names(rec):
    return {e.name for e in rec.saved}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("targets", [("gelu",), ("linear", "gelu")], ids=["gelu", "linear+gelu"])
@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_saved_bytes_and_gelu_input_gone(name, targets, bits):
    *_, rec = _compiled(name, targets=targets, gelu_encoding=f"deriv{bits}", compiler="eager")
    shapes = GELUS[name]
    assert [r.shape for r in rec.quantized] == shapes
    saved = {e.name: e for e in rec.saved}
    for r in rec.quantized:
        assert isinstance(r, QuantizedDerivative) and (r.bits, r.lo, r.hi) == (bits, LO, HI)
        assert r.op_classes == ("gelu",) and r.source and r.source not in saved  # the GELU input is gone
        (out,) = r.outputs
        n = math.prod(r.shape)
        e = saved[out]  # the codes are saved: ceil(numel * bits / 8) bytes
        assert e.shape == (math.ceil(n * bits / 8),) and e.dtype == torch.uint8 and e.op_class == "gelu"
        assert e.dense_bytes == n * 4  # stands for the fp32 GELU input
        assert r.root not in saved
    assert rec.dense_kept == [] and rec.passes["encode_derivative"].skipped == [] and rec.excluded_roots == []
    dense = [e for e in rec.saved if e.op_class == "dense" and not e.input]
    big = [e.name for e in dense if math.prod(e.shape) == math.prod(shapes[0])]
    if "linear" in targets:
        # the GELU output (the next Linear's input) is compressed: nothing of the GELU's size stays dense
        assert big == []
    else:
        # the next Linear's weight gradient keeps one dense tensor of that size per GELU (its input)
        assert len(big) == len(shapes)


def test_topk_encoding_is_unchanged():
    *_, rec = _compiled("bert", targets=("gelu",), gelu_encoding="topk", compiler="eager")
    assert rec.quantized == [] and len(rec.compressed) == 2
    assert all(r.op_classes == ("gelu",) for r in rec.compressed)


def test_derivative_encoding_needs_the_gelu_target():
    *_, rec = _compiled("mlp", targets=("linear",), gelu_encoding="deriv3", compiler="eager")
    assert rec.quantized == [] and [r.op_classes for r in rec.compressed] == [("linear",)]


def test_gelu_written_as_tanh_math_is_left_alone():
    torch.manual_seed(0)
    model, x = TanhMathMLP(), torch.randn(4, 8, 24)
    with razorpass.record_compiles() as records:
        got = _grads(model, (x,), razorpass.compile(model, targets=("gelu",), gelu_encoding="deriv3",
                                                     compiler="eager", fullgraph=True))
    (rec,) = records
    assert rec.fallback is None and rec.quantized == [] and rec.passes["encode_derivative"].skipped == []
    dense = _grads(model, (x,), model)
    for k in dense:
        torch.testing.assert_close(got[k], dense[k])


def test_exclude_skips_a_layer():
    *_, rec = _compiled("bert", targets=("gelu",), gelu_encoding="deriv2", compiler="eager",
                        exclude=("encoder.layer.0.*",))
    assert [r.modules for r in rec.quantized] == [("encoder.layer.1.intermediate.intermediate_act_fn",)]


def test_dynamic_batch_compiles_once():
    torch.manual_seed(0)
    model = GeluMLP()
    cfg = RazorConfig(targets=("gelu",), gelu_encoding="deriv3", compiler="eager")
    compiled = razorpass.compile(model, cfg)
    with razorpass.record_compiles() as records:
        for batch in (2, 3, 5):
            x = torch.randn(batch, 7, 24)
            torch._dynamo.mark_dynamic(x, 0)
            got = _grads(model, (x,), compiled)
            with reference.apply(model, cfg):
                ref = _grads(model, (x,), model)
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert len(records) == 1 and records[0].fallback is None and len(records[0].quantized) == 1
