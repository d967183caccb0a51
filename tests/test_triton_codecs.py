"""The Triton kernels of the codec ops are bit-identical to the PyTorch kernels.

Every op runs with ``backend="triton"`` against ``backend="torch"`` on the same input.
Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported; ~0.5 ms per program, so the
tensors here are small). Codes and offsets compare with ``torch.equal``; bounds and
decoded values bit for bit through an integer view, so NaN payloads and the sign of a
zero count. The inputs hold the edge cases the native kernels are tested on: NaN and
+-inf, signed zeros, ties at half a step, subnormals, values beyond bfloat16's range,
constant groups, a partial last group and a partial last word of codes (3-bit codes
straddle bytes), every ``bits``, float32 / bfloat16 / float16, non-contiguous views.

The interpreter computes with numpy and so cannot show what the compiler does to the
arithmetic (approximate division, fused multiply-add, the GPU's NaN patterns). One
test compiles the kernels for sm_90 without a GPU and reads their PTX; the tests at
the end run on a GPU only, on larger random and edge-case data, against the PyTorch
kernel on the same device.
"""

import importlib
import math
import os
import subprocess
import sys

import torch

_ON_GPU = torch.cuda.is_available()
if not _ON_GPU:  # must precede the first @triton.jit of the kernel modules
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from razorpass.kernels import ops, quantize, quantize_cpu, topk_compress  # noqa: E402

tk = importlib.import_module("razorpass.kernels.topk_compress_triton")
qt = importlib.import_module("razorpass.kernels.quantize_triton")
if not _ON_GPU and not tk._interpreted():  # imported before the interpreter was on: rebuild for the CPU
    tk = importlib.reload(tk)
    qt = importlib.reload(qt)

# numpy warns on the NaN the edge cases divide on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

DEVICE = "cuda" if _ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = [2, 3, 4, 8]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_same(actual: torch.Tensor, expected: torch.Tensor, nan_payload: bool = True) -> None:
    """Same dtype, shape and bits (floats through an integer view); with
    ``nan_payload=False`` a NaN only has to meet a NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}")
    a, e = actual.reshape(-1), expected.reshape(-1)
    if a.is_floating_point():
        if not nan_payload:
            nan = e.isnan()
            assert torch.equal(a.isnan(), nan), "NaN positions differ"
            a, e = a[~nan], e[~nan]
        a, e = a.view(_INT_VIEW[a.dtype]), e.view(_INT_VIEW[e.dtype])
    diff = (a != e).nonzero().flatten()
    assert diff.numel() == 0, (f"{diff.numel()} of {a.numel()} differ, first at {diff[0].item()}: "
                               f"{hex(a[diff[0]].item())} vs {hex(e[diff[0]].item())}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def edge_groups(group: int, bits: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """One group per edge case (float32 values cast to ``dtype``), then a partial group
    of 13 elements (not a whole word of eight codes)."""
    g = _gen(seed)
    top = 2**bits - 1
    tiny = torch.finfo(dtype).tiny  # the smallest normal of the dtype

    def rand(scale=1.0, n=group):
        return torch.randn(n, generator=g) * scale

    def put(x, i, v):
        x = x.clone()
        x[i] = v
        return x

    ties = torch.arange(group, dtype=torch.float32) % top + 0.5  # (x - 0) / 1 = k + 0.5
    ties[0], ties[1] = 0.0, float(top)  # bounds 0 and top: the step is exactly 1
    odd = 2 * torch.randint(0, 64, (group,), generator=g) + 1
    halfway = (1.0 + odd * 2.0**-8) * torch.where(torch.rand(group, generator=g) < 0.5, 1.0, -1.0)
    groups = [
        rand(),
        put(rand(), group // 3, math.nan),  # a NaN: NaN bounds, NaN decoded
        put(rand(), group // 2, math.inf),
        put(rand(), group - 1, -math.inf),
        torch.tensor([0.0, -0.0] * (group // 2)),  # a constant zero group, both signs
        -torch.zeros(group),  # only -0: the bounds are +0
        put(rand().abs() + 1, [2, 5], torch.tensor([-0.0, 0.0])),  # the min is a zero
        ties,
        halfway,  # bf16 ties: the bounds round to even, then step outwards
        tiny * 2.0**-3 * (torch.arange(group) % 7 + 1) * torch.where(torch.arange(group) % 2 == 0, 1.0, -1.0),
        # beyond bfloat16's range: hi rounds to bfloat16's max, then steps out to inf; lo rounds to -inf
        put(rand(1e37), [3, 4], torch.tensor([3.395e38, -3.4e38])),
        put(rand(), [0, 1], torch.tensor([-3e38, 3e38])),  # an infinite step (float32)
        torch.full((group,), 0.75),  # constant: step 0
        rand(1e4),
        rand(1e-3) - 5.0,  # negative only
    ]
    return torch.cat([*groups, rand(n=13)]).to(dtype)


# ------------------------------------------------------------------ per group
@pytest.mark.parametrize("group", [24, 64])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_quantize_group_matches_torch(dtype, bits, group):
    x = edge_groups(group, bits, dtype, seed=bits + group).to(DEVICE)
    codes, bounds = ops.quantize_group(x, group, bits, "triton")
    t_codes, t_bounds = ops.quantize_group(x, group, bits, "torch")
    assert codes.dtype == torch.uint8 and torch.equal(codes, t_codes)
    assert_same(bounds, t_bounds)
    for out in DTYPES:
        assert_same(ops.dequantize_group(t_codes, t_bounds, [x.numel()], group, bits, out, "triton"),
                    ops.dequantize_group(t_codes, t_bounds, [x.numel()], group, bits, out, "torch"))


@pytest.mark.parametrize("group", [24, 64])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_quantize_group_stochastic_matches_torch(dtype, bits, group):
    x = edge_groups(group, bits, dtype, seed=bits + group).to(DEVICE)
    seed = torch.tensor(0x5EED_0000_1234 + bits, device=DEVICE)  # only the low 32 bits count
    codes, bounds = ops.quantize_group_stochastic(x, seed, group, bits, "triton")
    t_codes, t_bounds = ops.quantize_group_stochastic(x, seed, group, bits, "torch")
    assert torch.equal(codes, t_codes)
    assert_same(bounds, t_bounds)
    assert_same(bounds, ops.quantize_group(x, group, bits, "torch")[1])  # the bounds of nearest rounding
    # a non-contiguous input is read in its logical order
    y = x[: x.numel() // 8 * 8].view(8, -1).t()
    assert torch.equal(ops.quantize_group_stochastic(y, seed, group, bits, "triton")[0],
                       ops.quantize_group_stochastic(y.contiguous(), seed, group, bits, "torch")[0])


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_group_of_any_bits(bits):
    """Arbitrary codes under arbitrary bfloat16 bounds: NaN with payloads, infinities,
    subnormals, lo above hi."""
    group, groups = 16, 64
    g = _gen(bits)
    codes = torch.randint(0, 256, (groups * group * bits // 8,), dtype=torch.uint8, generator=g).to(DEVICE)
    patterns = torch.randint(-2**15, 2**15, (2 * groups,), dtype=torch.int32, generator=g)
    patterns[::5] = torch.randint(-2**7, 2**7, (len(patterns[::5]),), dtype=torch.int32, generator=g)  # near zero
    bounds = patterns.to(torch.int16).view(torch.bfloat16).to(DEVICE)
    n = groups * group - 5
    for out in DTYPES:
        assert_same(ops.dequantize_group(codes, bounds, [n], group, bits, out, "triton"),
                    ops.dequantize_group(codes, bounds, [n], group, bits, out, "torch"))


@pytest.mark.parametrize("group", [40, 64])
def test_groups_larger_than_a_block_loop_over_chunks(monkeypatch, group):
    """A group over MAX_BLOCK takes the chunked path (bounds pass, then codes pass);
    MAX_BLOCK is cut to 16 so that small groups span several chunks, the last partial."""
    monkeypatch.setattr(qt, "MAX_BLOCK", 16)
    for dtype, bits in [(torch.float32, 3), (torch.bfloat16, 8)]:
        x = edge_groups(group, bits, dtype, seed=group).to(DEVICE)
        codes, bounds = ops.quantize_group(x, group, bits, "triton")
        t_codes, t_bounds = ops.quantize_group(x, group, bits, "torch")
        assert torch.equal(codes, t_codes)
        assert_same(bounds, t_bounds)
        assert_same(ops.dequantize_group(codes, bounds, [x.numel()], group, bits, dtype, "triton"),
                    ops.dequantize_group(codes, bounds, [x.numel()], group, bits, dtype, "torch"))


# ------------------------------------------------------------------ normal codebook
def normal_edge_groups(group: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The edge groups above but one, then groups that decide the outliers: equal
    distances (both signs, ties to the lower offset), three equally far elements, a NaN
    and an infinity in one group, and a single far element. Left out: -3e38 and 3e38
    beside values near 1, whose float64 sum depends on its order (``quantize.py``,
    "normal codebook": the kernels' orders differ there)."""
    edges = edge_groups(group, bits, dtype, seed=group)
    edges = torch.cat([edges[:11 * group], edges[12 * group:]])
    g = _gen(group + bits)
    body = torch.randn(group, generator=g)
    ties = body.clone()
    ties[[3, 7]] = torch.tensor([9.0, -9.0]) + ties.mean()  # about equally far on both sides
    three = body.clone()
    three[[1, 4, 6]] = 50.0
    both = body.clone()
    both[[2, 5]] = torch.tensor([math.nan, math.inf])
    one = body.clone()
    one[group - 1] = -1e30
    extra = torch.cat([ties, three, both, one, torch.full((group,), 2.0**-130)])  # subnormal mean and deviation
    return torch.cat([edges, extra.to(dtype)])


# 520: int16 offsets, one case (the interpreter runs ~0.5 ms per program)
_NORMAL_CASES = [(d, b, g) for d in DTYPES for b in (2, 3, 4) for g in (24, 64)] + [(torch.float32, 3, 520)]


@pytest.mark.parametrize("dtype,bits,group", _NORMAL_CASES,
                         ids=[f"{str(d).removeprefix('torch.')}-{b}-{g}" for d, b, g in _NORMAL_CASES])
def test_quantize_normal_matches_torch(dtype, bits, group):
    x = normal_edge_groups(group, bits, dtype).to(DEVICE)
    parts = ops.quantize_normal(x, group, bits, "triton")
    want = ops.quantize_normal(x, group, bits, "torch")
    for i, (a, b) in enumerate(zip(parts, want, strict=True)):
        assert_same(a, b, nan_payload=i != 1)  # a NaN mean or deviation: any NaN (quantize_triton.py)
    for out in DTYPES:
        assert_same(ops.dequantize_normal(*want, [x.numel()], group, bits, out, "triton"),
                    ops.dequantize_normal(*want, [x.numel()], group, bits, out, "torch"))


def _views():
    """Non-contiguous views: transposed, permuted, expanded (stride 0), and one of five
    dims that stay apart (the kernels then read a contiguous copy)."""
    base = torch.randn(2, 3, 4, 5, 6, generator=_gen(1))
    base[0, 1, 2, 3, 4] = math.nan
    base[1, 2, 3, 4, 5] = -0.0
    return {
        "transposed": torch.randn(24, 40, generator=_gen(2)).t(),
        "permuted": base[0].permute(2, 0, 3, 1),
        "sliced": base[:, :, 1:3, ::2],
        "expanded": torch.randn(5, 1, 16, generator=_gen(3)).expand(5, 3, 16),
        "five_dims": base.permute(4, 2, 0, 3, 1),
    }


@pytest.mark.parametrize("name", list(_views()))
def test_non_contiguous_inputs_read_in_logical_order(name):
    x = _views()[name].to(DEVICE)
    assert not x.is_contiguous()
    for dtype in (torch.float32, torch.bfloat16):
        v = x.to(dtype)
        for a, b in zip(ops.quantize_group(v, 16, 3, "triton"), ops.quantize_group(v, 16, 3, "torch")):
            assert_same(a, b)
        assert torch.equal(ops.quantize_uniform(v, 3, -2.0, 2.0, "triton"), ops.quantize_uniform(v, 3, -2.0, 2.0, "torch"))
        for i, (a, b) in enumerate(zip(ops.quantize_normal(v, 16, 3, "triton"), ops.quantize_normal(v, 16, 3, "torch"))):
            assert_same(a, b, nan_payload=i != 1)
        if v.dim() >= 2:
            center = torch.randn(v.shape[1], generator=_gen(4)).to(DEVICE)
            for a, b in zip(ops.quantize_group_centered(v, center, 24, 4, "triton"),
                            ops.quantize_group_centered(v, center, 24, 4, "torch")):
                assert_same(a, b)


@pytest.mark.parametrize("x_dtype, center_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
], ids=str)
def test_quantize_group_centered_matches_torch(x_dtype, center_dtype):
    """The Triton kernel subtracts the center as it reads x, rounding the difference to
    the promoted dtype as ``x - center`` does; the torch backend materializes it."""
    x = torch.randn(3, 5, 7, 4, generator=_gen(5)) * 3
    x[0, 1, 2, 3], x[1, 2, 0, 0], x[2, 4, 6, 1] = math.nan, math.inf, -0.0
    center = torch.randn(5, generator=_gen(6)) * 1e3
    center[3] = 1.5  # with x = 1.5 the difference is 0
    x[1, 3, :, :2] = 1.5
    x, center = x.to(x_dtype).to(DEVICE), center.to(center_dtype).to(DEVICE)
    for bits in (3, 8):
        codes, bounds = ops.quantize_group_centered(x, center, 24, bits, "triton")
        t_codes, t_bounds = ops.quantize_group_centered(x, center, 24, bits, "torch")
        assert torch.equal(codes, t_codes)
        assert_same(bounds, t_bounds)


# ------------------------------------------------------------------ fixed range
def edge_values(n: int, bits: int, lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor:
    """Values across and beyond [lo, hi], with the edge cases at fixed positions."""
    g = _gen(n + bits)
    x = lo + (hi - lo) * (torch.rand(n, generator=g) * 1.2 - 0.1)
    step = (hi - lo) / (2**bits - 1)
    ties = lo + (torch.randint(0, 2**bits - 1, (n,), generator=g) + 0.5) * step  # half a step: exact when lo = 0
    x = torch.where(torch.arange(n) % 3 == 0, ties, x)
    specials = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, -1e-40, 3.395e38, -3.4e38, lo, hi]
    k = min(n, len(specials))
    x[torch.arange(k) * 7 % n] = torch.tensor(specials[:k])
    return x.to(dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_uniform_matches_torch(dtype, bits):
    ranges = [(0.0, float(2**bits - 1)), quantize.GELU_DERIVATIVE_RANGE["none"]]  # a step of exactly 1, then GELU's
    for n in (1, 9, 1003, 4099):  # one element, a partial word, several programs
        for lo, hi in ranges:
            x = edge_values(n, bits, lo, hi, dtype).to(DEVICE)
            codes = ops.quantize_uniform(x, bits, lo, hi, "triton")
            t_codes = ops.quantize_uniform(x, bits, lo, hi, "torch")
            assert codes.shape == ((n * bits + 7) // 8,) and torch.equal(codes, t_codes), (n, lo)
            for out in DTYPES:
                assert_same(ops.dequantize_uniform(t_codes, [n], bits, lo, hi, out, "triton"),
                            ops.dequantize_uniform(t_codes, [n], bits, lo, hi, out, "torch"))
            noise = torch.randint(0, 256, codes.shape, dtype=torch.uint8, generator=_gen(n)).to(DEVICE)
            assert_same(ops.dequantize_uniform(noise, [n], bits, lo, hi, dtype, "triton"),
                        ops.dequantize_uniform(noise, [n], bits, lo, hi, dtype, "torch"))


def test_empty_inputs():
    for backend in ("triton", "torch"):
        codes, bounds = ops.quantize_group(torch.empty(0, 3, device=DEVICE), 8, 3, backend)
        assert codes.shape == (0,) and bounds.shape == (0,)
        assert ops.dequantize_group(codes, bounds, [0, 3], 8, 3, torch.float32, backend).shape == (0, 3)
        assert ops.quantize_uniform(torch.empty(0, device=DEVICE), 3, 0.0, 1.0, backend).shape == (0,)


# ------------------------------------------------------------------ top-k offsets layout
def _random_masks(groups: int, group_size: int, density: float, seed: int) -> torch.Tensor:
    bits = torch.rand(groups, group_size, generator=_gen(seed)) < density
    padded = torch.zeros(groups, -(-group_size // 8) * 8, dtype=torch.int64)
    padded[:, :group_size] = bits
    return (padded.view(groups, -1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("group_size, tile", [(200, None), (1000, None), (3000, 512), (2003, 256)])
def test_offsets_conversions_match_torch(group_size, tile):
    """Mask -> offsets and offsets -> dense, on the fused path and (``tile``) the tiled
    one, for masks with fewer set bits than k, exactly k, and more (malformed: the
    extra bits are dropped as the PyTorch kernel drops them)."""
    k = group_size // 10
    for density, seed in [(0.05, 1), (0.1, 2), (0.3, 3)]:
        mask = _random_masks(3, group_size, density, seed).to(DEVICE)
        offsets = tk.triton_mask_to_offsets(mask, group_size, k, tile=tile)
        ref = topk_compress.torch_mask_to_offsets(mask, group_size, k)
        assert offsets.dtype == ref.dtype and torch.equal(offsets, ref), density
    x = torch.randn(2 * group_size + 77, generator=_gen(group_size))
    x[::41] = math.nan
    x[5::43] = -0.0
    for value_dtype in DTYPES:
        mask, values = topk_compress.torch_compress(x, group_size, k, value_dtype)
        offsets = topk_compress.torch_mask_to_offsets(mask, group_size, k)
        for out in DTYPES:
            dense = tk.triton_decompress_offsets(offsets.to(DEVICE), values.to(DEVICE), [x.numel()], group_size, out, tile=tile)
            ref = topk_compress.torch_decompress_offsets(offsets, values, [x.numel()], group_size, out)
            # a NaN converted to bfloat16 keeps no payload (as in razor::decompress's kernel)
            assert_same(dense.cpu(), ref, nan_payload=out != torch.bfloat16 or value_dtype == out)
    # any 16-bit values: top-k never keeps a subnormal, a decode must still carry one.
    # (NaN payloads only as NaN: torch's CPU copies turn some NaN patterns into others.)
    for value_dtype in (torch.bfloat16, torch.float16):
        noise = torch.randint(-2**15, 2**15, values.shape, generator=_gen(k)).to(torch.int16).view(value_dtype)
        for out in DTYPES:
            dense = tk.triton_decompress_offsets(offsets.to(DEVICE), noise.to(DEVICE), [x.numel()], group_size, out, tile=tile)
            ref = topk_compress.torch_decompress_offsets(offsets, noise, [x.numel()], group_size, out)
            assert_same(dense.cpu(), ref, nan_payload=False)


def test_offsets_ops_match_torch():
    x = (torch.randn(4, 700, generator=_gen(7)) * torch.where(torch.rand(4, 700, generator=_gen(8)) < 0.1, 100, 1))
    x[1, 3], x[2, 9] = math.nan, -math.inf
    x = x.to(DEVICE)
    off, val = ops.compress_offsets(x, 256, 9, torch.bfloat16, "triton")
    t_off, t_val = ops.compress_offsets(x, 256, 9, torch.bfloat16, "torch")
    assert off.dtype == torch.int16 and torch.equal(off, t_off)
    assert_same(val, t_val, nan_payload=False)
    assert_same(ops.decompress_offsets(t_off, t_val, [4, 700], 256, torch.float32, "triton"),
                ops.decompress_offsets(t_off, t_val, [4, 700], 256, torch.float32, "torch"))
    # k = 0 and no elements
    off, val = ops.compress_offsets(x, 256, 0, torch.bfloat16, "triton")
    assert off.shape == (11, 0) and torch.equal(ops.decompress_offsets(off, val, [4, 700], 256, torch.float32,
                                                                       "triton"), torch.zeros(4, 700, device=DEVICE))
    assert ops.compress_offsets(x[:0], 256, 9, torch.bfloat16, "triton")[0].shape == (0, 9)


# ------------------------------------------------------------------ ops: opcheck, backend
OP_NAMES = ["quantize_group", "quantize_group_centered", "quantize_group_stochastic", "dequantize_group", "quantize_uniform", "dequantize_uniform",
            "compress", "decompress", "compress_offsets", "decompress_offsets", "quantize_normal", "dequantize_normal"]


def _op_cases():
    """(op, args) for every codec op with backend="triton", on small inputs."""
    x = torch.randn(3, 5, 8, generator=_gen(9)).to(DEVICE)
    center = torch.randn(5, generator=_gen(10)).to(DEVICE)
    codes, bounds = ops.quantize_group(x, 8, 3, "torch")
    ucodes = ops.quantize_uniform(x, 3, -1.0, 1.0, "torch")
    mask, values = ops.compress(x, 16, 3, torch.bfloat16, "torch")
    offsets, _ = ops.compress_offsets(x, 16, 3, torch.bfloat16, "torch")
    normal = ops.quantize_normal(x, 16, 2, "torch")
    r = torch.ops.razor
    cases = {
        "quantize_group": (r.quantize_group.default, (x, 8, 3, "triton")),
        "quantize_group_centered": (r.quantize_group_centered.default, (x, center, 8, 3, "triton")),
        "quantize_group_stochastic": (r.quantize_group_stochastic.default,
                                      (x, torch.tensor(7, device=DEVICE), 8, 3, "triton")),
        "dequantize_group": (r.dequantize_group.default, (codes, bounds, [3, 5, 8], 8, 3, torch.bfloat16, "triton")),
        "quantize_uniform": (r.quantize_uniform.default, (x, 3, -1.0, 1.0, "triton")),
        "dequantize_uniform": (r.dequantize_uniform.default, (ucodes, [3, 5, 8], 3, -1.0, 1.0, torch.float16,
                                                              "triton")),
        "compress": (r.compress.default, (x, 16, 3, torch.bfloat16, "triton")),
        "decompress": (r.decompress.default, (mask, values, [3, 5, 8], 16, torch.float32, "triton")),
        "compress_offsets": (r.compress_offsets.default, (x, 16, 3, torch.bfloat16, "triton")),
        "decompress_offsets": (r.decompress_offsets.default, (offsets, values, [3, 5, 8], 16, torch.float32,
                                                              "triton")),
        "quantize_normal": (r.quantize_normal.default, (x, 16, 2, "triton")),
        "dequantize_normal": (r.dequantize_normal.default, (*normal, [3, 5, 8], 16, 2, torch.bfloat16, "triton")),
    }
    assert list(cases) == OP_NAMES
    return cases


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck_with_the_triton_backend(name):
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", OP_NAMES)
def test_backend_is_the_last_argument_and_validated(name):
    op, args = _op_cases()[name]
    last = op._schema.arguments[-1]
    assert last.name == "backend" and last.default_value == "auto"  # old positional calls keep working
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'native', 'triton'\)"):
        op(*args[:-1], "cuda")
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args[:-1]]
    with pytest.raises(ValueError, match="backend='native' is the CPU kernel"):
        op(*meta, "native")  # the fake kernel checks too: a traced graph fails early
    with pytest.raises(ValueError, match="backend must be one of"):
        op(*meta, "gpu")


def test_auto_picks_the_kernel_of_the_device(monkeypatch):
    assert ops._kernel("op", torch.device("cpu"), "auto") == "native"
    assert ops._kernel("op", torch.device("cuda"), "auto") == "triton"
    assert ops._kernel("op", torch.device("meta"), "auto") == "torch"
    monkeypatch.setattr(ops, "_triton_available", lambda: False)
    assert ops._kernel("op", torch.device("cuda"), "auto") == "torch"
    assert ops._kernel("op", torch.device("cuda"), "triton") == "triton"


def test_native_backend_falls_back_only_where_the_kernel_declines(monkeypatch):
    """"auto" and "native" run the native kernel on CPU tensors ("torch" never does);
    where it declines a dtype the PyTorch kernel runs; an explicit "native" without a
    native kernel is an error, "auto" then runs the PyTorch kernel. (The native kernel
    is stubbed: its bits are tests/test_quantize_group.py's business.)"""
    calls = []

    def native(x, group_size, bits):
        calls.append(x.dtype)
        return None if x.dtype == torch.float64 else quantize.torch_quantize_group(x, group_size, bits)

    monkeypatch.setattr(quantize_cpu, "load", lambda: object())
    monkeypatch.setattr(quantize_cpu, "cpu_quantize_group", native)
    x = torch.randn(40, generator=_gen(11))
    for backend, dtype, runs_native in [("auto", torch.float32, True), ("native", torch.float32, True),
                                        ("torch", torch.float32, False), ("native", torch.float64, True)]:
        calls.clear()
        for a, b in zip(ops.quantize_group(x.to(dtype), 8, 4, backend), quantize.torch_quantize_group(x.to(dtype), 8, 4)):
            assert_same(a, b)
        assert calls == ([dtype] if runs_native else []), backend
    monkeypatch.setattr(quantize_cpu, "load", lambda: None)
    with pytest.raises(RuntimeError, match="native CPU kernel is not available"):
        ops.quantize_group(x, 8, 4, "native")
    calls.clear()
    ops.quantize_group(x, 8, 4, "auto")
    assert calls == [torch.float32]  # the stub declines nothing; a real unbuilt kernel returns None


def test_centered_bfloat16_under_auto_runs_without_a_native_kernel(monkeypatch):
    """A bfloat16 BatchNorm input is centered first and quantized with the backend asked
    for: under "auto" with no native kernel, the PyTorch one (it used to ask for the
    native kernel by name, an error)."""
    monkeypatch.setattr(quantize_cpu, "load", lambda: None)
    x = torch.randn(2, 4, 6, 6, generator=_gen(12)).to(torch.bfloat16)
    center = torch.randn(4, generator=_gen(13)).to(torch.bfloat16)
    want = quantize.torch_quantize_group(x - center.view(1, -1, 1, 1), 64, 3)
    for a, b in zip(ops.quantize_group_centered(x, center, 64, 3, "auto"), want):
        assert_same(a, b)


def test_importing_the_ops_does_not_import_triton():
    code = "import sys, razorpass.kernels.ops; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bf16_nan_of_torch_on_cpu():
    """The kernels write the bfloat16 NaN torch's conversion gives on the device."""
    nans = torch.tensor([0x7FC00000, -0x00400000, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    assert nans.isnan().all()
    got = nans.to(torch.bfloat16).view(torch.int16).tolist()
    assert all(v & 0xFFFF == qt._BF16_NAN["cpu"] for v in got), [hex(v & 0xFFFF) for v in got]


# ------------------------------------------------------------------ on a GPU
_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _large(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``n`` random values with every edge case sprinkled in (on the GPU)."""
    g = _gen(seed)
    x = torch.randn(n, generator=g) * torch.where(torch.rand(n, generator=g) < 0.01, 1e4, 1.0)
    pick = torch.randint(0, 400, (n,), generator=g)
    for code, v in enumerate([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, 3.395e38, 0.5, 1.5]):
        x = torch.where(pick == code, torch.tensor(v), x)
    return x.to(dtype).cuda()


@_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_cuda_quantize_group_matches_torch_on_device(dtype):
    for group in (64, 256, 3 * qt.MAX_BLOCK + 40):  # the last: the chunked path
        for bits in BITS:
            x = _large(2**20 + 1234, dtype, seed=bits + group)
            x = torch.cat([x, edge_groups(group, bits, dtype, seed=group).cuda()])
            codes, bounds = ops.quantize_group(x, group, bits, "triton")
            t_codes, t_bounds = ops.quantize_group(x, group, bits, "torch")
            assert torch.equal(codes, t_codes), (group, bits)
            assert_same(bounds, t_bounds)
            for out in DTYPES:
                assert_same(ops.dequantize_group(codes, bounds, [x.numel()], group, bits, out, "triton"),
                            ops.dequantize_group(codes, bounds, [x.numel()], group, bits, out, "torch"))
        x = _large(64 * 96 * 33, dtype, seed=7).view(64, 96, 33).transpose(1, 2)
        center = torch.randn(33).to(dtype).cuda() * 10
        for a, b in zip(ops.quantize_group_centered(x, center, 64, 4, "triton"),
                        ops.quantize_group_centered(x, center, 64, 4, "torch")):
            assert_same(a, b)


@_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_cuda_quantize_normal_matches_torch_on_device(dtype):
    for group in (64, 256, 4096):
        for bits in (2, 3, 4):
            x = torch.cat([_large(2**20 + 1234, dtype, seed=bits + group), normal_edge_groups(group, bits, dtype).cuda()])
            parts = ops.quantize_normal(x, group, bits, "triton")
            want = ops.quantize_normal(x, group, bits, "torch")
            for i, (a, b) in enumerate(zip(parts, want, strict=True)):
                assert_same(a, b, nan_payload=i != 1)
            for out in DTYPES:
                assert_same(ops.dequantize_normal(*want, [x.numel()], group, bits, out, "triton"),
                            ops.dequantize_normal(*want, [x.numel()], group, bits, out, "torch"))


@_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_cuda_uniform_matches_torch_on_device(dtype):
    for bits in BITS:
        for lo, hi in [quantize.GELU_DERIVATIVE_RANGE["none"], quantize.GELU_DERIVATIVE_RANGE["tanh"], (-1.5, 2.0)]:
            x = _large(2**20 + 3, dtype, seed=bits) * 0.6 + 0.3
            codes = ops.quantize_uniform(x, bits, lo, hi, "triton")
            assert torch.equal(codes, ops.quantize_uniform(x, bits, lo, hi, "torch")), (bits, lo)
            for out in DTYPES:
                assert_same(ops.dequantize_uniform(codes, [x.numel()], bits, lo, hi, out, "triton"),
                            ops.dequantize_uniform(codes, [x.numel()], bits, lo, hi, out, "torch"))


@_cuda
def test_cuda_offsets_match_torch_on_device():
    for group_size, k in [(1024, 31), (197 * 768, 197 * 768 // 20)]:  # fused; tiled (one ViT sample)
        x = _large(3 * group_size + 999, torch.float32, seed=group_size)
        off, val = ops.compress_offsets(x, group_size, k, torch.bfloat16, "triton")
        t_off, t_val = ops.compress_offsets(x, group_size, k, torch.bfloat16, "torch")
        assert torch.equal(off, t_off)
        assert_same(val, t_val, nan_payload=False)  # a converted NaN keeps no payload (razor::compress)
        for out in DTYPES:
            assert_same(ops.decompress_offsets(t_off, t_val, [x.numel()], group_size, out, "triton"),
                        ops.decompress_offsets(t_off, t_val, [x.numel()], group_size, out, "torch"))


@_cuda
def test_cuda_torch_kernel_is_the_same_on_cpu_and_gpu():
    """The PyTorch kernel is the definition on every device (its divisions are true
    divisions on CUDA too); NaN patterns are the device's."""
    x = _large(2**18 + 5, torch.float32, seed=3)
    for bits in BITS:
        for a, b in zip(quantize.torch_quantize_group(x, 256, bits), quantize.torch_quantize_group(x.cpu(), 256, bits)):
            assert_same(a.cpu(), b, nan_payload=False)
        lo, hi = quantize.GELU_DERIVATIVE_RANGE["none"]
        assert torch.equal(quantize.torch_quantize_uniform(x, bits, lo, hi).cpu(),
                           quantize.torch_quantize_uniform(x.cpu(), bits, lo, hi))


@_cuda
def test_cuda_bf16_nan_of_torch_on_gpu():
    nans = torch.tensor([0x7FC00000, -0x00400000, 0x7F800001, -1], dtype=torch.int32).view(torch.float32).cuda()
    got = nans.to(torch.bfloat16).view(torch.int16).tolist()
    assert all(v & 0xFFFF == qt._BF16_NAN["cuda"] for v in got), [hex(v & 0xFFFF) for v in got]


def _assert_ieee_ptx(ptx: dict[str, str]) -> None:
    """IEEE division (``div.rn.f32``, never ``div.full`` / ``div.approx`` / flushed) in the
    kernels that divide, and no fused multiply-add in any."""
    for name, text in ptx.items():
        assert not any(op in text for op in ("div.full", "div.approx", "div.rn.ftz", "fma.")), name
        assert ("div.rn.f32" in text) == (name not in ("dequantize_uniform", "dequantize_normal")), name
        if name.startswith("dequantize"):
            assert "mul.rn.f32" in text and "add.rn.f32" in text, name
        if name == "quantize_normal":  # the float64 mean and deviation: IEEE too
            assert "div.rn.f64" in text and "sqrt.rn.f64" in text, name


_COMPILE_FOR_SM90 = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from razorpass.kernels import quantize_triton as qt
try:
    from triton import knobs
    have_ptxas = bool(knobs.nvidia.ptxas.path)
except Exception:
    have_ptxas = False
if not have_ptxas:
    print("null")
    sys.exit(0)
pointers = {"x_ptr": "*fp32", "center_ptr": "*fp32", "seed_ptr": "*i64", "codes_ptr": "*u8", "bounds_ptr": "*i16",
            "out_ptr": "*fp32", "lo": "fp32", "step": "fp32", "thresholds_ptr": "*fp32", "levels_ptr": "*fp32",
            "stats_ptr": "*i16", "offsets_ptr": "*u8", "values_ptr": "*i16"}
consts = dict(GROUP=256, BITS=3, ROWS=8, BLOCK=256, CONTIGUOUS=True, CENTERED=False, DIFF=0, NAN_BF16=0x7FFF, WORDS=256,
              STOCHASTIC=False)
def ptx(kernel, options, **extra):
    consts.update(extra)
    sig = {n: "constexpr" if p.is_constexpr else pointers.get(n, "i32") for n, p in zip(kernel.arg_names, kernel.params)}
    src = ASTSource(kernel, sig, {n: consts[n] for n, t in sig.items() if t == "constexpr"})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
out = {name: ptx(getattr(qt, f"_{name}_kernel"), qt.LAUNCH_OPTIONS)
       for name in ("quantize_group", "dequantize_group", "quantize_uniform", "dequantize_uniform", "quantize_normal",
                    "dequantize_normal")}
out["quantize_group, stochastic"] = ptx(qt._quantize_group_kernel, qt.LAUNCH_OPTIONS, STOCHASTIC=True)
out["dequantize_group, fp fusion on"] = ptx(qt._dequantize_group_kernel, {"enable_fp_fusion": True})
print(json.dumps(out))
"""


def test_compiled_kernels_divide_exactly_and_never_fuse():
    """What the interpreter cannot show, read from the PTX the kernels compile to for
    sm_90 (no GPU needed; skipped without Triton's CUDA toolchain): IEEE division, no
    fused multiply-add. The control compiles the decoder with fp fusion on, which does
    contract ``q * step + lo`` into an fma."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout.strip().splitlines()[-1])
    if ptx is None:
        pytest.skip("Triton's CUDA toolchain (ptxas) is not installed")
    control = ptx.pop("dequantize_group, fp fusion on")
    assert "fma.rn.f32" in control
    _assert_ieee_ptx(ptx)


@_cuda
def test_cuda_kernels_divide_exactly_and_never_fuse(monkeypatch):
    """The same, on the kernels the ops launch on this GPU."""
    compiled = []
    launch = qt._launch
    monkeypatch.setattr(qt, "_launch", lambda kernel, *a, **kw: compiled.append((kernel, launch(kernel, *a, **kw))))
    x = torch.randn(4096, device="cuda")
    codes, bounds = ops.quantize_group(x, 256, 3, "triton")
    ops.dequantize_group(codes, bounds, [4096], 256, 3, torch.float32, "triton")
    ucodes = ops.quantize_uniform(x, 3, -1.0, 1.0, "triton")
    ops.dequantize_uniform(ucodes, [4096], 3, -1.0, 1.0, torch.float32, "triton")
    names = {qt._quantize_group_kernel: "quantize_group", qt._dequantize_group_kernel: "dequantize_group",
             qt._quantize_uniform_kernel: "quantize_uniform", qt._dequantize_uniform_kernel: "dequantize_uniform"}
    _assert_ieee_ptx({names[kernel]: k.asm["ptx"] for kernel, k in compiled})
