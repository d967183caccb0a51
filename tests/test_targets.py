"""Every target class: gradients equal the eager reference, exact counts of what is
compressed, and nothing targeted stays saved dense."""

import collections

import pytest
import torch

import razorpass
from razorpass.passes.vocab import SkipReason
from razorpass import RazorConfig
from razorpass.passes.records import CompressedRoot, QuantizedRoot

from .test_gradients import CASES, check
from .models import loss_of, tiny_vit

CLASSES = ["matmul", "softmax", "layernorm", "gelu"]


@pytest.mark.parametrize(
    "name,op_class",
    # BERT's attention is SDPA: matmul / softmax reach it through the "sdpa" target
    [("nanogpt", c) for c in CLASSES] + [("bert", "layernorm"), ("bert", "gelu")],
)
def test_each_class_matches_reference(name, op_class):
    check(name, "eager", "block", targets=(op_class,), n_roots=None)


def test_sdpa_target_compresses_attention():
    # "sdpa" alone runs attention as math and compresses q, kᵀ, v and P (it implies
    # "matmul" and "softmax"); BERT's attention is SDPA
    assert {"matmul", "softmax"} <= set(RazorConfig(targets=("sdpa",)).targets)
    check("bert", "eager", "block", targets=("sdpa",), n_roots=8)


@pytest.mark.parametrize(("name", "compiler"), [("nanogpt", "eager"), ("vit", "eager"), ("bert", "eager"),
                                              ("bert", "inductor")])  # one model compiled by Inductor
def test_all_targets_match_reference(name, compiler):
    check(name, compiler, "block", targets=("all",), n_roots=None)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_batchnorm_matches_reference(compiler):
    # SmallCNN: one training-mode BatchNorm, whose input (conv1's output) is compressed
    check("cnn", compiler, "block", sparsity=0.97, targets=("batchnorm",), n_roots=1)


def test_batchnorm_in_eval_mode_matches_reference():
    """Eval mode (running statistics, trainable affine): the input gradient is exact and
    only the weight gradient reads the sparsified input."""
    from razorpass import reference

    from .test_gradients import _run

    torch.manual_seed(0)
    model, inputs = CASES["cnn"][0]()
    model.train()
    model.bn1.eval()
    cfg = RazorConfig(policy="backrazor", sparsity=0.7, block_size=64, compiler="eager", targets=("batchnorm", "conv"))
    dense = _run(model, inputs, model)
    with reference.apply(model, cfg):
        ref = _run(model, inputs, model)
    with razorpass.record_compiles() as records:
        got = _run(model, inputs, razorpass.compile(model, cfg, fullgraph=True))
    (rec,) = records
    assert rec.fallback is None
    assert "batchnorm" in {c for r in rec.compressed for c in r.op_classes}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert (dense["bn1.weight"] - ref["bn1.weight"]).abs().max() > 1e-3
    torch.testing.assert_close(ref["bn1.bias"], dense["bn1.bias"])  # bias gradient reads no input


def test_sample_granularity_all_targets():
    check("vit", "eager", "sample", targets=("all",), n_roots=None)


def _classes(model, inputs, **options):
    with razorpass.record_compiles() as records:
        loss_of(razorpass.compile(model, compiler="eager", **options)(*inputs)).backward()
    (rec,) = records
    assert rec.fallback is None
    return rec, collections.Counter("+".join(c.op_classes) for c in rec.compressed)


def test_default_policy_on_a_vit_stores_every_class_and_nothing_large_dense():
    """The accurate policy on a ViT: Back Razor's coverage quantized per group, the
    softmax output top-k (P, shared with P·V), the GELU as its 3-bit derivative; the
    qkv and fc1 inputs (γ·x̂+β of the LayerNorm before them) share that LayerNorm's code;
    what stays dense is the per-row LayerNorm statistics only."""
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    rec, counts = _classes(model, (x,))
    # 2 layers: LN1 -> qkv and LN2 -> fc1 share a code (4); the attention output and
    # fc2 inputs have their own (4); the final LayerNorm's output reaches the head
    # through the CLS slice, not pointwise: its own code (1) and the head input's, too
    # small to compress
    assert counts == {"layernorm+linear": 4, "linear": 4, "layernorm": 1, "matmul": 6, "matmul+softmax": 2}
    for c in rec.compressed:
        if "softmax" in c.op_classes:
            assert isinstance(c, CompressedRoot) and c.keep == RazorConfig().keep_count(c.group_size)
        else:
            assert isinstance(c, QuantizedRoot) and (c.bits, c.group_size) == (3, 256)
    assert [q.op_classes for q in rec.quantized] == [("gelu",)] * 2 and {q.bits for q in rec.quantized} == {3}
    dense = [e for e in rec.saved if e.op_class == "dense" and not e.input]
    assert dense and all(e.shape[-1] == 1 for e in dense)


def test_compressed_roots_per_class_on_nanogpt():
    model, inputs = CASES["nanogpt"][0]()
    _, counts = _classes(model, inputs, policy="backrazor", targets=("all",))
    # 2 blocks: 4 Linear inputs each + lm_head; 2 LayerNorms each + ln_f; one GELU each;
    # attention: q, kᵀ, v, plus P which P·V and the softmax backward share (one copy).
    assert counts == {"linear": 9, "layernorm": 5, "gelu": 2, "matmul": 6, "matmul+softmax": 2}


def test_vit_leaves_no_targeted_activation_dense():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    rec, counts = _classes(model, (x,), policy="backrazor", targets=("all",))
    # 2 layers: q/k/v share one input, attention output, fc1, fc2 (the patch conv reads
    # the pixels, an input held by the caller); 2 LayerNorms per layer + the final one;
    # GELU; q, kᵀ, v; P shared by P·V and the softmax backward.
    assert counts == {"linear": 8, "layernorm": 5, "gelu": 2, "matmul": 6, "matmul+softmax": 2}
    assert rec.dense_kept == []
    dense = [e for e in rec.saved if e.op_class == "dense" and not e.input]
    # what remains dense is the per-row LayerNorm statistic rstd / C, one per LayerNorm
    assert len(dense) == 5 and all(e.shape[-1] == 1 for e in dense)


def test_backrazor_policy_targets_are_back_razors_vit_coverage():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    rec, counts = _classes(model, (x,), policy="backrazor")
    assert "gelu" not in RazorConfig(policy="backrazor").target_classes
    assert all(isinstance(c, CompressedRoot) for c in rec.compressed) and rec.quantized == []
    assert counts == {"linear": 8, "layernorm": 5, "matmul": 6, "matmul+softmax": 2}
    dense = [e for e in rec.saved if e.op_class == "dense" and not e.input and e.shape[-1] != 1]
    # only the GELU inputs (fc1 outputs) stay dense, as in Back Razor
    assert [e.layer for e in dense] == ["layers.0.mlp.fc1", "layers.1.mlp.fc1"]


class _PaddedStem(torch.nn.Module):
    """EfficientNet's stem: the batch is padded (and scaled) inside the model, then
    convolved; a second convolution reads a real activation."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.nn.functional.pad(x, (0, 1, 0, 1)) * self.scale
        return self.conv(torch.relu(self.stem(x))).mean((2, 3))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_inputs_recomputable_from_the_batch_are_not_compressed(compiler):
    """A padded, scaled copy of the batch is recomputed from what the caller holds: it
    is not compressed (and the stem's weight gradient stays exact), in the compiled
    path and in the reference alike; the real activation is."""
    from razorpass import reference

    from .test_gradients import _run

    torch.manual_seed(0)
    model, x = _PaddedStem().train(), torch.randn(2, 3, 15, 15)
    cfg = RazorConfig(policy="backrazor", sparsity=0.9, block_size=64, compiler=compiler, targets=("conv",))
    dense = _run(model, (x,), model)
    with reference.apply(model, cfg):
        ref = _run(model, (x,), model)
    with razorpass.record_compiles() as records:
        got = _run(model, (x,), razorpass.compile(model, cfg, fullgraph=True))
    (rec,) = records
    assert rec.fallback is None
    assert [c.layer for c in rec.compressed] == ["conv"]
    assert SkipReason.RECOMPUTABLE in [s.reason for s in rec.skipped]
    tol = dict(rtol=1e-4, atol=1e-5) if compiler == "eager" else dict(rtol=2e-3, atol=2e-4)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(ref["stem.weight"], dense["stem.weight"], **tol)
    assert (ref["conv.weight"] - dense["conv.weight"]).abs().max() > 1e-3
