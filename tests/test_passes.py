"""Each pass alone, on a small function partitioned by AOTAutograd (``tests/graphs.py``):
what it rewrites (exact counts, the ops left in the graphs) and that values are what
they must be (bit for bit where a pass only moves, repeats or inlines work; against an
independently computed weight gradient where it encodes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from razorpass.kernels import ops  # noqa: F401  (registers the razor:: ops named below)
from razorpass.kernels.quantize import GELU_DERIVATIVE_RANGE
from razorpass.passes.records import PackedMask, QuantizedDerivative, QuantizedRoot
from razorpass.passes.vocab import Encoding, OpClass

from .graphs import partition

razor = torch.ops.razor
EAGER = {"compiler": "eager"}


def _mlp(w1, w2, x):
    return F.linear(F.gelu(F.linear(x, w1)), w2)


def _mlp_params(d=32, h=64):
    torch.manual_seed(0)
    return [torch.randn(h, d) / d ** 0.5, torch.randn(d, h) / h ** 0.5], [torch.randn(8, d)]


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_compress_saved_quantizes_a_linear_input_and_the_weight_gradient_reads_its_decode():
    params, inputs = _mlp_params()
    p = partition(_mlp, params, inputs, {**EAGER, "targets": ("linear",)})
    (root,) = p.record.compressed
    assert isinstance(root, QuantizedRoot) and root.encoding is Encoding.GROUP
    assert root.op_classes == (OpClass.LINEAR,) and (root.bits, root.group_size) == (3, 256)
    assert len(p.calls("fw", razor.quantize_group.default)) == 1
    assert len(p.calls("bw", razor.dequantize_group.default)) == 1
    # w2's gradient is dYᵀ · decode(code of gelu(x w1ᵀ)); w1's reads the batch (held, exact)
    w1, w2 = params
    h = F.gelu(F.linear(inputs[0], w1))
    decoded = razor.dequantize_group(*razor.quantize_group(h, 256, 3, ), list(h.shape), 256, 3, h.dtype)
    out = F.linear(h, w2)
    dy = 2 * out * torch.linspace(-1, 1, out.shape[-1]) ** 2
    torch.testing.assert_close(p.grads[1], dy.T @ decoded, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p.grads[1], dy.T @ h, rtol=1e-5, atol=1e-6)  # the code is not exact


def test_encode_derivative_saves_the_gelu_derivative_in_three_bits():
    params, inputs = _mlp_params()
    p = partition(_mlp, params, inputs, {**EAGER, "targets": ("gelu",)})
    (q,) = p.record.quantized
    assert isinstance(q, QuantizedDerivative) and q.encoding is Encoding.UNIFORM
    assert (q.bits, q.lo, q.hi) == (3, *GELU_DERIVATIVE_RANGE["none"])
    assert p.record.compressed == [] and len(p.calls("bw", razor.dequantize_uniform.default)) == 1
    # w1's gradient: (dh ⊙ decoded gelu'(z))ᵀ · x, with z = x w1ᵀ
    w1, w2 = params
    x = inputs[0]
    z = F.linear(x, w1).detach().requires_grad_(True)
    deriv = torch.autograd.grad(F.gelu(z).sum(), z)[0]
    decoded = razor.dequantize_uniform(razor.quantize_uniform(deriv, 3, q.lo, q.hi), list(z.shape), 3, q.lo, q.hi,
                                       z.dtype)
    out = F.linear(F.gelu(z), w2)
    dh = (2 * out * torch.linspace(-1, 1, out.shape[-1]) ** 2) @ w2
    torch.testing.assert_close(p.grads[0], (dh * decoded).T @ x, rtol=1e-5, atol=1e-6)


def test_pack_masks_packs_a_relu_mask_losslessly():
    params, inputs = _mlp_params()

    def fn(w1, w2, x):
        return F.linear(torch.relu(F.linear(x, w1)), w2)

    # with the ReLU output quantized for w2's gradient, backward needs the mask itself
    p = partition(fn, params, inputs, {**EAGER, "targets": ("linear", "mask")})
    dense = partition(fn, params, inputs, {**EAGER, "targets": ("linear",)})
    (mask,) = p.record.packed
    assert isinstance(mask, PackedMask) and mask.encoding is Encoding.PACKED_MASK
    assert len(p.calls("fw", razor.pack_bits.default)) == 1 and len(p.calls("bw", razor.unpack_bits.default)) == 1
    assert [e.dtype for e in p.record.saved if e.op_class == "mask"] == [torch.uint8]
    assert [e.dtype for e in dense.record.saved if e.dtype == torch.bool] == [torch.bool]
    _assert_same(p.grads, dense.grads)


def _ln_linear(w0, gamma, beta, w1, x):
    return F.linear(F.layer_norm(F.linear(x, w0), (64,), gamma, beta), w1)


def _ln_params():
    torch.manual_seed(0)
    return [torch.randn(64, 32) / 32 ** 0.5, 1 + 0.1 * torch.randn(64), 0.1 * torch.randn(64),
            torch.randn(16, 64) / 8], [torch.randn(2, 4, 32)]  # (B, T, C): the Linears read views


def test_fold_affine_reads_the_decoded_norm_output_directly():
    params, inputs = _ln_params()
    p = partition(_ln_linear, params, inputs, EAGER)
    off = partition(_ln_linear, params, inputs, EAGER, off="fold_affine")
    assert p.record.count("fold_affine") == 1 and off.record.count("fold_affine") == 0
    (decode,) = p.calls("bw", razor.dequantize_group.default)
    mms = p.calls("bw", torch.ops.aten.mm.default)
    # the weight gradient of w1 reads x̂ itself (through a view), not γ·x̂ + β
    assert any(decode in a.all_input_nodes for mm in mms for a in mm.all_input_nodes)
    for a, b in zip(p.grads, off.grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _attention(wq, wk, wv, x):
    q, k, v = (x @ w.T for w in (wq, wk, wv))
    p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return p @ v


def _attention_params():
    torch.manual_seed(0)
    return [torch.randn(32, 32) / 8 for _ in range(3)], [torch.randn(2, 64, 32)]


def test_split_decodes_decodes_the_softmax_output_again_after_the_bmm_of_dp():
    params, inputs = _attention_params()
    p = partition(_attention, params, inputs, EAGER)
    off = partition(_attention, params, inputs, EAGER, off="split_decodes")
    assert p.record.count("split_decodes") == 1
    decodes = [n for n in p.bw.graph.nodes if n.target in (razor.decompress.default, razor.decompress_offsets.default)]
    assert len(decodes) == 2 and decodes[0].args == decodes[1].args
    assert off.record.count("split_decodes") == 0
    _assert_same(p.grads, off.grads)


def test_hoist_decodes_runs_a_weight_gradients_decode_right_after_dy():
    torch.manual_seed(0)
    params = [torch.randn(64, 32) / 6, torch.zeros(64), torch.randn(32, 64) / 8, torch.zeros(32)]
    inputs = [torch.randn(2, 4, 32)]  # as nn.Linear on (B, T, C): addmm, whose input gradient comes first

    def fn(w1, b1, w2, b2, x):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    p = partition(fn, params, inputs, {**EAGER, "targets": ("linear",)})
    off = partition(fn, params, inputs, {**EAGER, "targets": ("linear",)}, off="hoist_decodes")
    assert p.record.count("hoist_decodes") == 1 and off.record.count("hoist_decodes") == 0

    def decode_before_input_grad(gm):
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        (decode,) = [n for n in gm.graph.nodes if n.target is razor.dequantize_group.default]
        mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
        return order[decode] < order[mms[0]]

    assert decode_before_input_grad(p.bw) and not decode_before_input_grad(off.bw)
    _assert_same(p.grads, off.grads)


def test_drop_backward_packs_uses_a_mask_recomputed_in_backward_as_it_is():
    torch.manual_seed(0)
    params, inputs = [torch.randn(64, 32) / 6], [torch.randn(8, 32)]

    def fn(w, x):
        h = F.linear(x, w)
        return torch.relu(h) * h  # h is saved anyway: the partitioner recomputes h > 0 in backward

    p = partition(fn, params, inputs, {**EAGER, "targets": ("mask",)})
    off = partition(fn, params, inputs, {**EAGER, "targets": ("mask",)}, off="drop_backward_packs")
    assert p.record.count("drop_backward_packs") == 1 and len(p.record.packed) == 1
    assert p.record.recomputed_in_backward == [p.record.packed[0].root]
    assert not p.calls("bw", razor.pack_bits.default) and not p.calls("bw", razor.unpack_bits.default)
    assert len(off.calls("bw", razor.pack_bits.default)) == 1
    _assert_same(p.grads, off.grads)


_CODECS = [razor.pack_bits.default, razor.unpack_bits.default, razor.quantize_uniform.default,
           razor.dequantize_uniform.default, razor.quantize_group.default, razor.dequantize_group.default]


@pytest.mark.parametrize("form,dtype,inlined", [
    ("kernel", torch.float32, 0),
    ("generated", torch.float32, 6),
    ("auto", torch.float32, 3),  # the masks and the GELU derivative's decode (passes/codecs.py)
    # the masks and the GELU derivative (the decomposition computes it in float32); the
    # bfloat16 ReLU output keeps its quantizer ops
    ("generated", torch.bfloat16, 4),
])
def test_inline_codecs_hands_the_plain_op_forms_to_the_compiler(form, dtype, inlined):
    params, inputs = _mlp_params()
    params, inputs = [p.to(dtype) for p in params], [x.to(dtype) for x in inputs]

    def fn(w1, w2, x):
        return F.linear(torch.relu(F.gelu(F.linear(x, w1))), w2)

    # the pass acts under Inductor only; AOTAutograd's graphs still run eagerly here. The
    # ReLU output is quantized for w2's gradient, so the mask is packed and unpacked; the
    # GELU derivative encoded and decoded.
    p = partition(fn, params, inputs, {"codec_form": form})
    off = partition(fn, params, inputs, {}, off="inline_codecs")
    assert [len(off.calls(g, op)) for g in ("fw", "bw") for op in _CODECS] == [1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1]
    assert p.record.count("inline_codecs") == inlined
    left = sum(len(p.calls(g, op)) for g in ("fw", "bw") for op in _CODECS)
    assert left == 6 - inlined
    if dtype == torch.bfloat16:
        assert p.calls("fw", razor.quantize_group.default) and p.calls("bw", razor.dequantize_group.default)
    _assert_same(p.grads, off.grads)
    # what crosses to backward is unchanged: the same saved tensors, shapes and dtypes
    saved = [[(v.shape, v.dtype) for n in g.fw.graph.output_node().args[0]
              if isinstance(v := n.meta.get("val"), torch.Tensor)] for g in (p, off)]
    assert saved[0] == saved[1]


def test_center_quantize_quantizes_a_batchnorm_input_centered_in_one_op():
    torch.manual_seed(0)
    params = [torch.randn(8, 3, 3, 3) / 5, 1 + 0.1 * torch.randn(8), 0.1 * torch.randn(8)]
    inputs = [torch.randn(4, 3, 12, 12), torch.zeros(8), torch.ones(8)]

    def fn(w, gamma, beta, x, mean, var):
        y = F.batch_norm(F.conv2d(x, w, padding=1) + 3.0, mean, var, gamma, beta, training=True)
        return F.relu6(y).mean((2, 3))

    p = partition(fn, params, inputs, {**EAGER, "targets": ("batchnorm",)})
    off = partition(fn, params, inputs, {**EAGER, "targets": ("batchnorm",)}, off="center_quantize")
    assert p.record.count("center_quantize") == 1
    assert len(p.calls("fw", razor.quantize_group_centered.default)) == 1
    assert not p.calls("fw", razor.quantize_group.default)
    assert len(off.calls("fw", razor.quantize_group.default)) == 1
    _assert_same(p.grads, off.grads)


@pytest.mark.parametrize("name", ["compress_saved", "encode_derivative", "pack_masks"])
def test_a_switched_off_encoding_pass_files_no_result_and_encodes_nothing(name):
    params, inputs = _mlp_params()

    def fn(w1, w2, x):
        return F.linear(torch.relu(F.gelu(F.linear(x, w1))), w2)

    # on: the ReLU output quantized, the GELU derivative encoded, the ReLU mask packed
    p = partition(fn, params, inputs, EAGER, off=name)
    assert name not in p.record.passes
    assert {n: p.record.count(n) for n in ("compress_saved", "encode_derivative", "pack_masks")} == {
        n: int(n != name) for n in ("compress_saved", "encode_derivative", "pack_masks")}
