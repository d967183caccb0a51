"""The quantizers' generated form (``razorpass.kernels.fused_quantize``): plain ops that
a compiler fuses into the kernels around the codec, bit-identical to the PyTorch kernel
(the definition) as written and as Inductor's C++ backend compiles them, on the edge
cases the native kernels are tested on."""

import math

import pytest
import torch

from razorpass.kernels import fused_quantize as fq
from razorpass.kernels import quantize

BITS = [2, 3, 4, 8]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _sample(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + 0.3 * scale).to(dtype)


def _edges(group: int, bits: int) -> torch.Tensor:
    """Ties between two levels, signed zeros, subnormals, NaN and infinities, a constant
    group, large values: one group of each, then a partial group."""
    top = 2**bits - 1
    ties = torch.arange(group, dtype=torch.float32) % top + 0.5
    ties[0], ties[1] = 0.0, float(top)  # bounds 0 and top: step exactly 1
    zeros = torch.tensor([0.0, -0.0] * (group // 2))
    zeros[group // 2] = 1.0
    negzero = torch.tensor([-0.0, -1.0] * (group // 2))  # a -0 max
    signed = torch.tensor([-0.0, 0.0] * (group // 2)) + torch.arange(group) % 3
    tiny = torch.full((group,), 1e-40) * (torch.arange(group) - group // 2)
    special = _sample((group,), torch.float32, 5)
    special[group // 3], special[group // 2] = math.inf, -math.inf
    nan = _sample((group,), torch.float32, 6)
    nan[group - 1] = math.nan
    constant = torch.full((group,), 0.75)
    huge = torch.tensor([3.39e38, -3.395e38, 3.3e38, -1.0] * (group // 4))  # beyond bfloat16's range
    body = [ties, zeros, negzero, signed, tiny, special, nan, constant, huge, _sample((group,), torch.float32, 7, 1e4)]
    return torch.cat(body + [_sample((group // 2 + 3,), torch.float32, 8)])


def _same_bounds(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit patterns equal (the sign of a zero too); a NaN is a NaN, whatever its payload."""
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


def _same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    ok = ~a.isnan()
    assert torch.equal(a[ok].view(-1).view(torch.uint8), b[ok].view(-1).view(torch.uint8))


def _forms(fn, compiled: bool):
    if not compiled:
        return fn
    torch._dynamo.reset()
    return torch.compile(fn, backend="inductor", dynamic=False, fullgraph=True)


# The edge cases compile vectorized, as users' kernels do (conftest.py); the other
# tests compile the suite's scalar kernels (on CPU, codec_form="auto" keeps the
# quantizers' kernels: their generated form is opt-in there).
@pytest.mark.vectorized
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("bits", BITS)
def test_group_codec_edges(bits, compiled):
    group = 16 if bits == 8 else 24  # 24: 3-bit groups of 9 bytes, codes straddle them
    x = _edges(group, bits)
    want_codes, want_bounds = quantize.torch_quantize_group(x, group, bits)
    codes, bounds = _forms(lambda t: fq.fused_quantize_group(t, group, bits), compiled)(x)
    assert torch.equal(codes, want_codes)
    _same_bounds(bounds, want_bounds)
    # one compiled graph decodes to every dtype (one compile instead of three)
    decode = _forms(lambda c, b: [fq.fused_dequantize_group(c, b, [x.numel()], group, bits, d) for d in DTYPES],
                    compiled)
    for dtype, got in zip(DTYPES, decode(want_codes, want_bounds), strict=True):
        _same_values(got, quantize.torch_dequantize_group(want_codes, want_bounds, [x.numel()], group, bits, dtype))


_SHAPES = [(1,), (7,), (129,), (3, 5, 7), (4, 1, 13, 33)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,compiled", [(s, False) for s in _SHAPES] + [((4, 1, 13, 33), True)],
                         ids=lambda v: str(v) if isinstance(v, tuple) else ("inductor" if v else "eager"))
def test_group_codec_shapes_and_dtypes(shape, dtype, compiled):
    bits, group = 3, 64
    x = _sample(shape, dtype, seed=sum(shape))
    want_codes, want_bounds = quantize.torch_quantize_group(x, group, bits)
    codes, bounds = _forms(lambda t: fq.fused_quantize_group(t, group, bits), compiled)(x)
    assert torch.equal(codes, want_codes) and torch.equal(bounds, want_bounds)
    got = _forms(lambda c, b: fq.fused_dequantize_group(c, b, list(shape), group, bits, dtype), compiled)(
        codes, bounds)
    _same_values(got, quantize.torch_dequantize_group(codes, bounds, list(shape), group, bits, dtype))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_non_contiguous_input_and_a_producer_in_the_same_kernel(compiled):
    """A transposed input, and an encode behind the op that produced its input (what the
    compiler fuses): the codes of the produced values. (float32: a bfloat16 producer
    fused with the encode is not rounded to bfloat16 first, so ``inline_codecs``
    generates float32 codecs only; ``test_passes.py`` checks that it leaves the others.)"""
    x = _sample((24, 40), torch.float32, 2)
    want = quantize.torch_quantize_group(torch.nn.functional.gelu(x.t()), 64, 3)
    got = _forms(lambda t: fq.fused_quantize_group(torch.nn.functional.gelu(t.t()), 64, 3), compiled)(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("xdtype,cdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16-fp32"])
def test_centered_codec(xdtype, cdtype, compiled):
    x = _sample((4, 6, 5, 7), xdtype, 3, scale=3.0)
    center = _sample((6,), cdtype, 4)
    want = quantize.torch_quantize_group(x - center.view(1, -1, 1, 1), 64, 3)
    got = _forms(lambda t, c: fq.fused_quantize_group_centered(t, c, 64, 3), compiled)(x, center)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.vectorized
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("bits", BITS)
def test_uniform_encode(bits, compiled):
    lo, hi = quantize.GELU_DERIVATIVE_RANGE["none"]
    x = torch.cat([_edges(24, bits), torch.tensor([lo, hi, -0.0, 0.5, 1.2, -0.2])])
    sizes = (x.numel(), x.numel() - 3, 1)  # a partial last word; the three in one compiled graph
    got = _forms(lambda *ts: [fq.fused_quantize_uniform(t, bits, lo, hi) for t in ts], compiled)(
        *(x[:n].clone() for n in sizes))
    for n, codes in zip(sizes, got, strict=True):
        assert torch.equal(codes, quantize.torch_quantize_uniform(x[:n], bits, lo, hi)), n


def _grads_and_saved(build, inputs, form: str, autocast: bool):
    import razorpass

    from .models import loss_of

    torch.manual_seed(0)
    model = build()
    torch._dynamo.reset()
    compiled = razorpass.compile(model, codec_form=form)
    with razorpass.record_compiles() as records, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss_of(compiled(*inputs)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, [([(t.shape, t.dtype, t.nbytes) for t in r.saved], r.count("inline_codecs")) for r in records]


@pytest.mark.parametrize("name,autocast", [("mlp", False), ("cnn", False), ("mlp", True)],
                         ids=["mlp-fp32", "cnn-fp32", "mlp-bf16"])
def test_a_model_trains_the_same_with_either_form(name, autocast):
    """The whole defaults on a model (Linear, GELU and ReLU on the MLP; conv, BatchNorm
    and ReLU6 on the CNN): the generated form gives the kernels' gradients bit for bit
    and saves the same bytes; it did inline the quantizers."""
    from .models import MLP, SmallCNN

    torch.manual_seed(1)
    build, inputs = {"mlp": (MLP, (torch.randn(4, 3, 24),)), "cnn": (SmallCNN, (torch.randn(2, 3, 12, 12),))}[name]
    k_grads, k_saved = _grads_and_saved(build, inputs, "kernel", autocast)
    g_grads, g_saved = _grads_and_saved(build, inputs, "generated", autocast)
    assert k_grads.keys() == g_grads.keys() and k_grads
    for n in k_grads:
        assert torch.equal(k_grads[n], g_grads[n]), n
    assert [s for s, _ in k_saved] == [s for s, _ in g_saved]
    assert all(i == 0 for _, i in k_saved) and any(i > 0 for _, i in g_saved)
