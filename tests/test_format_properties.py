"""Property tests of the compressed format (``razorpass.compress`` / ``decompress``).

Hypothesis draws shapes (1-D included, sizes that are no multiple of the group size),
activation dtypes, value dtypes, sparsities, granularities and element values (ties,
zeros of both signs, infinities, NaN, subnormals, huge values). Every drawn case is
checked for both CPU backends ("torch": the PyTorch kernel; "auto": the native C++
kernel) against

* the format's stated properties, read off the returned mask and values: exactly
  min(k, real elements) bits per group, padding bits 0, every kept magnitude >= every
  dropped one, ties to the lower index, values = the kept inputs rounded to the value
  dtype in position order, zero slots after them;
* a small independent reference written here (a per-group Python sort, no torch top-k,
  no shared code with the kernels or ``razorpass.reference``);
* each other: the native kernel is bit-identical to the PyTorch kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import razorpass
from razorpass import RazorConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BACKENDS = ["torch", "auto"]  # "auto" on CPU: the native C++ kernel

PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _native_kernel_built():
    from razorpass.kernels import topk_compress_cpu

    assert topk_compress_cpu.load() is not None, "the native CPU kernel did not build"


# ----------------------------------------------------------------- strategies
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45,
           65504.0, 1e30]


@st.composite
def sparsities(draw):
    """A sparsity p/q with q <= 1000, as a float: k = ceil((1 - p/q) * g) is then exact
    integer arithmetic here, and the config's own rational (limit_denominator(10**6))
    recovers p/q exactly, so no float-rounding disagreement is possible."""
    q = draw(st.sampled_from([2, 3, 7, 8, 10, 100, 997, 1000]))
    p = draw(st.integers(0, q - 1))
    return p, q


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 11), min_size=ndim, max_size=ndim)))
    numel = math.prod(shape)
    element = st.one_of(
        st.sampled_from(SPECIAL),
        st.integers(-3, 3).map(float),  # ties
        st.floats(width=32, allow_nan=True, allow_infinity=True),
    )
    values = draw(st.lists(element, min_size=numel, max_size=numel))
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.tensor(values, dtype=torch.float32).to(dtype).view(shape)
    if x.dim() >= 2 and draw(st.booleans()):
        x = x.transpose(0, -1)  # a non-contiguous view: the format reads logical order
    granularity = draw(st.sampled_from(["block", "sample"]))
    block = 8 * draw(st.integers(1, 8))
    value_dtype = draw(st.sampled_from(["bfloat16", "float16", "float32", "same"]))
    return x, granularity, block, value_dtype, draw(sparsities())


# ----------------------------------------------------------------- reference
def _group_size(x, granularity, block):
    if granularity == "block":
        return block
    return math.prod(x.shape[1:]) if x.dim() > 1 else 1


def _sort_key(v: float, i: int):
    # NaN counts as the largest magnitude; equal magnitudes: the lower index first.
    return (not math.isnan(v), 0.0 if math.isnan(v) else -abs(v), i)


def reference_selection(x: torch.Tensor, group: int, k: int) -> list[list[int]]:
    """Per group, the sorted in-group positions of the kept elements."""
    flat = x.contiguous().reshape(-1).double().tolist()
    out = []
    for lo in range(0, len(flat), group):
        seg = flat[lo:lo + group]
        order = sorted(range(len(seg)), key=lambda i: _sort_key(seg[i], i))
        out.append(sorted(order[:k]))
    return out


def _bits(mask: torch.Tensor) -> torch.Tensor:
    """(groups, bytes * 8) bool: bit j of byte i is element 8i + j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> shifts) & 1).bool().reshape(mask.shape[0], -1)


def assert_bitwise_equal(a, b, what=""):
    """Equal bit for bit (-0.0 != +0.0), NaN equal to NaN whatever its payload."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), what
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a[~nan].contiguous().view(ints), b[~nan].contiguous().view(ints)), (what, a, b)


def _compress(x, granularity, block, value_dtype, pq, backend):
    p, q = pq
    return razorpass.compress(x, sparsity=p / q, granularity=granularity, block_size=block, value_dtype=value_dtype,
                              backend=backend)


# ----------------------------------------------------------------- properties
@pytest.mark.parametrize("backend", BACKENDS)
@PROPS
@given(case=cases())
def test_format_properties(backend, case):
    x, granularity, block, value_dtype, (p, q) = case
    vdtype = x.dtype if value_dtype == "same" else VALUE_DTYPES[value_dtype]
    g = _group_size(x, granularity, block)
    k = -(-(q - p) * g // q)  # ceil((1 - p/q) * g), exact
    n = x.numel()
    groups = -(-n // g)
    c = _compress(x, granularity, block, value_dtype, (p, q), backend)

    # static shapes and dtypes
    assert c.group_size == g and c.shape == tuple(x.shape) and c.dtype == x.dtype
    assert c.mask.dtype == torch.uint8 and c.mask.shape == (groups, -(-g // 8))
    assert c.values.dtype == vdtype and c.values.shape == (groups, k)
    assert c.nbytes == groups * -(-g // 8) + groups * k * torch.empty((), dtype=vdtype).element_size()

    bits = _bits(c.mask)
    flat = x.contiguous().reshape(-1)
    mags = flat.double().abs().tolist()
    expected = reference_selection(x, g, k)
    for gi in range(groups):
        lo = gi * g
        real = min(g, n - lo)
        row = bits[gi]
        # padding bits (past the group, or past the tensor in the last group) are 0
        assert not row[real:].any(), f"group {gi}: padding bit set"
        kept = row[:real].nonzero().flatten().tolist()
        dropped = [j for j in range(real) if j not in set(kept)]
        # exactly min(k, real elements) kept
        assert len(kept) == min(k, real), f"group {gi}: {len(kept)} kept, expected {min(k, real)}"
        # every kept magnitude >= every dropped one (NaN the largest); ties to the lower index
        for i in kept:
            for j in dropped:
                mi, mj = mags[lo + i], mags[lo + j]
                if math.isnan(mj):
                    assert math.isnan(mi) and i < j, f"group {gi}: dropped NaN at {j} over kept {i}"
                elif not math.isnan(mi):
                    assert mi >= mj, f"group {gi}: kept |x|={mi} at {i} < dropped |x|={mj} at {j}"
                    if mi == mj:
                        assert i < j, f"group {gi}: tie kept {i} over lower index {j}"
        # the independent reference picks the same positions
        assert kept == expected[gi], f"group {gi}: kept {kept}, reference {expected[gi]}"
        # values: the kept inputs rounded to the value dtype, in position order, then 0
        want = flat[[lo + i for i in kept]].to(vdtype)
        assert_bitwise_equal(c.values[gi, :len(kept)], want, f"group {gi} values")
        assert_bitwise_equal(c.values[gi, len(kept):], torch.zeros(k - len(kept), dtype=vdtype), f"group {gi} slots")

    # round trip: the kept values (through the value dtype) where kept, +0 elsewhere
    keep = torch.zeros(groups * g, dtype=torch.bool)
    for gi, sel in enumerate(expected):
        keep[[gi * g + i for i in sel]] = True
    keep = keep[:n]
    dense = torch.where(keep, flat.to(vdtype).to(x.dtype), torch.zeros((), dtype=x.dtype)).view(x.shape)
    assert_bitwise_equal(razorpass.decompress(c, backend=backend), dense, "round trip")


@PROPS
@given(case=cases())
def test_native_kernel_bit_identical_to_torch_kernel(case):
    x, granularity, block, value_dtype, pq = case
    ct = _compress(x, granularity, block, value_dtype, pq, "torch")
    cn = _compress(x, granularity, block, value_dtype, pq, "auto")
    assert torch.equal(ct.mask, cn.mask)
    assert_bitwise_equal(ct.values, cn.values, "values")
    # decompress: each kernel, and each kernel on the other's output
    dt = razorpass.decompress(ct, backend="torch")
    assert_bitwise_equal(razorpass.decompress(cn, backend="auto"), dt, "native decompress")
    assert_bitwise_equal(razorpass.decompress(ct, backend="auto"), dt, "native decompress of torch output")
    assert_bitwise_equal(razorpass.decompress(cn, backend="torch"), dt, "torch decompress of native output")


@PROPS
@given(case=cases())
def test_round_trip_equals_reference_sparsify(case):
    """``decompress(compress(x))`` is ``razorpass.reference.sparsify`` (the eager rule
    the compiled gradients are tested against), bit for bit."""
    from razorpass.reference import sparsify

    x, granularity, block, value_dtype, (p, q) = case
    cfg = RazorConfig(sparsity=p / q, granularity=granularity, block_size=block, value_dtype=value_dtype)
    d = razorpass.decompress(_compress(x, granularity, block, value_dtype, (p, q), "auto"))
    assert_bitwise_equal(d, sparsify(x, cfg), "reference.sparsify")
