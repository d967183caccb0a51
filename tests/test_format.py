"""The compressed format: bit-exact against the independent eager reference."""

import pytest
import torch

import razorpass
from razorpass import RazorConfig
from razorpass.format import compressed_nbytes
from razorpass.reference import sparsify


def _cases():
    g = torch.Generator().manual_seed(0)
    ties = torch.ones(5, 37)
    ties[:, ::3] = -1.0
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -2.0, 0.5] * 13)
    zeros = torch.zeros(3, 41)
    return {
        "random": torch.randn(4, 9, 33, generator=g),
        "ties": ties,
        "special": special,
        "zeros": zeros,
        "neg_zero": -zeros,
        "tiny": torch.randn(3, generator=g),
    }


CASES = _cases()


def assert_bitwise_equal(a, b):
    """Equal bit for bit (so -0.0 != +0.0), except that any NaN equals any NaN: NaN
    payloads after a dtype conversion differ between PyTorch's own CPU code paths."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a[~nan].view(ints), b[~nan].view(ints))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("granularity,block", [("block", 16), ("block", 1024), ("sample", 1024)])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.9])
@pytest.mark.parametrize("value_dtype", ["bfloat16", "same"])
def test_decompress_equals_reference_bitwise(name, granularity, block, sparsity, value_dtype):
    x = CASES[name]
    cfg = RazorConfig(sparsity=sparsity, granularity=granularity, block_size=block, value_dtype=value_dtype)
    c = razorpass.compress(x, sparsity=sparsity, granularity=granularity, block_size=block, value_dtype=value_dtype)
    d = razorpass.decompress(c)
    ref = sparsify(x, cfg)
    assert_bitwise_equal(d, ref)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("granularity", ["block", "sample"])
def test_native_cpu_kernel_equals_pytorch_kernel(name, granularity):
    x = CASES[name]
    group = 16 if granularity == "block" else max(1, x.numel() // x.shape[0])
    _assert_native_equals_pytorch(x, group, RazorConfig(sparsity=0.6).keep_count(group))


def _assert_native_equals_pytorch(x, group, k):
    """The native CPU kernel ("auto" on CPU) against the PyTorch kernel, both ways."""
    from razorpass.kernels import ops
    from razorpass.kernels import topk_compress_cpu

    assert topk_compress_cpu.load() is not None, "the native CPU kernel did not build"
    m1, v1 = ops.compress(x, group, k, torch.bfloat16, "torch")
    m2, v2 = ops.compress(x, group, k, torch.bfloat16, "auto")
    assert torch.equal(m1, m2)
    assert_bitwise_equal(v1, v2)
    d1 = ops.decompress(m1, v1, list(x.shape), group, x.dtype, "torch")
    d2 = ops.decompress(m2, v2, list(x.shape), group, x.dtype, "auto")
    assert_bitwise_equal(d1, d2)


def _selection_cases():
    """Inputs that drive every branch of the native kernel's selection: a threshold bin
    kept whole or split (nth_element), ties inside the group, a ReLU-like majority of
    zeros, magnitudes spread over many exponents, reduced-precision inputs."""
    g = torch.Generator().manual_seed(1)
    return {
        "randn": torch.randn(7, 333, generator=g),
        "relu": torch.relu(torch.randn(5, 1000, generator=g)),
        "small_ints": torch.randint(-3, 4, (6, 517), generator=g).float(),
        "quarters": (torch.randn(4, 2048, generator=g) * 4).round() / 4,
        "wide_range": torch.randn(2, 5000, generator=g) * torch.logspace(-30, 30, 5000),
        "bf16": torch.randn(3, 1001, generator=g).bfloat16(),
        "fp16": torch.randn(3, 999, generator=g).half(),
    }


SELECTION_CASES = _selection_cases()


@pytest.mark.parametrize("name", list(SELECTION_CASES))
@pytest.mark.parametrize("group", [8, 1000, 1024, 4096])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97, 0.999])
def test_native_cpu_kernel_selection_paths(name, group, sparsity):
    _assert_native_equals_pytorch(SELECTION_CASES[name], group, RazorConfig(sparsity=sparsity).keep_count(group))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_activation_dtypes(dtype):
    x = torch.randn(6, 50).to(dtype)
    cfg = RazorConfig(sparsity=0.8, block_size=64, value_dtype="same")
    d = razorpass.decompress(razorpass.compress(x, sparsity=0.8, block_size=64, value_dtype="same"))
    assert_bitwise_equal(d, sparsify(x, cfg))


def test_mask_bits_and_value_order_follow_the_format():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, 0.0, -0.3, 0.0, 7.0, 0.05])
    c = razorpass.compress(x, sparsity=0.75, block_size=8, value_dtype="float32")
    # block 0 = x[0:8], k = 2: |-5| and |3| at positions 1 and 3 -> byte 0b00001010
    # block 1 = x[8:10] + padding, k = 2: positions 0 and 1 (7.0, 0.05)
    assert c.mask.tolist() == [[0b00001010], [0b00000011]]
    assert c.values.tolist() == [[-5.0, 3.0], [7.0, 0.05000000074505806]]


def test_padding_never_wins_and_ties_go_to_lower_index():
    x = torch.full((10,), 2.0)
    c = razorpass.compress(x, sparsity=0.5, block_size=8, value_dtype="float32")
    # k = 4 per block: block 0 keeps positions 0..3; block 1 has 2 real elements, both kept
    assert c.mask.tolist() == [[0b00001111], [0b00000011]]
    assert c.values[1].tolist() == [2.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("shape", [(2, 3, 7), (5, 1000), (1,), (3, 8, 8)])
@pytest.mark.parametrize("granularity", ["block", "sample"])
def test_nbytes_is_the_analytic_size(shape, granularity):
    x = torch.randn(shape)
    cfg = RazorConfig(granularity=granularity, block_size=64)
    c = razorpass.compress(x, granularity=granularity, block_size=64)
    assert c.nbytes == compressed_nbytes(shape, cfg, x.dtype)


def test_bytes_per_element_at_90_percent_bf16():
    x = torch.randn(64, 1024)
    c = razorpass.compress(x, sparsity=0.9)
    # 1 bit of mask + ceil(0.1 * 1024) = 103 bf16 values per 1024 elements
    assert c.nbytes / x.numel() == pytest.approx((1024 / 8 + 103 * 2) / 1024)


def test_opcheck():
    from razorpass.kernels import ops

    x = torch.randn(3, 40)
    torch.library.opcheck(ops.compress, (x, 16, 5, torch.bfloat16))
    mask, values = ops.compress(x, 16, 5, torch.bfloat16)
    torch.library.opcheck(ops.decompress, (mask, values, [3, 40], 16, torch.float32))


@pytest.mark.parametrize("granularity", ["block", "sample"])
@pytest.mark.parametrize("view", ["heads", "keys_transposed"])
def test_native_kernel_reads_permuted_views_in_logical_order(granularity, view):
    from razorpass.kernels import ops

    base = torch.randn(2, 37, 3, 8)
    # (2, 3, 37, 8): the q/k/v layout of attention (innermost dim contiguous);
    # (2, 3, 8, 37): kᵀ (innermost dim strided)
    x = base.transpose(1, 2) if view == "heads" else base.permute(0, 2, 3, 1)
    group = 16 if granularity == "block" else x.numel() // x.shape[0]
    k = RazorConfig(sparsity=0.7).keep_count(group)
    m1, v1 = ops.compress(x.contiguous(), group, k, torch.bfloat16, "torch")
    m2, v2 = ops.compress(x, group, k, torch.bfloat16, "auto")
    assert torch.equal(m1, m2) and torch.equal(v1, v2)


@pytest.mark.parametrize("group_size,k", [(0, 0), (-8, 1), (8, 9)])
def test_ops_refuse_impossible_groups_before_any_kernel_runs(group_size, k):
    from razorpass.kernels import ops

    with pytest.raises(ValueError, match="group_size > 0"):
        ops.compress(torch.randn(3, 16), group_size, k, torch.bfloat16)
    with pytest.raises(ValueError, match="group_size > 0"):
        ops.decompress(torch.zeros(1, 1, dtype=torch.uint8), torch.zeros(1, k, dtype=torch.bfloat16), [3, 16],
                       group_size, torch.float32)
