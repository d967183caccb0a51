"""The accurate policy's per-group quantization (``razor::quantize_group`` /
``razor::dequantize_group``): the native CPU kernel bit-identical to the PyTorch
kernel, both bit-identical to the reference's own implementation
(``razorpass.reference.quantize_group``) and to an independent numpy packing; the
error bound, the bounds' rounding, non-finite groups, shapes and bad arguments."""

import math

import numpy as np
import pytest
import torch

from razorpass import reference
from razorpass.kernels import ops, quantize, quantize_cpu

BITS = [2, 3, 4, 8]
SHAPES = [(0,), (1,), (7,), (8,), (128,), (129,), (3, 5, 7), (2, 0, 3), (4, 1, 13, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["portable", "wide"])
def simd(request):
    """Run a native-kernel test on the portable code and on the AVX-512 / BMI2 path."""
    if request.param == "wide" and not quantize_cpu.wide_available():
        pytest.skip("this CPU has no AVX-512 / BMI2 path")
    with quantize_cpu.simd_cap(0 if request.param == "portable" else 1):
        yield request.param


def _sample(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + 0.3 * scale).to(dtype)


def _np_levels(x: torch.Tensor, bounds: torch.Tensor, group: int, bits: int) -> np.ndarray:
    """Independent unpacking check: the level of every element recovered from the
    reference's decoded value (value = q * step + lo with a small integer q, so
    q = rint((value - lo) / step)), 0 where the step is 0 and for the padding."""
    # decoded in float32 (x.float() holds the same values, so the same bounds and levels)
    dec = reference.quantize_group(x.float(), group, bits).reshape(-1).numpy().astype(np.float64)
    b = bounds.view(-1, 2).to(torch.float32).numpy().astype(np.float64)
    lo = np.repeat(b[:, 0], group)[: dec.size]
    step = np.repeat((b[:, 1] - b[:, 0]) / (2**bits - 1), group)[: dec.size]
    levels = np.zeros(len(b) * group, dtype=np.int64)
    levels[: dec.size] = np.where(step > 0, np.rint((dec - lo) / np.where(step > 0, step, 1)), 0)
    return levels


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_torch_and_reference_bit_identical(shape, bits, dtype, simd):
    assert quantize_cpu.load() is not None, "the native CPU kernel did not build"
    group = 8 if bits == 8 else 16
    x = _sample(shape, dtype, seed=bits + sum(shape))
    codes, bounds = ops.quantize_group(x, group, bits)
    n = x.numel()
    groups = -(-n // group)
    assert codes.dtype == torch.uint8 and codes.shape == (groups * group * bits // 8,)
    assert bounds.dtype == torch.bfloat16 and bounds.shape == (2 * groups,)  # lo, hi of each group
    t_codes, t_bounds = quantize.torch_quantize_group(x, group, bits)
    assert torch.equal(codes, t_codes) and torch.equal(bounds, t_bounds)
    for out_dtype in DTYPES:
        out = ops.dequantize_group(codes, bounds, list(shape), group, bits, out_dtype)
        assert out.shape == x.shape and out.dtype == out_dtype and out.is_contiguous()
        assert torch.equal(out, quantize.torch_dequantize_group(codes, bounds, list(shape), group, bits, out_dtype))
    ref = reference.quantize_group(x, group, bits)
    assert torch.equal(ops.dequantize_group(codes, bounds, list(shape), group, bits, dtype), ref)
    if n:
        # element i's level in stream bits [bits*i, bits*i + bits), little-endian (numpy)
        got = np.unpackbits(codes.numpy(), bitorder="little").reshape(-1, bits) @ (1 << np.arange(bits))
        np.testing.assert_array_equal(got, _np_levels(x, bounds, group, bits))


@pytest.mark.parametrize("bits", BITS)
def test_error_bound_and_outward_bounds(bits):
    x = _sample((64, 96), torch.float32, 5, scale=3.0)
    codes, bounds = ops.quantize_group(x, 128, bits)
    rows = x.reshape(-1, 128)
    lo, hi = bounds.float().view(-1, 2).unbind(1)
    assert (lo <= rows.amin(1)).all() and (hi >= rows.amax(1)).all()  # every element inside [lo, hi]
    # within one bfloat16 step of the true min / max
    ulp = lambda v: (v.abs() * 2**-7).clamp_min(1e-38)  # noqa: E731
    assert (rows.amin(1) - lo <= ulp(lo)).all() and (hi - rows.amax(1) <= ulp(hi)).all()
    step = ((hi - lo) / (2**bits - 1)).unsqueeze(1)
    out = ops.dequantize_group(codes, bounds, [64, 96], 128, bits, torch.float32).reshape(-1, 128)
    assert ((out - rows).abs() <= step / 2 * (1 + 1e-5)).all()
    # more bits, less error
    if bits < 8:
        more = BITS[BITS.index(bits) + 1]
        finer = ops.dequantize_group(*ops.quantize_group(x, 128, more), [64, 96], 128, more, torch.float32)
        assert (finer - x).norm() < (out.reshape(x.shape) - x).norm()


def test_non_finite_group_decodes_to_nan_only_there():
    x = torch.randn(4, 128)
    x[1, 5], x[2, 7], x[3, 9] = math.nan, math.inf, -math.inf
    out = ops.dequantize_group(*ops.quantize_group(x, 128, 4), [4, 128], 128, 4, torch.float32)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()
    assert torch.equal(out.isnan(), reference.quantize_group(x, 128, 4).isnan())


def test_constant_group_and_zeros_are_exact():
    x = torch.cat([torch.zeros(128), torch.full((128,), 0.5), torch.full((128,), -2.0)])
    out = ops.dequantize_group(*ops.quantize_group(x, 128, 2), [384], 128, 2, torch.float32)
    assert torch.equal(out, x)  # bfloat16-representable constants: step 0, code 0, value lo


def test_padding_is_not_an_element():
    # the last group holds one element: its range is that element alone, not the padding
    x = torch.cat([torch.randn(128), torch.tensor([5.0])])
    codes, bounds = ops.quantize_group(x, 128, 4)
    assert bounds[2:].float().tolist() == [5.0, 5.0]
    assert codes[64:].tolist() == [0] * 64  # padding codes are 0


def test_non_contiguous_input_uses_logical_order():
    x = _sample((24, 40), torch.float32, 2).t()
    for a, b in zip(ops.quantize_group(x, 64, 3), ops.quantize_group(x.contiguous(), 64, 3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [3, 4])
def test_chunked_torch_kernel_equals_one_chunk(monkeypatch, bits):
    x = _sample((5000,), torch.float32, 9)
    whole = quantize.torch_quantize_group(x, 64, bits)
    monkeypatch.setattr(quantize, "_CHUNK_ELEMS", 200)  # 3 groups a chunk, a partial last chunk
    parts = quantize.torch_quantize_group(x, 64, bits)
    assert all(torch.equal(a, b) for a, b in zip(whole, parts))
    out = quantize.torch_dequantize_group(*parts, [5000], 64, bits, torch.float32)
    monkeypatch.undo()
    assert torch.equal(out, quantize.torch_dequantize_group(*whole, [5000], 64, bits, torch.float32))


def test_ops_reject_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        ops.quantize_group(torch.zeros(16), 8, 5)
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.quantize_group(torch.zeros(16), 12, 4)
    codes, bounds = ops.quantize_group(torch.zeros(16), 8, 4)
    with pytest.raises(ValueError, match=r"expects 8 uint8 code bytes and 4 bfloat16 bounds"):
        ops.dequantize_group(codes[:7], bounds, [16], 8, 4, torch.float32)
    with pytest.raises(ValueError, match="bfloat16 bounds"):
        ops.dequantize_group(codes, bounds.float(), [16], 8, 4, torch.float32)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("shape", [(0,), (9,), (3, 5, 7)], ids=str)
def test_opcheck(shape, bits):
    x = _sample(shape, torch.float32, 3)
    torch.library.opcheck(torch.ops.razor.quantize_group.default, (x, 8, bits))
    codes, bounds = ops.quantize_group(x, 8, bits)
    torch.library.opcheck(torch.ops.razor.dequantize_group.default, (codes, bounds, list(shape), 8, bits,
                                                                     torch.bfloat16))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 9, 4095, 4097, 10001])
def test_native_uniform_kernel_bit_identical(n, bits, simd):
    """The native kernel of ``razor::quantize_uniform`` / ``dequantize_uniform`` (the
    GELU derivative codes) against the PyTorch kernel, across its 4096-element chunks
    and partial last bytes, with NaN and infinities."""
    assert quantize_cpu.load() is not None
    lo, hi = quantize.GELU_DERIVATIVE_RANGE["none"]
    for dtype in DTYPES:
        x = (_sample((n,), torch.float32, n + bits) * 0.6 + 0.3).to(dtype)
        if n > 8:
            x[3], x[5], x[7] = math.nan, math.inf, -math.inf
        codes = quantize_cpu.cpu_quantize_uniform(x, bits, lo, hi)
        assert torch.equal(codes, quantize.torch_quantize_uniform(x, bits, lo, hi))
        for out_dtype in DTYPES:
            assert torch.equal(quantize_cpu.cpu_dequantize_uniform(codes, [n], bits, lo, hi, out_dtype),
                               quantize.torch_dequantize_uniform(codes, [n], bits, lo, hi, out_dtype))


@pytest.mark.parametrize("group", [8, 24, 64, 136, 256])
@pytest.mark.parametrize("bits", BITS)
def test_native_float32_vector_path_on_edge_values(group, bits, simd):
    """The native float32 kernel (four lanes at a time, a scalar tail) against the
    PyTorch kernel, bit for bit, on the values where a vector min / max / round could
    part from the scalar rule: ties between two levels (half to even), signed zeros,
    subnormals, NaN and infinities, constant groups, and a last group cut short at
    every offset of the 4- and 16-element blocks."""
    assert quantize_cpu.load() is not None
    top = 2**bits - 1
    ties = torch.arange(group, dtype=torch.float32) % top + 0.5  # (x - 0) / 1 = k + 0.5
    ties[0], ties[1] = 0.0, float(top)  # bounds 0 and top: step exactly 1
    zeros = torch.tensor([0.0, -0.0] * (group // 2))
    zeros[group // 2] = 1.0
    signed = torch.tensor([-0.0, 0.0] * (group // 2)) + torch.arange(group) % 3
    tiny = torch.full((group,), 1e-40) * torch.arange(group)
    special = _sample((group,), torch.float32, 5)
    special[group // 3], special[group // 2] = math.inf, -math.inf
    nan = _sample((group,), torch.float32, 6)
    nan[group - 1] = math.nan
    constant = torch.full((group,), 0.75)
    body = torch.cat([ties, zeros, signed, tiny, special, nan, constant, _sample((group,), torch.float32, 7, 1e4)])
    for cut in range(0, group, 1 if group <= 24 else 5):
        x = torch.cat([body, _sample((cut,), torch.float32, cut)])
        codes, bounds = quantize_cpu.cpu_quantize_group(x, group, bits)
        t_codes, t_bounds = quantize.torch_quantize_group(x, group, bits)
        assert torch.equal(codes, t_codes), cut
        # the bit patterns (the sign of a zero too); a NaN bound is a NaN, whatever its payload
        nan = bounds.isnan()
        assert torch.equal(nan, t_bounds.isnan()) and nan.any(), cut
        assert torch.equal(bounds.view(torch.int16)[~nan], t_bounds.view(torch.int16)[~nan]), cut
        torch.testing.assert_close(
            quantize_cpu.cpu_dequantize_group(codes, bounds, [x.numel()], group, bits, torch.float32),
            quantize.torch_dequantize_group(codes, bounds, [x.numel()], group, bits, torch.float32),
            rtol=0, atol=0, equal_nan=True)
