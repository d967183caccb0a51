"""Differential matrix: compiled gradients against the eager reference
(``razorpass.reference.apply``) on real stacks.

model (Hugging Face ViT / BERT / GPT-2 with eager and SDPA attention, a PEFT LoRA
BERT, a small CNN) x target class (each class alone that the model has, and "all")
x compiler ("eager" everywhere, "inductor" on one case of ViT, LoRA BERT and the CNN;
a GPT-style decoder (NanoGPT) runs under Inductor in test_policy.py) x path (float32, and bfloat16
CPU autocast for BERT / ViT / GPT-2), at sparsity 0.9 ("all" at 0.5 too).
These cases run Back Razor's rule (``policy="backrazor"``); ``tests/test_policy.py``
runs the default policy on the same models.

The configs use the default block size (1024) on batches of 4, so that the small
tensors of these models (a LoRA-A output, ViT's CLS token, BERT's pooler input) fall
under the size rule: a tensor whose compressed copy is not smaller than the dense
tensor stays dense, on both sides. Values are kept at full precision ("float32"; under
autocast "same", i.e. bfloat16 for the autocast copies), so selection is the only
difference between the compiled path and the dense model.

Each case checks that no graph fell back, that no root was left dense by the
pipeline's retry, that exactly the expected classes were compressed, that the rule
had a visible effect, and that the gradients match the reference.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import razorpass
from razorpass.passes.vocab import SkipReason
from razorpass import RazorConfig, reference

from .shared import shared

transformers = pytest.importorskip("transformers")

BATCH, SEQ = 4, 8
SPARSITIES = (0.5, 0.9)


def _vit(attn):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=5, attn_implementation=attn)
    model = transformers.ViTForImageClassification(cfg)
    return model, dict(pixel_values=torch.randn(BATCH, 3, 32, 32), labels=torch.arange(BATCH) % 5)


def _bert_config(attn):
    return transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_labels=3,
                                   attn_implementation=attn)


def _bert_inputs():
    return dict(input_ids=torch.randint(0, 64, (BATCH, SEQ)), labels=torch.arange(BATCH) % 3)


def _bert(attn):
    return transformers.BertForSequenceClassification(_bert_config(attn)), _bert_inputs()


def _gpt2(attn):
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    ids = torch.randint(0, 64, (BATCH, SEQ))
    return transformers.GPT2LMHeadModel(cfg), dict(input_ids=ids, labels=ids)


def _lora_bert():
    peft = pytest.importorskip("peft")
    base = transformers.BertForSequenceClassification(_bert_config("eager"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at 0: give it values so that lora_A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, _bert_inputs()


class CNN(nn.Module):
    """conv + ReLU + BatchNorm twice, then a linear head; the loss inside. (The
    BatchNorm after the ReLU makes the inputs of conv2 and the head dense, so that
    dropping half of them changes the weight gradients.)"""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8, classes)

    def forward(self, pixel_values, labels):
        x = self.bn1(F.relu(self.conv1(pixel_values)))
        x = self.bn2(F.relu(self.conv2(x)))
        return F.cross_entropy(self.head(x.flatten(1)), labels)


def _cnn():
    return CNN(), dict(pixel_values=torch.randn(BATCH, 3, 8, 8), labels=torch.arange(BATCH) % 5)


TRANSFORMER = frozenset({"linear", "matmul", "softmax", "layernorm", "gelu"})
# name -> (builder, the classes the model has, the targets its cases run)
# ViT's patch embedding convolution reads the batch (held by the caller, never
# compressed): no "conv". GPT-2's gelu_new is written out in tanh (no GELU op), and no
# transformer here saves a boolean mask (dropout 0; the causal / padding masks are
# recomputed from the inputs). The SDPA variants differ from the eager ones only in
# attention: they run "all" (their "sdpa" target runs F.scaled_dot_product_attention as
# math, compressing its matmul operands and softmax output).
MODELS = {
    "vit-eager": (lambda: _vit("eager"), TRANSFORMER, ("linear", "sdpa", "layernorm", "gelu", "all")),
    "vit-sdpa": (lambda: _vit("sdpa"), TRANSFORMER, ("all",)),
    "bert-eager": (lambda: _bert("eager"), TRANSFORMER, ("linear", "sdpa", "layernorm", "gelu", "all")),
    "bert-sdpa": (lambda: _bert("sdpa"), TRANSFORMER, ("all",)),
    "gpt2-eager": (lambda: _gpt2("eager"), TRANSFORMER - {"gelu"}, ("linear", "sdpa", "layernorm", "all")),
    "gpt2-sdpa": (lambda: _gpt2("sdpa"), TRANSFORMER - {"gelu"}, ("all",)),
    "lora-bert": (_lora_bert, TRANSFORMER, ("linear", "all")),
    "cnn": (_cnn, frozenset({"linear", "conv", "batchnorm", "mask"}), ("linear", "conv", "batchnorm", "mask", "all")),
}

# Each class alone at 0.9; "all" at both sparsities (0.5 keeps half of every group:
# other elements, the same code paths).
CASES = (
    [(m, t, s, "eager", "fp32") for m, (_, _, ts) in MODELS.items() for t in ts
     for s in (SPARSITIES if t == "all" else (0.9,))]
    + [(m, "all", 0.9, "inductor", "fp32") for m in ("vit-sdpa", "lora-bert", "cnn")]
    + [(m, t, 0.9, "eager", "autocast") for m in ("vit-eager", "bert-eager", "gpt2-eager") for t in ("linear", "all")]
    + [("bert-eager", "all", 0.5, "eager", "autocast")]
)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, fn, inputs, autocast):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = fn(**inputs)
        loss = out.loss if hasattr(out, "loss") else out
    loss.backward()
    return _grads(model)


def _classes(records) -> set[str]:
    seen = {c for r in records for root in r.compressed for c in root.op_classes}
    return seen | ({"mask"} if any(r.packed for r in records) else set())


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Overrides conftest's: no Dynamo reset, so that the cases of one model share its
    trace (tests/shared.py)."""
    torch.manual_seed(0)
    yield


def check(model_name, target, sparsity, compiler, path):
    build, has, _ = MODELS[model_name]
    autocast = path == "autocast"
    one = shared(model_name, build)  # built under manual_seed(0), traced by Dynamo once per session
    model, inputs = one.model, one.inputs
    cfg = RazorConfig(policy="backrazor", sparsity=sparsity, targets=(target,), compiler=compiler,
                      value_dtype="same" if autocast else "float32")
    dense = _run(model, model, inputs, autocast)
    with reference.apply(model, cfg):
        ref = _run(model, model, inputs, autocast)
    with one.using(cfg) as records:
        got = _run(model, one.compiled, inputs, autocast)

    assert records and [r.fallback for r in records] == [None] * len(records)
    assert [r.excluded_roots for r in records] == [[]] * len(records), "the partitioner saved a compressed root dense"
    assert _classes(records) == set(cfg.targets) & has
    assert ref.keys() == got.keys()
    if autocast:
        # bfloat16 rounding: the two sides run the same bf16 ops, in a different order
        errs = {k: _rel(got[k], ref[k]) for k in ref if ref[k].norm() > 0}
        worst = max(errs, key=errs.get)
        assert errs[worst] < 4e-3, f"{worst}: relative error {errs[worst]:.3g}"
        effect = 0.05
    else:
        tol = dict(rtol=1e-4, atol=1e-6) if compiler == "eager" else dict(rtol=2e-3, atol=2e-5)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m: f"{k}: {m}")
        effect = 1e-4
    if target != "mask":  # masks are packed losslessly: no effect to see
        gap = max(_rel(dense[k], ref[k]) for k in ref if ref[k].norm() > 0)
        assert gap > effect, "the sparsification rule had no visible effect"


def _id(case):
    return "/".join(map(str, case))


@pytest.mark.parametrize(("model_name", "target", "sparsity", "compiler", "path"), CASES, ids=map(_id, CASES))
def test_compiled_matches_reference(model_name, target, sparsity, compiler, path):
    check(model_name, target, sparsity, compiler, path)


def test_lora_frozen_base_shares_one_compressed_input():
    """PEFT LoRA on query and value: the frozen base layers store nothing for their
    (absent) weight gradient; the input that query's and value's base layer and LoRA A
    read is compressed once per attention layer, labelled with PEFT's module paths, and
    include / exclude globs match those paths on both sides."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, inputs = _lora_bert()
    model.train()
    prefix = "base_model.model.bert.encoder.layer"
    for exclude, layers in (((), (0, 1)), (("*.layer.1.*",), (0,))):
        cfg = RazorConfig(policy="backrazor", sparsity=0.9, targets=("linear",), value_dtype="float32", compiler="eager", exclude=exclude)
        with reference.apply(model, cfg):
            ref = _run(model, model, inputs, False)
        torch._dynamo.reset()
        with razorpass.record_compiles() as records:
            got = _run(model, razorpass.compile(model, cfg), inputs, False)
        (record,) = records
        assert record.fallback is None and record.excluded_roots == []
        assert sorted(c.layer for c in record.compressed) == [
            f"{prefix}.{i}.attention.self.{{query.lora_A.default,value.lora_A.default}}" for i in layers]
        for root in record.compressed:
            assert root.op_classes == ("linear",) and root.consumers == 2
        # lora_B's input (LoRA A's (32, 4) output) is under the size rule: dense
        assert [s.reason for s in record.skipped] == [SkipReason.NOT_SMALLER] * (2 * len(layers))
        # nothing saved belongs to a frozen base layer's weight gradient
        assert not any("base_layer" in m for root in record.compressed for m in root.modules)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_size_rule_is_the_same_on_both_sides():
    """Compiled pass, reference and the format's byte count agree on which tensors stay dense."""
    import itertools

    from razorpass.passes.compress_saved import not_smaller

    shapes = [(32, 4), (4, 32), (4, 8, 32), (4, 17, 32), (2, 17, 32), (1, 1), (4, 3), (64, 64)]
    for shape, sparsity, value_dtype, dtype, granularity in itertools.product(
            shapes, SPARSITIES, ("float32", "bfloat16", "same"), (torch.float32, torch.bfloat16), ("block", "sample")):
        cfg = RazorConfig(policy="backrazor", sparsity=sparsity, value_dtype=value_dtype, granularity=granularity)
        dense = torch.empty(shape, dtype=dtype)
        by_format = razorpass.compressed_nbytes(shape, cfg, dtype) >= dense.nbytes
        group = razorpass.format.group_size_for(shape, granularity, cfg.block_size)
        case = (shape, sparsity, value_dtype, dtype, granularity)
        assert not_smaller(dense, group, int(cfg.keep_count(group)), cfg) == by_format, case
        assert reference.not_smaller(shape, dtype, cfg) == by_format, case
