"""The normal codebook (``quant_codebook="normal"``, ``razor::quantize_normal`` /
``razor::dequantize_normal``): the kernel bit for bit against the reference's own
implementation, edge groups, fewer bytes and a smaller error than uniform 3-bit codes
on standardized rows with outliers, the classes it codes, and whole models against the
reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from razorpass import RazorConfig, reference
from razorpass.kernels import ops
from razorpass.passes.codecs import CODECS
from razorpass.passes.records import QuantizedRoot
from razorpass.passes.vocab import Encoding

from .graphs import partition
from .test_policy import _close
from .test_stochastic_round import against_reference

razor = torch.ops.razor
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _roundtrip(x, group, bits):
    return ops.dequantize_normal(*ops.quantize_normal(x, group, bits), list(x.shape), group, bits, x.dtype)


def _same(a, b):
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,group", [((1,), 8), ((7,), 8), ((129,), 64), ((3, 5, 77), 64), ((2, 0, 3), 64),
                                         ((4, 300), 512)])
def test_the_kernel_is_the_reference_bit_for_bit(shape, group, bits, dtype):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    if x.numel() > 100:
        flat = x.view(-1)
        flat[[5, 9]] = torch.tensor([40.0, -40.0], dtype=dtype)  # outliers
        flat[70:78] = flat[70]  # ties of distance
    _same(_roundtrip(x, group, bits), reference.quantize_normal(x, group, bits))


def _same_parts(a, b):
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        if u.is_floating_point():
            _same(u, v)
        else:
            assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,group", [((1,), 8), ((129,), 64), ((3, 5, 77), 64), ((2, 0, 3), 64), ((4, 300), 512)])
def test_the_native_kernel_is_the_pytorch_kernel_bit_for_bit(shape, group, bits, dtype):
    g = torch.Generator().manual_seed(bits + 7)
    x = (torch.randn(shape, generator=g) * 2 - 1).to(dtype)
    if x.numel() > 100:
        flat = x.view(-1)
        flat[[3, 90]] = torch.tensor([math.nan, 30.0], dtype=dtype)
        flat[100:108] = flat[100]
    parts = ops.quantize_normal(x, group, bits, "torch")
    _same_parts(ops.quantize_normal(x, group, bits, "native"), parts)
    for out in DTYPES:
        _same(ops.dequantize_normal(*parts, list(shape), group, bits, out, "native"),
              ops.dequantize_normal(*parts, list(shape), group, bits, out, "torch"))
    _same(ops.quantize_normal(x.t() if x.dim() == 2 else x, group, bits, "native")[1],
          ops.quantize_normal((x.t() if x.dim() == 2 else x).contiguous(), group, bits, "torch")[1])


def test_parts_that_do_not_encode_the_shape_are_refused():
    parts = ops.quantize_normal(torch.randn(300), 64, 2)
    with pytest.raises(ValueError, match="do not encode shape"):
        ops.dequantize_normal(*parts, [400], 64, 2, torch.float32)
    with pytest.raises(ValueError, match="bits must be one of"):
        ops.quantize_normal(torch.randn(8), 64, 8)


def test_edge_groups():
    x = torch.cat([torch.full((64,), 0.75),  # constant: sigma 0, every element its mean
                   torch.randn(64), torch.randn(64), torch.randn(64)])
    x[64 + 3] = math.nan  # a NaN: the group decodes NaN
    x[128 + 5] = math.inf  # an infinity: NaN too
    y = _roundtrip(x, 64, 2)
    _same(y, reference.quantize_normal(x, 64, 2))
    assert torch.equal(y[:64], x[:64])
    assert y[64:192].isnan().all() and not y[192:].isnan().any()
    # the two elements farthest from the mean come back as their bfloat16 values
    z = torch.randn(256, generator=torch.Generator().manual_seed(1))
    z[[10, 200]] = torch.tensor([25.0, -31.0])
    w = _roundtrip(z, 256, 2)
    assert w[10] == 25.0 and w[200] == -31.0


def test_fewer_bytes_and_a_smaller_error_than_uniform_three_bit_codes_on_standardized_rows():
    """Rows of 384 standardized values with two outlier channels (a LayerNorm's x̂ in a
    transformer): 2-bit normal codes take 26% fewer bytes than 3-bit uniform ones and
    are closer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 384, generator=g)
    x[:, 17] += 12.0
    x[:, 301] -= 9.0
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    normal, uniform = CODECS[Encoding.GROUP_NORMAL], CODECS[Encoding.GROUP]
    assert normal.nbytes(x.numel(), 256, 2) < 0.75 * uniform.nbytes(x.numel(), 256, 3)
    err_normal = (_roundtrip(x, 256, 2) - x).norm()
    err_uniform = (ops.dequantize_group(*ops.quantize_group(x, 256, 3), [64, 384], 256, 3, torch.float32) - x).norm()
    assert err_normal < 0.8 * err_uniform


@pytest.mark.parametrize("opts,needle", [
    ({"quant_codebook": "lloyd"}, r"must be one of \('uniform', 'normal'\)"),
    ({"quant_codebook": "normal", "quant_bits": 8}, r"levels for quant_bits \(2, 3, 4\)"),
    ({"quant_codebook": "normal", "quant_rounding": "stochastic"}, "rounds between uniform levels"),
    ({"quant_codebook": "normal", "memory_budget": 0.1}, "chooses among uniform codes"),
])
def test_bad_combinations_are_refused(opts, needle):
    with pytest.raises(ValueError, match=needle):
        RazorConfig(**opts)


def test_layer_inputs_and_norms_take_the_normal_codebook_and_matmul_operands_stay_uniform():
    torch.manual_seed(0)
    params = [torch.randn(64, 32) / 6, torch.randn(64, 64) / 8, torch.randn(16, 64) / 8]

    def fn(w1, w2, w3, x):
        h = F.layer_norm(F.linear(x, w1), (64,))  # x̂: normal, and the next layer reads it
        q = F.linear(h, w2)
        a = torch.softmax(q @ q.transpose(-1, -2), -1) @ q  # matmul operands: uniform
        return F.linear(F.gelu(a), w3)  # a layer input: normal

    p = partition(fn, params, [torch.randn(2, 8, 32)], {"compiler": "eager", "quant_codebook": "normal",
                                                        "quant_bits": 2, "quant_group_size": 64})
    by_class = {r.op_classes: r.encoding for r in p.record.compressed if isinstance(r, QuantizedRoot)}
    assert by_class == {("layernorm", "linear"): Encoding.GROUP_NORMAL, ("matmul",): Encoding.GROUP,
                        ("linear",): Encoding.GROUP_NORMAL}
    assert len(p.calls("fw", razor.quantize_normal.default)) == 2
    assert len(p.calls("bw", razor.dequantize_normal.default)) == 2


# the eager inner compiler: the codec is an opaque op to Inductor like every other
# (test_stochastic_round runs an Inductor case), what it stores does not depend on it
@pytest.mark.parametrize(("name", "compiler"), [("bert", "eager"), ("cnn", "eager"), ("vit", "eager")])
def test_models_match_the_reference(name, compiler):
    cfg = RazorConfig(compiler=compiler, quant_codebook="normal", quant_bits=2)
    *_, got, ref, dense, records = against_reference(name, cfg, 0)
    assert records[0].fallback is None
    assert any(r.encoding is Encoding.GROUP_NORMAL for r in records[0].compressed)
    _close(got, ref, dense, rtol=1e-9)
