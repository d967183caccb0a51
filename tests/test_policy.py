"""The default "accurate" policy against Back Razor's rule ("backrazor"), one option away.

Accurate: linear / conv / matmul / layernorm / batchnorm tensors are quantized per group
(``quant_bits``, ``quant_group_size``), the softmax output is top-k sparsified (and so is
P of P·V, which shares that tensor), the GELU stores its 3-bit derivative.

Gradients are compared in float64: the compiled graph computes the forward in a
different order than eager (decomposed LayerNorm, fused kernels), and in float32 that
moves a value across a quantization boundary now and then (one element off by one
step). In float64 those differences are ~1e-16 and vanish in the float32 cast the
quantizer starts with, so compiled and reference gradients are equal up to float64
rounding; under bfloat16 autocast the bf16 cast absorbs them the same way.
"""

import dataclasses
import math

import pytest
import torch

import razorpass
from razorpass import RazorConfig, reference
from razorpass.config import BACKRAZOR_TARGETS, DEFAULT_TARGETS
from razorpass.passes.records import CompressedRoot, QuantizedDerivative, QuantizedRoot

from .test_gradients import CASES, _run
from .test_matrix import MODELS
from .test_matrix import _run as _run_hf

# ---------------------------------------------------------------- config


def test_default_is_the_accurate_policy():
    cfg = RazorConfig()
    assert (cfg.policy, cfg.quant_bits, cfg.quant_group_size, cfg.targets, cfg.gelu_encoding) == (
        "accurate", 3, 256, None, None)
    assert cfg.target_classes == DEFAULT_TARGETS and {"gelu", "batchnorm"} <= set(cfg.target_classes)
    assert cfg.gelu_mode == "deriv3" and cfg.gelu_derivative_bits == 3
    assert {c: cfg.encoding_of(c) for c in ("linear", "conv", "matmul", "layernorm", "batchnorm", "softmax")} == {
        "linear": "quant", "conv": "quant", "matmul": "quant", "layernorm": "quant", "batchnorm": "quant",
        "softmax": "topk"}


def test_backrazor_is_one_option_away_and_replace_re_resolves():
    br = RazorConfig(policy="backrazor")
    assert br.target_classes == BACKRAZOR_TARGETS and "gelu" not in br.target_classes
    assert br.gelu_mode == "topk" and br.gelu_derivative_bits is None
    assert all(br.encoding_of(c) == "topk" for c in DEFAULT_TARGETS)
    # the policy's defaults are resolved when read, so replacing the policy changes them
    assert dataclasses.replace(RazorConfig(), policy="backrazor").target_classes == BACKRAZOR_TARGETS
    assert RazorConfig.from_options(RazorConfig(), policy="backrazor").gelu_mode == "topk"
    # explicit choices win over the policy's
    cfg = RazorConfig(policy="backrazor", targets=("linear", "gelu"), gelu_encoding="deriv2")
    assert cfg.target_classes == ("linear", "gelu") and cfg.gelu_mode == "deriv2"


@pytest.mark.parametrize("field,value,needle", [
    ("policy", "fast", "('accurate', 'backrazor')"),
    ("quant_bits", 5, "(2, 3, 4, 8)"),
    ("quant_bits", True, "(2, 3, 4, 8)"),
    ("quant_group_size", 12, "multiple of 8"),
    ("quant_group_size", 0, "multiple of 8"),
])
def test_bad_policy_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError) as e:
        RazorConfig(**{field: value})
    assert f"RazorConfig.{field}" in str(e.value) and needle in str(e.value)


# ---------------------------------------------------------------- gradients


def _double(name):
    torch.manual_seed(0)
    model, inputs = CASES[name][0]()
    model.train().double()
    return model, tuple(i.double() if i.is_floating_point() else i for i in inputs)


def _close(got, ref, dense, rtol):
    assert ref.keys() == got.keys()
    top = max(g.abs().max().item() for g in ref.values())
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=rtol * top, msg=lambda m: f"{k}: {m}")
    gap = max((dense[k] - ref[k]).abs().max().item() for k in ref) / top
    assert gap > 1000 * rtol, "the policy had no visible effect"


@pytest.mark.parametrize(("name", "compiler"), [("nanogpt", "eager"), ("vit", "eager"), ("bert", "eager"),
                                               ("cnn", "eager"), ("mlp", "eager"), ("nanogpt", "inductor"),
                                               ("cnn", "inductor")])
def test_default_gradients_equal_the_reference(name, compiler):
    model, inputs = _double(name)
    cfg = RazorConfig(compiler=compiler)
    dense = _run(model, inputs, model)
    with reference.apply(model, cfg):
        ref = _run(model, inputs, model)
    with razorpass.record_compiles() as records:
        got = _run(model, inputs, razorpass.compile(model, cfg, fullgraph=True))
    (rec,) = records
    assert rec.fallback is None and rec.excluded_roots == []
    assert any(isinstance(c, QuantizedRoot) for c in rec.compressed)
    _close(got, ref, dense, rtol=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_quant_bits_reach_kernels_and_reference(bits):
    model, inputs = _double("bert")
    cfg = RazorConfig(compiler="eager", quant_bits=bits, quant_group_size=64)
    dense = _run(model, inputs, model)
    with reference.apply(model, cfg):
        ref = _run(model, inputs, model)
    with razorpass.record_compiles() as records:
        got = _run(model, inputs, razorpass.compile(model, cfg, fullgraph=True))
    quant = [c for c in records[0].compressed if isinstance(c, QuantizedRoot)]
    assert quant and {(c.bits, c.group_size) for c in quant} == {(bits, 64)}
    _close(got, ref, dense, rtol=1e-9)


def _random_norm_affine(model):
    """γ, β of every LayerNorm / BatchNorm drawn at random: at γ = 1, β = 0 (a fresh
    model) a code of a norm's output and the output computed from a code of x̂ agree,
    and the test could not tell which one a layer after the norm reads."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)


@pytest.mark.parametrize("model_name", ["vit-eager", "bert-sdpa", "gpt2-eager", "lora-bert", "cnn"])
def test_default_on_hugging_face_models_equals_the_reference(model_name):
    build, _, _ = MODELS[model_name]
    torch.manual_seed(0)
    model, inputs = build()
    _random_norm_affine(model)
    model.train().double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    cfg = RazorConfig(compiler="eager")
    dense = _run_hf(model, model, inputs, False)
    with reference.apply(model, cfg):
        ref = _run_hf(model, model, inputs, False)
    with razorpass.record_compiles() as records:
        got = _run_hf(model, razorpass.compile(model, cfg), inputs, False)
    assert records and all(r.fallback is None and r.excluded_roots == [] for r in records)
    _close(got, ref, dense, rtol=1e-7)  # float64 sums in another order over larger models


@pytest.mark.parametrize("model_name", ["vit-eager", "bert-eager", "gpt2-eager"])
def test_default_under_bf16_autocast_matches_the_reference(model_name):
    build, _, _ = MODELS[model_name]
    torch.manual_seed(0)
    model, inputs = build()
    _random_norm_affine(model)
    model.train()
    cfg = RazorConfig(compiler="eager")
    with reference.apply(model, cfg):
        ref = _run_hf(model, model, inputs, True)
    with razorpass.record_compiles() as records:
        got = _run_hf(model, razorpass.compile(model, cfg), inputs, True)
    assert records and all(r.fallback is None for r in records)
    quant = [c for r in records for c in r.compressed if isinstance(c, QuantizedRoot)]
    assert quant and all(c.dtype in (torch.bfloat16, torch.float32) for c in quant)
    for k in ref:
        if ref[k].norm() > 0:
            err = ((got[k].float() - ref[k].float()).norm() / ref[k].float().norm()).item()
            assert err < 4e-3, f"{k}: relative error {err:.3g}"


# ---------------------------------------------------------------- memory


def test_saved_bytes_are_codes_and_bounds():
    """Each quantized root saves ceil(n / G) * G * bits / 8 code bytes and 2 * groups
    bfloat16 bounds instead of itself; each softmax output its top-k; each GELU its
    3-bit derivative; nothing of activation size stays dense."""
    torch.manual_seed(0)
    model, inputs = CASES["vit"][0]()
    with razorpass.record_compiles() as records:
        _run(model, inputs, razorpass.compile(model, compiler="eager", fullgraph=True))
    (rec,) = records
    saved = {e.name: e for e in rec.saved}
    kinds = set()
    for c in rec.compressed:
        n = math.prod(c.shape)
        kinds.add(type(c).__name__)
        if isinstance(c, QuantizedRoot):
            codes, bounds = (saved[o] for o in c.outputs)
            g, bits = RazorConfig().quant_group_size, RazorConfig().quant_bits
            groups = -(-n // g)
            assert (codes.shape, codes.dtype) == ((groups * g * bits // 8,), torch.uint8)
            assert (bounds.shape, bounds.dtype) == ((2 * groups,), torch.bfloat16)
        else:
            assert isinstance(c, CompressedRoot) and "softmax" in c.op_classes
        assert c.root not in saved
    assert kinds == {"QuantizedRoot", "CompressedRoot"}
    assert all(isinstance(q, QuantizedDerivative) and q.bits == 3 for q in rec.quantized) and rec.quantized
    dense = [e for e in rec.saved if e.op_class == "dense" and not e.input]
    assert all(e.shape[-1] == 1 for e in dense)  # LayerNorm statistics only


def test_memory_report_counts_the_quantized_bytes():
    torch.manual_seed(0)
    model, inputs = CASES["bert"][0]()
    rep = razorpass.memory_report(model, inputs, compiler="eager")  # the same partition as Inductor's
    old = razorpass.memory_report(model, inputs, {"policy": "backrazor", "compiler": "eager"})
    assert rep.baseline_bytes == old.baseline_bytes
    # the GELU input (dense under Back Razor) is now 3 bits: less saved in all
    assert rep.saved_bytes < old.saved_bytes < rep.baseline_bytes


@pytest.mark.parametrize("special", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_activation_makes_its_group_nan_never_finite(special):
    """A group holding a NaN or an infinity decodes to NaN (the dense weight gradient
    would hold NaN / inf there too): never a finite value that hides it. fc2's input is
    4 x 16 = 64 elements, one group of 64: every weight-gradient entry turns NaN."""
    from .test_robustness import TwoLayer, _loss_without_row_1
    from .test_robustness import _run as _run_r

    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(4, 16)
    x[1, 3] = special
    cfg = RazorConfig(compiler="eager", targets=("linear",), quant_group_size=64)
    with reference.apply(model, cfg):
        ref = _run_r(model, model, x, loss=_loss_without_row_1)
    with razorpass.record_compiles() as records:
        got = _run_r(model, razorpass.compile(model, cfg), x, loss=_loss_without_row_1)
    assert [type(c).__name__ for c in records[0].compressed] == ["QuantizedRoot"]
    assert torch.isnan(got["fc2.weight"]).all() and torch.isnan(ref["fc2.weight"]).all()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], equal_nan=True, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- one code for a norm and its layer


class _NormThenLayer(torch.nn.Module):
    """LayerNorm -> Linear (a transformer block's qkv / fc1 input) or BatchNorm -> ReLU6
    -> conv (a CNN block; ``bn-pad``: with a zero "same" padding before the conv, as
    EfficientNet's depthwise convs have), optionally with a residual add in between
    (then the layer's input is not a function of x̂ alone)."""

    def __init__(self, kind: str, residual: bool = False, inplace: bool = False):
        super().__init__()
        self.kind, self.residual = kind, residual
        if kind == "ln":
            self.pre, self.norm, self.act = torch.nn.Linear(16, 256), torch.nn.LayerNorm(256), torch.nn.Identity()
            self.layer = torch.nn.Linear(256, 8)
        else:
            self.pre, self.norm = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
            self.act, self.layer = torch.nn.ReLU6(inplace=inplace), torch.nn.Conv2d(8, 4, 3)
        self.pad = torch.nn.ZeroPad2d((0, 1, 0, 1)) if kind == "bn-pad" else torch.nn.Identity()
        with torch.no_grad():  # γ = 1, β = 0 would hide a code of the output vs of x̂
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        h = self.pre(x).to(x.dtype)  # under autocast: a float32 input to the norm, as a residual stream is
        y = self.act(self.norm(h))
        return self.layer(self.pad(y + h if self.residual else y))


def _norm_case(kind, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = _NormThenLayer(kind, **kw).to(dtype)
    x = torch.randn(4, 5, 16, dtype=dtype) if kind == "ln" else 3 * torch.randn(2, 3, 20, 20, dtype=dtype)
    return model, (x,)


def _grads_of(model, inputs, cfg, compiled: bool):
    model.zero_grad()
    if compiled:
        with razorpass.record_compiles() as records:
            razorpass.compile(model, cfg, fullgraph=True)(*inputs).square().sum().backward()
    else:
        records = None
        with reference.apply(model, cfg):
            model(*inputs).square().sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, records


_NORM_CASES = {"layernorm-linear": ("ln", False), "batchnorm-relu6-conv": ("bn", False),
               "inplace-relu6": ("bn", True), "zero-pad": ("bn-pad", False)}


# Inductor on the two plain cases (the in-place and padded variants change the graph
# before the partitioner only, which the eager compiler sees the same way)
@pytest.mark.parametrize("kind,inplace,compiler", [
    pytest.param(*case, compiler, id=f"{compiler}-{name}") for name, case in _NORM_CASES.items()
    for compiler in ("eager", "inductor") if compiler == "eager" or name in ("layernorm-linear", "batchnorm-relu6-conv")])
def test_a_layer_after_a_norm_reads_the_norms_code(kind, inplace, compiler):
    """One quantized x̂ serves the normalization's backward and the next layer's weight
    gradient (which reads γ·x̂+β, then ReLU6, on the decoded x̂): one code where there
    were two, and gradients equal to the reference, which computes the same thing from
    its own quantized x̂. Back Razor's rule keeps two top-k copies."""
    model, inputs = _norm_case(kind, inplace=inplace)
    cfg = RazorConfig(compiler=compiler)
    ref, _ = _grads_of(model, inputs, cfg, compiled=False)
    got, records = _grads_of(model, inputs, cfg, compiled=True)
    (rec,) = records
    assert rec.fallback is None and rec.excluded_roots == []
    # the layer's weight gradient and the norm's backward read the code with the layer's
    # conv backward between them: decoded twice, not kept alive across it (a matmul
    # backward between them does not split it)
    assert rec.count("split_decodes") == (0 if kind == "ln" else 1)
    # the Linear's weight gradient reads x̂ itself, γ and β folded in (fold_affine); a
    # convolution after ReLU6 / padding reads the replay, which is not affine
    assert rec.count("fold_affine") == (1 if kind == "ln" else 0)
    norm_class = "layernorm" if kind == "ln" else "batchnorm"
    layer_class = "linear" if kind == "ln" else "conv"
    shared = [c for c in rec.compressed if set(c.op_classes) == {norm_class, layer_class}]
    assert len(shared) == 1 and isinstance(shared[0], QuantizedRoot)
    # x − mean is not normalized per channel: BatchNorm codes use their own, smaller groups
    assert shared[0].group_size == (cfg.quant_group_size if kind == "ln" else cfg.batchnorm_group_size)
    assert not [c for c in rec.compressed if c.op_classes == (layer_class,) and c.shape == shared[0].shape]
    # a code of the layer's input itself (what the pass stored before) gives another
    # weight gradient: the test can tell the two apart
    own = quantize_output_gradient(model, inputs, cfg)
    top = ref["layer.weight"].abs().max().item()
    assert (own - ref["layer.weight"]).abs().max().item() > 1e-4 * top
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9 * max(1.0, ref[k].abs().max().item()))
    br_rec = _grads_of(model, inputs, RazorConfig(compiler=compiler, policy="backrazor",
                                                  targets=BACKRAZOR_TARGETS + ("batchnorm",)), compiled=True)[1][0]
    assert not [c for c in br_rec.compressed if len(set(c.op_classes) & {norm_class, layer_class}) == 2]


def quantize_output_gradient(model, inputs, cfg):
    """The layer's weight gradient from a code of its own input (no sharing)."""
    with torch.no_grad():
        h = model.pre(*inputs)
        y = model.pad(model.act(model.norm(h).clone()))
        yq = reference.quantize_group(y, cfg.quant_group_size, cfg.quant_bits)
    y = y.detach().requires_grad_()
    out = model.layer(y)
    g = torch.autograd.grad(out.square().sum(), out)[0]
    if model.kind == "ln":
        return g.reshape(-1, g.shape[-1]).t() @ yq.reshape(-1, yq.shape[-1])
    return torch.ops.aten.convolution_backward(g, yq, model.layer.weight, None, [1, 1], [0, 0], [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


@pytest.mark.parametrize("kind", ["ln", "bn"])
def test_a_residual_between_norm_and_layer_keeps_its_own_code(kind):
    """y + h is not a function of x̂: the layer's input gets a code of its own, and the
    gradients still equal the reference."""
    model, inputs = _norm_case(kind, residual=True)
    cfg = RazorConfig(compiler="eager")
    ref, _ = _grads_of(model, inputs, cfg, compiled=False)
    got, (rec,) = _grads_of(model, inputs, cfg, compiled=True)
    assert not [c for c in rec.compressed if len(c.op_classes) > 1]
    assert len([c for c in rec.compressed if isinstance(c, QuantizedRoot)]) == 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9 * max(1.0, ref[k].abs().max().item()))


def _matches_reference(model, x, compiler):
    """Compiled gradients of ``model`` on ``x`` equal the reference's (float64); returns
    the one graph's record. Both sides start from the same state (running statistics)."""
    cfg = RazorConfig(compiler=compiler)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref, _ = _grads_of(model, (x,), cfg, compiled=False)
    model.load_state_dict(state)
    got, (rec,) = _grads_of(model, (x,), cfg, compiled=True)
    assert rec.fallback is None and rec.excluded_roots == []
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9 * max(1.0, ref[k].abs().max().item()))
    return rec


class _NormsThenLinears(torch.nn.Module):
    """A LayerNorm read by two Linears (query and key of an attention), and a LayerNorm
    without bias read by one, then one read by a Linear through a ReLU (not affine)."""

    def __init__(self, C=32):
        super().__init__()
        self.pre = torch.nn.Linear(C, C)  # the first norm's input is an activation, not the batch
        self.n1, self.q, self.k = torch.nn.LayerNorm(C), torch.nn.Linear(C, C), torch.nn.Linear(C, C, bias=False)
        self.n2, self.fc = torch.nn.LayerNorm(C, bias=False), torch.nn.Linear(C, C)
        self.n3, self.out = torch.nn.LayerNorm(C), torch.nn.Linear(C, C)
        with torch.no_grad():
            for n in (self.n1, self.n2, self.n3):
                n.weight.uniform_(0.5, 1.5)
            for n in (self.n1, self.n3):
                n.bias.uniform_(-1, 1)

    def forward(self, x):
        h = self.n1(self.pre(x))
        y = self.q(h) * self.k(h)
        y = self.fc(self.n2(y))
        return self.out(torch.relu(self.n3(y)))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_weight_gradients_after_a_norm_fold_its_affine(compiler):
    """dW = dYᵀ·(γ·x̂ + β) = (dYᵀ·x̂)·diag(γ) + (dYᵀ·1)·βᵀ: the three Linears reading an
    affine of a decoded x̂ take their weight gradients from x̂ itself, with no replayed
    activation-sized buffer; the one behind a ReLU reads the replay. Equal to the
    reference, which multiplies the replayed tensor."""
    torch.manual_seed(0)
    rec = _matches_reference(_NormsThenLinears().double().train(), torch.randn(4, 16, 32, dtype=torch.float64) * 2 + 1,
                             compiler)
    assert rec.count("fold_affine") == 3


class _Mlp(torch.nn.Module):
    def __init__(self, C=32):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(C, 3 * C), torch.nn.Linear(3 * C, C)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_weight_gradients_decode_runs_right_after_dy(compiler):
    """fc2's input (the GELU output) is read by fc2's weight gradient alone: its decode
    and that matmul are moved before the input gradient dY·W, so that the decoded
    input is freed before the (as wide) input gradient exists (hoist_decodes). The
    order changes, not the values: gradients equal the reference's."""
    torch.manual_seed(0)
    rec = _matches_reference(_Mlp().double().train(), torch.randn(4, 16, 32, dtype=torch.float64), compiler)
    assert rec.count("hoist_decodes") == 1


class _InplaceResidual(torch.nn.Module):
    """conv → BatchNorm → ``h += x`` → ReLU → conv: a residual block as Hugging Face's
    ResNet writes it (the add in place on the norm's output)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(8, 8, 1, bias=False), torch.nn.BatchNorm2d(8)
        self.c2, self.inplace = torch.nn.Conv2d(8, 8, 1, bias=False), inplace

    def forward(self, x):
        h = self.bn(self.c1(x))
        if self.inplace:
            h += x
        else:
            h = h + x
        return self.c2(torch.relu(h))


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace-add", "add"])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_an_inplace_residual_after_a_norm_ends_the_shared_code(inplace, compiler):
    """After ``h += x`` the ReLU's input is no longer a function of the norm's x̂: the
    compiled graph (functional: a new tensor) gives the second conv a code of its own,
    and so must the reference. It used to keep reading relu(γ·x̂+β) without the
    residual (second conv's weight gradient off by 5.8x relative on this block)."""
    torch.manual_seed(0)
    model = _InplaceResidual(inplace).double().train()
    rec = _matches_reference(model, torch.randn(4, 8, 8, 8, dtype=torch.float64) * 3 + 2, compiler)
    assert not [c for c in rec.compressed if len(c.op_classes) > 1]  # the residual breaks the sharing


class _ViewedProbs(torch.nn.Module):
    """DeBERTa's attention tail: softmax over a 4-D view of the scores, then
    ``bmm(P.view(B*H, T, T), V)``; and a Linear reading a parameter through an identity
    dropout and an unsqueeze (DeBERTa's relative-position projections)."""

    def __init__(self, C=32, H=4, R=16):
        super().__init__()
        self.H, self.rel = H, torch.nn.Parameter(torch.randn(R, C))
        self.q, self.k, self.v, self.pos = (torch.nn.Linear(C, C) for _ in range(4))

    def split(self, x):  # (B, T, C) -> (B*H, T, d)
        B, T, C = x.shape
        return x.view(B, T, self.H, -1).permute(0, 2, 1, 3).reshape(B * self.H, T, -1)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        s = torch.bmm(q, k.transpose(-1, -2)) / 8 ** 0.5
        p = torch.softmax(s.view(-1, self.H, s.size(-2), s.size(-1)), dim=-1)
        ctx = torch.bmm(p.view(-1, p.size(-2), p.size(-1)), v)
        pos = self.pos(torch.nn.functional.dropout(self.rel, 0.0, self.training).unsqueeze(0))  # (1, R, C)
        pos = pos + self.pos(self.rel) + self.pos(self.rel * 2)  # the parameter itself; a function of it
        return ctx.reshape(x.shape[0], -1) @ pos.reshape(-1, 1)  # H*T*d = R*C elements a sample


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_views_of_the_softmax_output_and_of_parameters_keep_their_encoding(compiler):
    """Two identities the compiled path keeps through views and the reference must too:
    P.view(...) read by P·V is the softmax output, stored top-k (it was quantized to 3
    bits on the reference side: value gradient 1.1x relative apart on DeBERTa); and a
    parameter, itself or seen through dropout(p=0) and unsqueeze, is the parameter's own
    memory, never saved as a copy, so exact (the reference quantized it: 0.24 apart on
    DeBERTa, 0.13 on a Linear reading a parameter directly). A function of it (rel * 2)
    is an activation and compressed on both sides."""
    torch.manual_seed(0)
    rec = _matches_reference(_ViewedProbs().double().train(), torch.randn(4, 16, 32, dtype=torch.float64), compiler)
    assert [c.op_classes for c in rec.compressed if not isinstance(c, QuantizedRoot)] == [("matmul", "softmax")]
    # rel * 2 is an activation (compressed on both sides); rel and its views are not
    assert [c.shape for c in rec.compressed if c.op_classes == ("linear",) and c.shape[-2:] == (16, 32)] == [(16, 32)]


class _NormOverTransposed(torch.nn.Module):
    """Conv1d, then a transpose to (B, T, C), then LayerNorm and a Linear: the norm's
    input is not contiguous (Swin's patch embedding, Whisper's residual stream)."""

    def __init__(self, C=16):
        super().__init__()
        self.proj, self.norm, self.fc = torch.nn.Conv1d(4, C, 1), torch.nn.LayerNorm(C), torch.nn.Linear(C, C)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc(self.norm(self.proj(x).transpose(1, 2)))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_norm_over_a_transposed_input_stores_its_x_hat(compiler):
    """Over a non-contiguous input the LayerNorm forward normalizes a contiguous clone
    and its backward recomputed x̂ from the strided input, so the backward read the raw
    input and that was quantized instead of x̂ (conv weight gradient 0.11 relative off
    the reference, which stores x̂). canonicalize now merges the two x̂."""
    torch.manual_seed(0)
    model = _NormOverTransposed().double().train()
    rec = _matches_reference(model, torch.randn(4, 4, 64, dtype=torch.float64) * 3 + 2, compiler)
    assert [c.op_classes for c in rec.compressed] == [("layernorm", "linear")]  # the conv reads the input


class _ScaledSdpa(torch.nn.Module):
    """Whisper's attention: the query scaled first, then F.scaled_dot_product_attention
    with ``scale=1.0`` and no mask."""

    def __init__(self, C=32, H=4):
        super().__init__()
        self.H, self.q, self.k = H, torch.nn.Linear(C, C), torch.nn.Linear(C, C, bias=False)
        self.v, self.out = torch.nn.Linear(C, C), torch.nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        heads = (B, T, self.H, C // self.H)
        q = (self.q(x) * (C // self.H) ** -0.5).view(heads).transpose(1, 2).contiguous()
        k, v = self.k(x).view(heads).transpose(1, 2).contiguous(), self.v(x).view(heads).transpose(1, 2).contiguous()
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_inductor_does_not_fuse_the_decomposed_attention_back(compiler):
    """razorpass runs SDPA as explicit math so that Q·Kᵀ, P·V and the softmax output are
    compressed. With scale 1.0 (Inductor drops the multiply) and no mask that math is
    exactly what Inductor's attention patterns fuse back into one SDPA op, before
    razorpass's joint pass: the attention was then left uncompressed (Whisper). The
    scale is now a 0-d tensor."""
    torch.manual_seed(0)
    rec = _matches_reference(_ScaledSdpa().double().train(), torch.randn(4, 16, 32, dtype=torch.float64), compiler)
    assert {c for root in rec.compressed for c in root.op_classes} == {"linear", "matmul", "softmax"}


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_the_softmax_output_is_decoded_again_after_the_bmm_of_dp(compiler):
    """P serves dV = Pᵀ·dO and the softmax backward, with dP = dO·Vᵀ between them: the
    backward decodes P once for each (split_decodes), so that P and dP, each B·H·T²
    elements, are not live at once. Gradients equal the reference's."""
    torch.manual_seed(0)
    rec = _matches_reference(_ScaledSdpa().double().train(), torch.randn(4, 16, 32, dtype=torch.float64), compiler)
    assert rec.count("split_decodes") == 1


def test_shared_code_under_bf16_autocast_matches_the_reference():
    """Under autocast the Linear reads a bfloat16 cast of the float32 LayerNorm output:
    the cast is replayed on γ·x̂+β from the decoded float32 x̂."""
    model, inputs = _norm_case("ln", dtype=torch.float32)
    cfg = RazorConfig(compiler="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = _grads_of(model, inputs, cfg, compiled=False)
        got, (rec,) = _grads_of(model, inputs, cfg, compiled=True)
    assert [set(c.op_classes) for c in rec.compressed if len(c.op_classes) > 1] == [{"layernorm", "linear"}]
    for k in ref:
        err = ((got[k].float() - ref[k].float()).norm() / ref[k].float().norm()).item()
        assert err < 4e-3, f"{k}: relative error {err:.3g}"


def test_a_conv_after_a_batchnorm_under_bf16_autocast_reads_the_norms_code():
    """Under autocast a BatchNorm normalizes a conv's bfloat16 output in float32, and its
    backward recomputes x - mean from another float32 cast of that output: the next
    conv's input is still γ·x̂+β (then ReLU6, a bfloat16 cast) of the norm's code, so it
    stores no code of its own, as the reference does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                                torch.nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    inputs = (3 * torch.randn(2, 3, 20, 20),)
    cfg = RazorConfig(compiler="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = _grads_of(model, inputs, cfg, compiled=False)
        got, (rec,) = _grads_of(model, inputs, cfg, compiled=True)
    assert [set(c.op_classes) for c in rec.compressed] == [{"batchnorm", "conv"}]
    err = ((got["3.weight"].float() - ref["3.weight"].float()).norm() / ref["3.weight"].float().norm()).item()
    assert err < 1e-2, err
