"""The Triton top-k kernels are bit-identical to the PyTorch reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set below before Triton is imported; it costs ~0.5 ms per
program, so every tensor here is small). With a GPU they run compiled, on CUDA.

Mask and values are compared exactly (values as integers, so -0.0 and NaN compare
bit for bit) against ``torch_compress``; decompress against ``torch_decompress`` of
the reference's own output. The only latitude: when a NaN goes through a dtype
conversion its payload depends on the conversion routine (torch's CPU kernels are
not consistent among themselves), so there both sides need only be NaN.
"""

import importlib
import os
import sys

import torch

_ON_GPU = torch.cuda.is_available()
if not _ON_GPU:  # must precede the first @triton.jit of the kernel module
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import razorpass  # noqa: E402
from razorpass.kernels.topk_compress import torch_compress, torch_decompress  # noqa: E402

_MODULE = "razorpass.kernels.topk_compress_triton"
if _MODULE in sys.modules and not _ON_GPU:
    # Imported earlier without the interpreter: rebuild its kernels for the CPU.
    tk = importlib.reload(sys.modules[_MODULE])
else:
    tk = importlib.import_module(_MODULE)

DEVICE = "cuda" if _ON_GPU else "cpu"
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, nan_payload: bool = True) -> None:
    """Bitwise equality; with ``nan_payload=False`` a NaN only has to meet a NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.view(_INT_VIEW[actual.dtype]), expected.view(_INT_VIEW[expected.dtype])
    if not nan_payload:
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
        a, e = a[~nan], e[~nan]
    diff = (a != e).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ, first at {diff[0].tolist()}"


def check(x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype, tile=None) -> None:
    """compress and decompress of ``tk`` equal the reference's, bit for bit."""
    x = x.to(DEVICE)
    mask, values = tk._compress(x, group_size, k, value_dtype, tile)
    ref_mask, ref_values = torch_compress(x, group_size, k, value_dtype)
    assert mask.dtype == torch.uint8 and torch.equal(mask, ref_mask), "mask differs"
    converted = value_dtype != x.dtype
    assert_same_bits(values, ref_values, nan_payload=not converted)

    dense = tk._decompress(mask, values, list(x.shape), group_size, x.dtype, tile)
    ref_dense = torch_decompress(ref_mask, ref_values, list(x.shape), group_size, x.dtype)
    assert_same_bits(dense, ref_dense, nan_payload=not converted)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Test inputs; every one is built in fp32 and then cast."""
    g = _gen(numel)
    if name == "random":
        x = torch.randn(numel, generator=g)
    elif name == "ties":  # equal magnitudes of both signs: selection is all tie-break
        x = torch.where(torch.rand(numel, generator=g) < 0.5, 1.5, -1.5)
    elif name == "few_levels":  # many ties at several levels, the threshold inside one
        x = torch.randint(-3, 4, (numel,), generator=g).float()
    elif name == "zeros":
        x = torch.zeros(numel)
    elif name == "neg_zeros":
        x = -torch.zeros(numel)
    elif name == "signed_zeros":
        x = torch.where(torch.rand(numel, generator=g) < 0.5, 0.0, -0.0)
    elif name == "special":  # NaN > +-inf > finite; zeros of both signs
        x = torch.randn(numel, generator=g)
        pick = torch.randint(0, 8, (numel,), generator=g)
        for code, v in enumerate([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -float("nan")]):
            x = torch.where(pick == code, torch.tensor(v), x)
    elif name == "halfway":  # halfway between fp16 (and, every third, bf16) neighbours: ties to even
        odd = 2 * torch.randint(0, 64, (numel,), generator=g) + 1
        x = (1.0 + odd * 2.0**-11) * 2.0 ** torch.randint(-20, 15, (numel,), generator=g).float()
        x[::3] = 1.0 + odd[::3] * 2.0**-8  # bf16 ties
        x = x * torch.where(torch.rand(numel, generator=g) < 0.5, 1.0, -1.0)
    elif name == "close":  # magnitudes equal down to the last mantissa bits
        x = 1.0 + torch.randint(0, 64, (numel,), generator=g).float() * 2.0**-23
        x = x * torch.where(torch.rand(numel, generator=g) < 0.5, 1.0, -1.0)
    else:
        raise ValueError(name)
    return x.to(dtype)


PATTERNS = ["random", "ties", "few_levels", "zeros", "neg_zeros", "signed_zeros", "special", "close"]


# ------------------------------------------------------------------ fused path
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    "numel,group_size,k",
    [
        (2 * 1024 + 333, 1024, 103),  # block granularity, padded last group
        (5 * 40 + 17, 40, 4),  # many small groups per program
        (3 * 1003 + 500, 1003, 101),  # group size not a multiple of 8
    ],
)
def test_fused_matches_reference(pattern, numel, group_size, k):
    check(make(pattern, numel), group_size, k, torch.bfloat16)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("pattern", ["random", "special", "halfway"])
def test_fused_dtypes(dtype, value_dtype, pattern):
    check(make(pattern, 3 * 256 + 77, dtype), 256, 26, value_dtype)


@pytest.mark.parametrize(
    "numel,group_size,k",
    [
        (1000, 1000, 1000),  # sparsity 0: everything kept
        (1300, 1000, 1000),  # ... and a padded last group keeps all 300 real elements
        (1300, 1000, 1),  # a single survivor
        (100, 16, 20),  # k > group size: slots past the group stay 0
        (5, 1024, 103),  # one group, fewer real elements than k
        (96, 8, 3),  # the smallest block
        (7, 1, 1),  # group of one element
    ],
)
@pytest.mark.parametrize("pattern", ["random", "special", "zeros"])
def test_fused_edges(numel, group_size, k, pattern):
    check(make(pattern, numel), group_size, k, torch.float32)


def test_k_zero_and_empty():
    check(make("random", 300), 64, 0, torch.bfloat16)
    check(make("random", 300), 3000, 0, torch.bfloat16, tile=256)
    check(torch.empty(0, 4), 4, 1, torch.bfloat16)


def test_shapes_and_noncontiguous_input():
    x = make("random", 6 * 7 * 40).view(6, 7, 40).transpose(0, 2)  # not contiguous
    check(x, 7 * 6, 5, torch.bfloat16)


# ------------------------------------------------------------------ tiled path
# ``tile`` forces the multi-pass path with small tiles, so a group of a few thousand
# elements spans several programs (the library uses 4096-element tiles).
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    "numel,group_size,k,tile",
    [
        (2 * 3000 + 1234, 3000, 300, 512),  # padded last group
        (2 * 2003, 2003, 1002, 256),  # odd group size, half the group kept
    ],
)
def test_tiled_matches_reference(pattern, numel, group_size, k, tile):
    check(make(pattern, numel), group_size, k, torch.bfloat16, tile=tile)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value_dtype", FLOAT_DTYPES)
def test_tiled_dtypes(dtype, value_dtype):
    check(make("special", 2 * 1500 + 100, dtype), 1500, 150, value_dtype, tile=256)


@pytest.mark.parametrize(
    "numel,group_size,k",
    [
        (2 * 1000, 1000, 1000),  # sparsity 0
        (1000 + 300, 1000, 500),  # last group has fewer real elements than k
        (1000, 1000, 1),  # a single survivor
    ],
)
@pytest.mark.parametrize("pattern", ["random", "ties", "zeros"])
def test_tiled_edges(numel, group_size, k, pattern):
    check(make(pattern, numel), group_size, k, torch.float32, tile=128)


def test_tiled_by_default_for_large_groups():
    """A group over FUSED_MAX_GROUP takes the tiled path with the library's own TILE."""
    group_size = tk.FUSED_MAX_GROUP + 808  # 197 * 8 * 11 / 2: a sample-like odd size
    x = make("few_levels", 2 * group_size + 4321)
    check(x, group_size, group_size // 10 + 1, torch.bfloat16)


# ------------------------------------------------------------------ the library
@pytest.mark.parametrize("granularity", ["block", "sample"])
@pytest.mark.parametrize("value_dtype", ["bfloat16", "same"])
def test_razorpass_backend_triton_matches_torch(granularity, value_dtype):
    x = make("special", 4 * 3 * 197).view(4, 3, 197).to(DEVICE)
    kw = dict(sparsity=0.9, granularity=granularity, block_size=256, value_dtype=value_dtype)
    c_tri = razorpass.compress(x, backend="triton", **kw)
    c_ref = razorpass.compress(x, backend="torch", **kw)
    assert torch.equal(c_tri.mask, c_ref.mask)
    assert_same_bits(c_tri.values, c_ref.values, nan_payload=value_dtype == "same")
    assert_same_bits(
        razorpass.decompress(c_tri, backend="triton"),
        razorpass.decompress(c_ref, backend="torch"),
        nan_payload=value_dtype == "same",
    )


def test_offsets_layout_on_the_triton_kernel_matches_torch():
    """``razor::compress_offsets`` runs the Triton top-k, then the Triton conversion of
    its mask; both layouts decode to the same tensor."""
    from razorpass.kernels import ops

    x = make("special", 3 * 700).view(3, 700).to(DEVICE)
    off_tri, val_tri = ops.compress_offsets(x, 256, 8, torch.bfloat16, "triton")
    off_ref, val_ref = ops.compress_offsets(x, 256, 8, torch.bfloat16, "torch")
    assert off_tri.dtype == torch.int16 and torch.equal(off_tri, off_ref)
    assert_same_bits(val_tri, val_ref, nan_payload=False)
    mask, values = ops.compress(x, 256, 8, torch.bfloat16, "triton")
    assert_same_bits(ops.decompress_offsets(off_tri, val_tri, [3, 700], 256, torch.float32),
                     ops.decompress(mask, values, [3, 700], 256, torch.float32, "triton"), nan_payload=False)


def test_float64_is_rejected_clearly():
    x = torch.randn(64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        tk.triton_compress(x, 16, 2, torch.float64)
    mask, values = torch_compress(x, 16, 2, torch.float32)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        tk.triton_decompress(mask, values, [64], 16, torch.float64)
