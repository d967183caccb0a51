"""The "mask" target: boolean tensors saved for backward (dropout masks) are packed
8 per byte (bit-planar) by ``razor::pack_bits`` and unpacked in backward. Lossless: the loss and
every gradient are bit-identical to the same compilation without it (under Inductor,
which fuses the packing into the kernels around it, up to the order of float sums)."""

import math

import numpy as np
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import razorpass
from razorpass.passes.vocab import SkipReason
from razorpass import RazorConfig
from razorpass.kernels import ops
from torch._inductor.utils import run_and_get_code

from .models import loss_of

# ---------------------------------------------------------------- the ops

SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 0, 3), (4, 1, 13, 3)]


def _np_packed(x: torch.Tensor) -> np.ndarray:
    """The bit-planar layout from numpy: n elements padded to 8P, row j of the (8, P)
    view is bit plane j, so byte b packs column b, little-endian."""
    flat = x.numpy().reshape(-1)
    p = -(-flat.size // 8)
    planes = np.zeros(8 * p, dtype=bool)
    planes[: flat.size] = flat
    return np.packbits(planes.reshape(8, p).T, axis=1, bitorder="little").reshape(-1)


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_bits_equals_numpy_packbits(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = torch.rand(shape, generator=g) > 0.5
    packed = ops.pack_bits(x)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(x.numel() / 8),)
    np.testing.assert_array_equal(packed.numpy(), _np_packed(x))
    out = ops.unpack_bits(packed, list(shape))
    assert out.dtype == torch.bool and out.is_contiguous() and torch.equal(out, x)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.transpose(0, 2),
        lambda x: x[:, ::2, 1:],
        lambda x: x[..., 3],
        lambda x: x[:1, :1].expand(4, 3, 7),
    ],
    ids=["transpose", "slice", "select", "expand"],
)
def test_pack_bits_non_contiguous_uses_logical_order(make):
    x = make(torch.rand(5, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.3)
    packed = ops.pack_bits(x)
    np.testing.assert_array_equal(packed.numpy(), _np_packed(x))
    assert torch.equal(ops.unpack_bits(packed, list(x.shape)), x)


# (4, 1, 13, 3), (9,), (3, 5, 7): no leading-dim prefix is a multiple of 8 (the flat
# path); (16, 3, 5): planes along dim 0; (2, 4, 7, 3), (6, 4, 5): along dims 0-1;
# (5, 3, 8): only the whole shape.
@pytest.mark.parametrize("shape,compiled", [((0,), False), ((1,), False), ((4, 1, 13, 3), False), ((9,), True),
                                            ((3, 5, 7), False), ((3, 5, 7), True), ((16, 3, 5), False),
                                            ((16, 3, 5), True), ((2, 4, 7, 3), True), ((6, 4, 5), True),
                                            ((5, 3, 8), False), ((5, 3, 8), True)], ids=str)
def test_fused_forms_are_bit_identical_to_the_ops(shape, compiled):
    """The plain-op forms that inline_codecs hands to Inductor give the ops' bytes and
    booleans, as written and as Inductor compiles them (also from a transposed mask)."""
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.rand(shape, generator=g) > 0.5
    pack, unpack = ops.fused_pack_bits, ops.fused_unpack_bits
    if compiled:
        pack, unpack = torch.compile(pack, dynamic=False), torch.compile(unpack, dynamic=False)
    for mask in (x, x.transpose(0, -1)) if x.dim() > 1 else (x,):
        packed = pack(mask)
        assert packed.dtype == torch.uint8 and torch.equal(packed, ops.pack_bits(mask))
        out = unpack(packed, list(mask.shape))
        assert out.dtype == torch.bool and torch.equal(out, mask)


@pytest.mark.parametrize("n", [1, 7, 20, 64])
def test_pack_bits_layout_is_bit_planar(n):
    # One True element at a time: element i sets bit i // P of byte i % P, P = ceil(n / 8).
    p = math.ceil(n / 8)
    for i in range(n):
        x = torch.zeros(n, dtype=torch.bool)
        x[i] = True
        expected = torch.zeros(p, dtype=torch.uint8)
        expected[i % p] = 1 << (i // p)
        assert torch.equal(ops.pack_bits(x), expected), i
        assert torch.equal(ops.fused_pack_bits(x), expected), i


def test_pack_bits_rejects_other_dtypes():
    with pytest.raises(ValueError, match="bool"):
        ops.pack_bits(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2 uint8 bytes"):
        ops.unpack_bits(torch.zeros(3, dtype=torch.uint8), [2, 5])


@pytest.mark.parametrize("shape", [(0,), (9,), (3, 5, 7)])
def test_opcheck(shape):
    x = torch.rand(shape) > 0.5
    torch.library.opcheck(torch.ops.razor.pack_bits.default, (x,))
    torch.library.opcheck(torch.ops.razor.unpack_bits.default, (ops.pack_bits(x), list(shape)))
    torch.library.opcheck(torch.ops.razor.pack_bits.default, (x.t() if x.dim() == 2 else x.flip(0),))


# ---------------------------------------------------------------- the pass


class DropMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.drop1 = nn.Dropout(0.1)
        self.fc2 = nn.Linear(40, 40)
        self.drop2 = nn.Dropout(0.3)
        self.head = nn.Linear(40, 6)

    def forward(self, x):
        return self.head(self.drop2(torch.tanh(self.fc2(self.drop1(F.gelu(self.fc1(x)))))))


def _mlp():
    torch.manual_seed(0)
    return DropMLP().train(), (torch.randn(4, 3, 24),)


def _dims(model, inputs):
    """Masks of each model, from its config and input shape (never hard-coded)."""
    if isinstance(model, DropMLP):
        (x,) = inputs
        return [(*x.shape[:-1], model.fc1.out_features), (*x.shape[:-1], model.fc2.out_features)]
    cfg, (b, t) = model.config, inputs[0].shape
    hidden = (b, t, cfg.hidden_size)
    per_layer = [(b, cfg.num_attention_heads, t, t), hidden, hidden]  # attention probs, 2 hidden dropouts
    return [hidden] + per_layer * cfg.num_hidden_layers  # embeddings dropout first


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return BertModel(cfg, add_pooling_layer=False).train(), (ids, mask)


BUILDERS = {"mlp": _mlp, "bert": _bert}


@pytest.fixture
def fallback_random():
    # aten's RNG in compiled code: the same seed draws the same dropout masks in
    # every compilation, so two compilations can be compared bit for bit.
    with torch._inductor.config.patch(fallback_random=True):
        yield


def _step(name, **options):
    model, inputs = BUILDERS[name]()
    with razorpass.record_compiles() as records:
        compiled = razorpass.compile(model, fullgraph=True, **options)
        torch.manual_seed(1)
        loss = loss_of(compiled(*inputs))
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads, records, model, inputs


@pytest.mark.parametrize(("name", "compiler"), [("mlp", "eager"), ("mlp", "inductor"), ("bert", "eager")])
def test_packed_masks_give_bit_identical_gradients(name, compiler, fallback_random):
    loss0, grads0, _, _, _ = _step(name, compiler=compiler, targets=())
    (loss1, grads1, records, model, inputs), code = run_and_get_code(_step, name, compiler=compiler,
                                                                      targets=("mask",))
    (rec,) = records
    assert rec.fallback is None and rec.compressed == []
    if compiler == "inductor":
        # inline_codecs gave Inductor every pack and unpack as plain ops
        assert rec.count("inline_codecs") == 2 * len(rec.packed) and len(code) == 2
        assert not [c for c in code if "razor.pack_bits" in c or "razor.unpack_bits" in c]
    else:
        assert rec.count("inline_codecs") == 0
    dims = _dims(model, inputs)
    assert [p.shape for p in rec.packed] == dims
    assert all(p.op_classes == ("mask",) and p.dtype == torch.bool for p in rec.packed)
    # nothing boolean is saved any more: one packed uint8 tensor per mask instead
    saved = rec.saved
    assert not [e for e in saved if e.dtype == torch.bool]
    assert sorted(e.shape for e in saved if e.op_class == "mask") == sorted(
        (math.ceil(math.prod(d) / 8),) for d in dims)
    assert torch.equal(loss0, loss1)
    _assert_same_gradients(grads0, grads1, compiler)


def _assert_same_gradients(grads0, grads1, compiler):
    """Bit-identical under the eager compiler. Under Inductor the masks are the same, but
    Inductor fuses their unpacking into the kernels that read them, so a float sum there
    may run in another order: equal up to float32 rounding."""
    assert grads0.keys() == grads1.keys()
    scale = max(g.abs().max().item() for g in grads0.values())  # a bias before a norm has ~0 gradient
    for k in grads0:
        if compiler == "eager":
            assert torch.equal(grads0[k], grads1[k]), k
        else:
            torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-6 * scale)


# bert under Inductor is left out: its gradients are checked above, and the byte count
# is Inductor's the same as the eager compiler's (mlp checks it under both)
@pytest.mark.parametrize(("name", "compiler"), [("mlp", "eager"), ("mlp", "inductor"), ("bert", "eager")])
def test_memory_report_counts_packed_masks_exactly(name, compiler):
    model, inputs = BUILDERS[name]()
    dims = _dims(model, inputs)
    dense = sum(math.prod(d) for d in dims)
    packed = sum(math.ceil(math.prod(d) / 8) for d in dims)
    rep = razorpass.memory_report(model, inputs, targets=("mask",), compiler=compiler)
    assert rep.fallbacks == []
    assert rep.by_op_class()["mask"] == (dense, packed)
    assert rep.baseline_bytes - rep.saved_bytes == dense - packed
    # the dropout masks were the only booleans: the rest is saved exactly as before
    assert rep.by_op_class()["dense"][1] == rep.baseline_bytes - dense


def test_mask_is_a_default_target_and_part_of_all():
    assert "mask" in RazorConfig().target_classes
    assert "mask" in RazorConfig(policy="backrazor").target_classes
    assert "mask" in RazorConfig(targets=("all",)).targets
    assert "mask" not in RazorConfig(targets=("linear",)).targets


def test_include_exclude_globs_select_masks():
    _, _, records, _, _ = _step("bert", compiler="eager", targets=("mask",), exclude=("encoder.layer.0.*",))
    layers = [p.layer for p in records[0].packed]
    assert layers == ["embeddings.dropout", "encoder.layer.1.attention.self",
                      "encoder.layer.1.attention.output.dropout", "encoder.layer.1.output.dropout"]
    bools = [e for e in records[0].saved if e.dtype == torch.bool]
    assert len(bools) == 3 and all(e.layer.startswith("encoder.layer.0.") for e in bools)


def test_roots_excluded_by_the_retry_are_left_dense(monkeypatch):
    from razorpass.passes import pack_masks

    def run(gm, ctx):
        ctx.excluded_roots[:] = [n.name for n in gm.graph.nodes if n.name == first]
        return pack_masks.run(gm, ctx)

    _, _, records, _, _ = _step("mlp", compiler="eager", targets=("mask",))
    first = records[0].packed[0].root
    torch._dynamo.reset()
    monkeypatch.setattr(pack_masks, "PASS", dataclasses.replace(pack_masks.PASS, run=run))
    _, _, records, _, _ = _step("mlp", compiler="eager", targets=("mask",))
    (rec,) = records
    assert rec.fallback is None
    roots = [p.root for p in rec.packed]
    assert len(roots) == 1 and first not in roots
    assert [e.shape for e in rec.saved if e.dtype == torch.bool] == [(4, 3, 40)]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_dynamic_batch_packs_with_symbolic_sizes(compiler, fallback_random):
    models = {t: _mlp()[0] for t in ((), ("mask",))}
    compiled = {t: razorpass.compile(m, compiler=compiler, targets=t) for t, m in models.items()}
    with razorpass.record_compiles() as records:
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 24)
            torch._dynamo.mark_dynamic(x, 0)
            grads = {}
            for t, m in models.items():
                m.zero_grad(set_to_none=True)
                torch.manual_seed(batch)
                loss_of(compiled[t](x)).backward()
                grads[t] = [p.grad for p in m.parameters()]
            _assert_same_gradients(*(dict(enumerate(grads[t])) for t in models), compiler)
    packed = [r for r in records if r.config.targets == ("mask",)]
    assert len(packed) == 1 and packed[0].fallback is None  # compiled once
    assert len(packed[0].packed) == 2
    assert packed[0].count("inline_codecs") == (4 if compiler == "inductor" else 0)  # with symbolic sizes too
    assert not [e for e in packed[0].saved if e.dtype == torch.bool]


def test_masks_computed_from_inputs_alone_are_left_to_the_partitioner():
    # nanoGPT's causal mask is a function of constants (no random op): the partitioner
    # decides how to keep it (recompute it or save it, maybe as smaller factors), so it
    # is not packed and the saved set is exactly that of the same graph without "mask".
    from .models import NanoGPT

    saved = {}
    for targets in ((), ("mask",)):
        torch.manual_seed(0)
        model, x = NanoGPT().train(), torch.randint(0, 50, (3, 16))
        with razorpass.record_compiles() as records:
            loss_of(razorpass.compile(model, compiler="eager", targets=targets)(x)).backward()
        (rec,) = records
        assert rec.fallback is None and rec.packed == []
        saved[targets] = [(e.shape, e.dtype) for e in rec.saved]
    assert saved[()] == saved[("mask",)]
    assert SkipReason.RECOMPUTABLE_FROM_INPUTS in [s.reason for s in rec.passes["pack_masks"].skipped]


@pytest.mark.parametrize("compiler", ["eager"])  # Inductor's packing: test_passes.py, the mlp cases here
def test_relu6_masks_are_packed_once_their_input_is_compressed(compiler):
    """The mask ``x <= 0 | x >= 6`` of a ReLU6 backward reads forward values only; with
    the BatchNorm and conv inputs compressed, it is computed in forward and saved
    packed (1 bit per element). Lossless: gradients are bit-identical to the same
    compilation without "mask", which saves it as one byte (or a float) per element."""
    from .models import SmallCNN

    def step(targets):
        torch.manual_seed(0)
        model, x = SmallCNN().train(), torch.randn(2, 3, 12, 12)
        with razorpass.record_compiles() as records:
            compiled = razorpass.compile(model, compiler=compiler, targets=targets, block_size=64, fullgraph=True)
            loss_of(compiled(x)).backward()
        (rec,) = records
        assert rec.fallback is None
        return {n: p.grad for n, p in model.named_parameters()}, rec, model, x

    grads0, rec0, _, _ = step(("conv", "batchnorm"))
    grads1, rec1, model, x = step(("conv", "batchnorm", "mask"))
    # the two ReLU6 inputs: bn1's output and conv3's output (shapes from the model)
    h, w = x.shape[2:]
    dims = [(x.shape[0], model.bn1.num_features, h, w), (x.shape[0], model.conv3.out_channels, h, w)]
    assert sorted(p.shape for p in rec1.packed) == sorted(dims)
    assert sorted(e.shape for e in rec1.saved if e.op_class == "mask") == sorted(
        (math.ceil(math.prod(d) / 8),) for d in dims)
    assert not [e for e in rec1.saved if e.dtype == torch.bool]
    # without "mask" the partitioner keeps each ReLU6 mask (or its input) at >= 1 byte per element
    big = [e for e in rec0.saved if e.op_class == "dense" and math.prod(e.shape) in {math.prod(d) for d in dims}]
    assert len(big) >= len(dims)
    assert rec1.count("inline_codecs") == (2 * len(dims) if compiler == "inductor" else 0)
    _assert_same_gradients(grads0, grads1, compiler)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_mask_recomputed_in_backward_is_used_there_unpacked(compiler):
    """With only "mask" targeted the partitioner recomputes one ReLU6 mask of SmallCNN in
    backward (from a tensor it saves anyway) and saves the other packed. The recomputed
    one would be packed and unpacked inside the backward graph, pure cost (about 0.2 s a
    step on EfficientNet-Lite0); drop_backward_packs uses it unpacked. Lossless: the
    gradients are those of the compilation without "mask"."""
    from .models import SmallCNN

    def step(targets):
        torch.manual_seed(0)
        model, x = SmallCNN().train(), torch.randn(2, 3, 12, 12)
        with razorpass.record_compiles() as records:
            compiled = razorpass.compile(model, compiler=compiler, targets=targets, fullgraph=True)
            loss_of(compiled(x)).backward()
        (rec,) = records
        assert rec.fallback is None
        return {n: p.grad for n, p in model.named_parameters()}, rec

    grads0, _ = step(())
    (grads1, rec), code = run_and_get_code(step, ("mask",))
    recomputed = [p for p in rec.packed if p.root in rec.recomputed_in_backward]
    kept = [p for p in rec.packed if p.root not in rec.recomputed_in_backward]
    assert len(recomputed) == 1 and len(kept) == 1
    assert rec.count("drop_backward_packs") == len(recomputed)
    assert [e.shape for e in rec.saved if e.op_class == "mask"] == [(math.ceil(math.prod(kept[0].shape) / 8),)]
    if compiler == "inductor":  # only the saved mask's pack (forward) and unpack (backward) are left
        assert rec.count("inline_codecs") == 2 * len(kept) and len(code) == 2
        assert not [c for c in code if "razor.pack_bits" in c or "razor.unpack_bits" in c]
    _assert_same_gradients(grads0, grads1, compiler)
