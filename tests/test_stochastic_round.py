"""Stochastic rounding of the per-group codes (``quant_rounding="stochastic"``,
``razor::quantize_group_stochastic``, the ``stochastic_round`` pass).

The kernels agree bit for bit with each other and with the reference's own numpy
implementation of the rule; the decoded tensor is unbiased (its mean over seeds
converges to the input at the rate its variance allows, where rounding to nearest
stays off); the pass rewrites every per-group code and draws one seed per step; whole
models match the reference under the same ``torch.manual_seed``, and a step replayed
from a saved RNG state gives the same gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import razorpass
from razorpass import RazorConfig, reference
from razorpass.kernels import ops
from razorpass.kernels.quantize import group_quantized_shapes

from .graphs import partition
from .models import loss_of
from .test_policy import _close, _double

razor = torch.ops.razor
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _sample(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)


def _decoded(x, seed, group, bits, backend="auto"):
    codes, bounds = ops.quantize_group_stochastic(x, torch.tensor(seed), group, bits, backend)
    return ops.dequantize_group(codes, bounds, list(x.shape), group, bits, x.dtype, backend)


# ---------------------------------------------------------------- the codec


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (129,), (3, 5, 77), (2, 0, 3)])
def test_kernels_and_the_reference_agree_bit_for_bit(shape, bits, dtype):
    x = _sample(shape, dtype, seed=bits)
    if x.numel() > 100:
        x.view(-1)[[3, 60]] = torch.tensor([math.nan, 0.0], dtype=dtype)  # a NaN group, a zero
    seed = torch.tensor(2**40 + 12345)
    native = ops.quantize_group_stochastic(x, seed, 64, bits, "native")
    plain = ops.quantize_group_stochastic(x, seed, 64, bits, "torch")
    assert torch.equal(native[0], plain[0])
    assert torch.equal(native[1].isnan(), plain[1].isnan())
    assert torch.equal(native[1].nan_to_num(), plain[1].nan_to_num())
    # the bounds are those of rounding to nearest: only the levels differ
    assert torch.equal(plain[1].nan_to_num(), ops.quantize_group(x, 64, bits, "torch")[1].nan_to_num())
    dec = ops.dequantize_group(*plain, list(shape), 64, bits, dtype, "torch")
    ref = reference.quantize_group(x, 64, bits, seed=12345)  # the low 32 bits of the seed count
    assert torch.equal(dec.isnan(), ref.isnan())
    assert torch.equal(dec.nan_to_num(), ref.nan_to_num())


def test_the_seed_decides_the_codes():
    x = _sample((4096,), torch.float32)
    a, b, c = (ops.quantize_group_stochastic(x, torch.tensor(s), 256, 2)[0] for s in (1, 1 + 2**32, 2))
    assert torch.equal(a, b)  # the seed's low 32 bits
    flipped = (a != c).float().mean().item()
    assert 0.3 < flipped < 0.9  # another seed: other codes for many elements (of 4 per byte)


def test_the_decoded_tensor_is_unbiased_and_nearest_is_not():
    """The mean of R decodes under R seeds is within 5 standard errors of ``x`` for
    every element (the variance of a code is ``step**2 p (1 - p)``, ``p`` the element's
    fractional level); rounding to nearest, the same for every seed, is off by more at
    most elements."""
    x = _sample((2048,), torch.float32, seed=3)
    group, bits, draws = 256, 2, 400
    mean = sum(_decoded(x, s, group, bits).double() for s in range(draws)) / draws
    _, bounds = ops.quantize_group(x, group, bits)
    b = bounds.view(-1, 2).double()
    lo = b[:, 0].repeat_interleave(group)
    step = ((b[:, 1] - b[:, 0]) / (2**bits - 1)).repeat_interleave(group)
    p = ((x.double() - lo) / step).frac()
    se = (step**2 * p * (1 - p) / draws).sqrt()
    z = (mean - x.double()).abs() / se.clamp_min(1e-12)
    assert z.max().item() < 5.5
    nearest = ops.dequantize_group(*ops.quantize_group(x, group, bits), [2048], group, bits, torch.float32)
    z_nearest = (nearest.double() - x.double()).abs() / se.clamp_min(1e-12)
    assert (z_nearest > 5.5).float().mean().item() > 0.5


def test_the_noise_is_uniform():
    """The noise ``u`` of 2**16 consecutive elements under one seed, from the reference:
    16 equal bins within 5 standard deviations of their expected count."""
    u = reference.stochastic_noise(7, 1 << 16)
    assert u.dtype == torch.float32 and 0 <= u.min().item() and u.max().item() < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = (1 << 16) / 16
    assert ((counts - expected).abs() < 5 * math.sqrt(expected * 15 / 16)).all()


@pytest.mark.parametrize("seed,needle", [(torch.tensor(1.0), "int64"), (torch.tensor([1, 2]), "one element")])
def test_a_bad_seed_is_refused(seed, needle):
    with pytest.raises(ValueError, match=needle):
        ops.quantize_group_stochastic(torch.randn(64), seed, 64, 2)


def test_the_fake_kernel_gives_the_codes_of_quantize_group():
    x = torch.empty(3, 100, device="meta")
    codes, bounds = ops.quantize_group_stochastic(x, torch.tensor(0, device="meta"), 64, 3)
    assert (tuple(codes.shape), tuple(bounds.shape)) == tuple(
        (s[0],) for s in group_quantized_shapes(300, 64, 3))


# ---------------------------------------------------------------- config and pass


def test_config_names_the_rounding():
    assert RazorConfig().quant_rounding == "nearest"
    assert RazorConfig(quant_rounding="stochastic").quant_rounding == "stochastic"
    with pytest.raises(ValueError, match=r"RazorConfig.quant_rounding must be one of \('nearest', 'stochastic'\)"):
        RazorConfig(quant_rounding="random")
    with pytest.raises(ValueError, match="needs policy='accurate'"):
        RazorConfig(quant_rounding="stochastic", policy="backrazor")


def _ln_mlp(w1, w2, w3, x):
    h = F.gelu(F.linear(x, w1))  # read linearly by w2's weight gradient: rounded stochastically
    g = F.layer_norm(F.linear(h, w2), (64,))  # x̂, read by the norm and by w3's layer: to nearest
    return F.linear(torch.relu(g), w3)


def test_the_pass_rounds_linearly_read_codes_stochastically_and_draws_one_seed():
    torch.manual_seed(0)
    params = [torch.randn(48, 32) / 6, torch.randn(64, 48) / 7, torch.randn(16, 64) / 8]
    inputs = [torch.randn(8, 32)]
    cfg = {"compiler": "eager", "quant_rounding": "stochastic"}
    p = partition(_ln_mlp, params, inputs, cfg)
    off = partition(_ln_mlp, params, inputs, cfg, off="stochastic_round")
    nearest = partition(_ln_mlp, params, inputs, {"compiler": "eager"})
    roots = {r.root: r.op_classes for r in nearest.record.compressed}
    assert sorted(map(tuple, roots.values())) == [("layernorm", "linear"), ("linear",)]
    assert len(nearest.calls("fw", razor.quantize_group.default)) == 2
    (sr,) = p.calls("fw", razor.quantize_group_stochastic.default)
    (kept,) = p.calls("fw", razor.quantize_group.default)
    assert p.record.count("stochastic_round") == 1
    assert roots[sr.args[0].name] == ("linear",) and "layernorm" in roots[kept.args[0].name]
    (seed,) = p.calls("fw", torch.ops.aten.randint.low)
    assert seed.args[:2] == (0, 2**31) and seed.kwargs["dtype"] == torch.int64
    # the backward and what crosses to it are the ones of rounding to nearest
    assert [n.target for n in p.bw.graph.nodes] == [n.target for n in nearest.bw.graph.nodes]
    for a, b in zip(off.grads, nearest.grads, strict=True):  # switched off: rounding to nearest
        assert torch.equal(a, b)
    assert torch.equal(p.grads[0], nearest.grads[0])  # w1 reads the batch, held by the caller
    assert not torch.equal(p.grads[1], nearest.grads[1])  # w2 reads the stochastic code


# ---------------------------------------------------------------- models


def _step(model, inputs, fn, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = fn(*inputs)
    loss_of(out).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def against_reference(name, cfg, seed):
    """(model, inputs, compiled model, its gradients, the reference's, the dense ones,
    the compile records) of one step of test model ``name`` in float64 under ``seed``."""
    model, inputs = _double(name)
    dense = _step(model, inputs, model, 0)
    with reference.apply(model, cfg):
        ref = _step(model, inputs, model, seed)
    compiled = razorpass.compile(model, cfg, fullgraph=True)
    with razorpass.record_compiles() as records:
        got = _step(model, inputs, compiled, seed)
    return model, inputs, compiled, got, ref, dense, records


@pytest.mark.parametrize(("name", "compiler"), [("bert", "eager"), ("cnn", "eager"), ("mlp", "inductor")])
def test_models_match_the_reference_under_the_same_seed(name, compiler):
    cfg = RazorConfig(compiler=compiler, quant_rounding="stochastic", quant_bits=2)
    model, inputs, compiled, got, ref, dense, records = against_reference(name, cfg, 11)
    assert records[0].fallback is None and records[0].count("stochastic_round") > 0
    _close(got, ref, dense, rtol=1e-9)
    # the same seed again (a run resumed from its RNG state): the same gradient, bit for bit
    again = _step(model, inputs, compiled, 11)
    assert all(torch.equal(got[k], again[k]) for k in got)
    other = _step(model, inputs, compiled, 12)
    assert any(not torch.equal(got[k], other[k]) for k in got)


def test_a_step_replayed_from_a_saved_rng_state_is_the_same():
    model, inputs = _double("mlp")
    compiled = razorpass.compile(model, RazorConfig(compiler="eager", quant_rounding="stochastic"), fullgraph=True)
    torch.manual_seed(3)
    _step(model, inputs, compiled, 3)
    state = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    loss_of(compiled(*inputs)).backward()
    first = [p.grad.clone() for p in model.parameters()]
    torch.set_rng_state(state)
    model.zero_grad(set_to_none=True)
    loss_of(compiled(*inputs)).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters(), strict=True))


def test_the_mean_weight_gradient_over_steps_converges_to_the_dense_one():
    """The last layer's weight gradient is ``dYᵀ · decode(x)`` with ``dY`` exact: over R
    seeds its mean tends to the dense gradient (unbiased), while rounding to nearest
    keeps one error at every step."""
    torch.manual_seed(0)
    w1, w2, x = torch.randn(64, 32) / 6, torch.randn(16, 64) / 8, torch.randn(64, 32)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(64, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[2].weight.copy_(w2)
    opts = {"compiler": "eager", "quant_bits": 2, "targets": ("linear",)}
    dense = _step(model, (x,), model, 0)["2.weight"]
    near = _step(model, (x,), razorpass.compile(model, RazorConfig(**opts)), 0)["2.weight"]
    sr = razorpass.compile(model, RazorConfig(**opts, quant_rounding="stochastic"))
    mean = sum(_step(model, (x,), sr, s)["2.weight"] for s in range(64)) / 64
    err_near = ((near - dense).norm() / dense.norm()).item()
    err_mean = ((mean - dense).norm() / dense.norm()).item()
    assert err_near > 0.02 and err_mean < err_near / 3
