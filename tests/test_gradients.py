"""Gradients of razor-compiled models equal the eager reference of the same rule.

Every case also checks that the rule is active (the dense gradient differs from the
reference by far more than the tolerance), so a pass that silently compressed nothing
would fail here.
"""

import pytest
import torch

import razorpass
from razorpass.passes.vocab import SkipReason
from razorpass import RazorConfig, reference

from .models import MLP, NanoGPT, SmallCNN, loss_of, tiny_bert, tiny_vit


def _mlp():
    return MLP(), (torch.randn(4, 3, 24),)


def _nanogpt():
    return NanoGPT(), (torch.randint(0, 50, (3, 16)),)


def _vit():
    return tiny_vit(), (torch.randn(2, 3, 32, 32),)


def _bert():
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return tiny_bert(), (ids, mask)


def _cnn():
    return SmallCNN(), (torch.randn(2, 3, 12, 12),)


# name -> (builder, compressed roots expected with targets ("linear", "conv"))
# The batch itself is a graph input held by the caller: never compressed.
# mlp: inputs of fc2 (relu out), head (gelu out)
# nanogpt: per block c_attn (ln_1 out), c_proj (attention out), mlp.0 (ln_2 out),
#          mlp.2 (gelu out) = 4 x 2 blocks + lm_head (ln_f out)
# vit: per layer q/k/v (one shared LayerNorm output), attention output, fc1, fc2 = 4 x 2
# bert: per layer q/k/v (shared), attention output dense, intermediate, output = 4 x 2
# cnn: conv2, conv3, head
CASES = {
    "mlp": (_mlp, 2),
    "nanogpt": (_nanogpt, 9),
    "vit": (_vit, 8),
    "bert": (_bert, 8),
    "cnn": (_cnn, 3),
}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, inputs, fn):
    model.zero_grad(set_to_none=True)
    loss_of(fn(*inputs)).backward()
    return _grads(model)


def check(name, compiler, granularity, sparsity=0.7, targets=("linear", "conv"), n_roots=-1):
    build, expected_roots = CASES[name]
    n_roots = expected_roots if n_roots == -1 else n_roots
    torch.manual_seed(0)
    model, inputs = build()
    model.train()
    cfg = RazorConfig(policy="backrazor", sparsity=sparsity, granularity=granularity, block_size=64, compiler=compiler,
                      targets=targets)
    dense = _run(model, inputs, model)
    with reference.apply(model, cfg):
        ref = _run(model, inputs, model)
    with razorpass.record_compiles() as records:
        got = _run(model, inputs, razorpass.compile(model, cfg, fullgraph=True))
    assert [r.fallback for r in records] == [None]
    if n_roots is not None:
        assert len(records[0].compressed) == n_roots
    # "eager" runs the decomposed graph op by op: float rounding differs slightly from
    # the reference's fused ATen kernels; inductor fuses further.
    tol = dict(rtol=1e-4, atol=1e-5) if compiler == "eager" else dict(rtol=2e-3, atol=2e-4)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m: f"{name}/{k}: {m}")
    gap = max((dense[k] - ref[k]).abs().max().item() for k in ref)
    assert gap > 100 * tol["atol"], "the sparsification rule had no visible effect"


@pytest.mark.parametrize("granularity", ["block", "sample"])
@pytest.mark.parametrize("name", list(CASES))
def test_eager_compiler_matches_reference(name, granularity):
    check(name, "eager", granularity)


# Inductor on three of the models: nanoGPT and ViT run under Inductor in test_policy,
# test_targets and test_matrix (the passes themselves: test_passes.py).
@pytest.mark.parametrize("name", ["mlp", "bert", "cnn"])
def test_inductor_matches_reference(name):
    check(name, "inductor", "block")


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_inductor_sample_granularity(name):
    check(name, "inductor", "sample")


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_sample_survives_the_reshapes_inductor_folds(compiler):
    """Linear -> Linear on a (B, T, C) input: the graph reshapes the first Linear's
    (B*T, C) output to (B, T, C) and back for the second, and Inductor's joint-graph
    passes fold that pair before razorpass sees the graph. A sample is still one index
    of B: T * C elements, as the layers receive them in the reference."""
    torch.manual_seed(0)
    B, T, C = 8, 6, 32
    model = torch.nn.Sequential(torch.nn.Linear(16, C), torch.nn.GELU(), torch.nn.Linear(C, C), torch.nn.Linear(C, 4))
    x = torch.randn(B, T, 16)
    cfg = RazorConfig(policy="backrazor", sparsity=0.8, granularity="sample", compiler=compiler)
    dense = _run(model, (x,), model)
    with reference.apply(model, cfg):
        ref = _run(model, (x,), model)
    with razorpass.record_compiles() as records:
        got = _run(model, (x,), razorpass.compile(model, cfg))
    assert sorted(c.layer for c in records[0].compressed) == ["2", "3"]
    assert [c.group_size for c in records[0].compressed] == [T * C, T * C]
    tol = dict(rtol=1e-4, atol=1e-5) if compiler == "eager" else dict(rtol=2e-3, atol=2e-4)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m: f"{k}: {m}")
    assert (dense["3.weight"] - ref["3.weight"]).abs().max() > 100 * tol["atol"]


def test_a_sample_folded_away_under_a_dynamic_batch_stays_dense():
    """The same Linear -> Linear with the batch marked dynamic: Inductor's folded graph
    reads the second Linear's input as (s0*T, C), and which rows form a sample is not
    known statically; that input is then kept dense (its weight gradient exact), with
    the reason in the record, rather than grouped per row."""
    torch.manual_seed(0)
    B, T, C = 8, 6, 32
    model = torch.nn.Sequential(torch.nn.Linear(16, C), torch.nn.GELU(), torch.nn.Linear(C, C), torch.nn.Linear(C, 4))
    x = torch.randn(B, T, 16)
    torch._dynamo.mark_dynamic(x, 0)
    cfg = RazorConfig(policy="backrazor", sparsity=0.8, granularity="sample")
    dense = _run(model, (x,), model)
    with razorpass.record_compiles() as records:
        got = _run(model, (x,), razorpass.compile(model, cfg))
    assert [c.layer for c in records[0].compressed] == ["2"]
    assert [s.reason for s in records[0].skipped] == [SkipReason.NO_SAMPLE_SIZE]
    torch.testing.assert_close(got["3.weight"], dense["3.weight"], rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_dynamic_batch_compiles_once(compiler):
    torch.manual_seed(0)
    model = MLP()
    cfg = RazorConfig(sparsity=0.7, granularity="sample", compiler=compiler)
    compiled = razorpass.compile(model, cfg)
    with razorpass.record_compiles() as records:
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 24)
            torch._dynamo.mark_dynamic(x, 0)
            got = _run(model, (x,), compiled)
            with reference.apply(model, cfg):
                ref = _run(model, (x,), model)
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=2e-3, atol=2e-4)
    assert len(records) == 1 and records[0].fallback is None


def test_include_exclude_choose_layers():
    torch.manual_seed(0)
    model, (x,) = _mlp()
    cfg = RazorConfig(sparsity=0.7, compiler="eager", block_size=64, include=("fc*", "head"), exclude=("fc2",))
    with razorpass.record_compiles() as records:
        got = _run(model, (x,), razorpass.compile(model, cfg))
    # fc1 reads the batch (held by the caller, never compressed), fc2 is excluded
    assert [c.layer for c in records[0].compressed] == ["head"]
    with reference.apply(model, cfg):
        ref = _run(model, (x,), model)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_torch_compile_backend_name_matches_razorpass_compile():
    torch.manual_seed(0)
    model, (x,) = _mlp()
    opts = {"sparsity": 0.8, "compiler": "eager", "block_size": 64}
    a = _run(model, (x,), torch.compile(model, backend="razor", options=opts))
    torch._dynamo.reset()
    b = _run(model, (x,), razorpass.compile(model, RazorConfig(**opts)))
    for k in a:
        assert torch.equal(a[k], b[k])


class _HeadsAttention(torch.nn.Module):
    def __init__(self, C=32, H=4):
        super().__init__()
        self.H, self.qkv, self.out = H, torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.out((a @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_batched_matmul_sample_spans_every_head(compiler):
    """Back Razor's rule for attention: the operands of q·kᵀ and P·v are (B, H, T, d)
    and one sample is one index of B across all H heads (H * T * d elements), not one
    (batch, head) pair, although the graph multiplies them as (B * H, T, d)."""
    torch.manual_seed(0)
    B, T, C, H = 3, 6, 32, 4
    model, x = _HeadsAttention(C, H), torch.randn(B, T, C)
    cfg = RazorConfig(policy="backrazor", sparsity=0.8, granularity="sample", compiler=compiler, targets=("matmul",))
    dense = _run(model, (x,), model)
    with reference.apply(model, cfg):
        ref = _run(model, (x,), model)
    with razorpass.record_compiles() as records:
        got = _run(model, (x,), razorpass.compile(model, cfg))
    groups = [c.group_size for c in records[0].compressed if "matmul" in c.op_classes]
    assert sorted(groups) == sorted([H * T * (C // H)] * 3 + [H * T * T])  # q, k, v and P (B, H, T, T)
    tol = dict(rtol=1e-4, atol=1e-5) if compiler == "eager" else dict(rtol=2e-3, atol=2e-4)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m: f"{k}: {m}")
    assert (dense["qkv.weight"] - ref["qkv.weight"]).abs().max() > 100 * tol["atol"]


class _ChannelsLastConv(torch.nn.Module):
    """A Linear over (N, H, W, C), permuted to NCHW for a convolution: the conv input is
    dense in memory but channels-last (ConvNeXt's downsampling reads such a tensor)."""

    def __init__(self, perm=(0, 3, 1, 2)):
        super().__init__()
        self.fc, self.conv, self.perm = torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 4, 3, padding=1), perm

    def forward(self, x):
        return self.conv(self.fc(x).permute(*self.perm))


@pytest.mark.parametrize("shape,perm", [((2, 6, 6, 8), (0, 3, 1, 2)), ((2, 6, 1, 8), (0, 3, 2, 1))],
                         ids=["nhwc", "size-1-dim"])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_channels_last_root_decodes_into_its_own_layout(compiler, shape, perm):
    """The backward graph was traced against the saved tensor's strides: the conv's input
    gradient takes its input's memory format and the Linear backward then views it as
    (N*H*W, C). A decode that stayed contiguous broke that view ("view size is not
    compatible", eager compiler); the decoded copy is laid out like the root."""
    torch.manual_seed(0)
    model, x = _ChannelsLastConv(perm).double(), torch.randn(*shape, dtype=torch.double)
    cfg = RazorConfig(compiler=compiler, targets=("conv",), quant_group_size=32)
    dense = _run(model, (x,), model)
    with reference.apply(model, cfg):
        ref = _run(model, (x,), model)
    with razorpass.record_compiles() as records:
        got = _run(model, (x,), razorpass.compile(model, cfg))
    assert [r.fallback for r in records] == [None]
    assert [c.op_classes for c in records[0].compressed] == [("conv",)]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    assert (dense["conv.weight"] - ref["conv.weight"]).abs().max() > 1e-3  # the code is lossy: a visible effect
