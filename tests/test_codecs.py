"""The codec registry: one entry per encoding, each entry's byte rule equal to what its
encode op writes, a lossless codec decoding bit for bit, and no second registration."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from razorpass.passes import codecs
from razorpass.passes.codecs import CODECS, Codec, codec_of, encode_ops, register, value_decode_ops
from razorpass.passes.vocab import CodecForm, Encoding


def _encode_args(codec: Codec, x: torch.Tensor):
    """(encode args after the tensor, byte-rule args after numel) of a small example."""
    if codec.encoding in (Encoding.TOPK_MASK, Encoding.TOPK_OFFSETS):
        return (64, 3, torch.bfloat16), (64, 3, torch.bfloat16)
    if codec.encoding is Encoding.GROUP:
        return (64, 3), (64, 3)
    if codec.encoding is Encoding.GROUP_NORMAL:
        return (64, 2), (64, 2)
    if codec.encoding is Encoding.GROUP_STOCHASTIC:
        return (torch.tensor(7), 64, 3), (64, 3)
    if codec.encoding is Encoding.GROUP_CENTERED:
        return (torch.randn(x.shape[1]), 64, 3), (64, 3)
    if codec.encoding is Encoding.UNIFORM:
        return (3, -0.2, 1.2), (3,)
    return (), ()


def test_every_encoding_has_one_entry():
    assert set(CODECS) == set(Encoding)
    assert encode_ops() == {c.encode for c in CODECS.values()} and len(encode_ops()) == len(Encoding)


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("shape", [(4, 37, 5), (2, 64)])
def test_the_byte_rule_is_what_the_encode_op_writes(encoding, shape):
    codec = CODECS[encoding]
    torch.manual_seed(0)
    x = torch.randn(shape) > 0 if encoding is Encoding.PACKED_MASK else torch.randn(shape)
    encode_args, rule_args = _encode_args(codec, x)
    out = codec.encode(x, *encode_args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert sum(t.numel() * t.element_size() for t in outs) == codec.nbytes(x.numel(), *rule_args)
    assert codec_of(codec.encode) is codec and codec_of(codec.decode).decode is codec.decode


def test_a_lossless_codec_decodes_bit_for_bit_and_stores_a_mask():
    (codec,) = [c for c in CODECS.values() if c.lossless]
    x = torch.randn(3, 41) > 0.3
    assert torch.equal(codec.decode(codec.encode(x), list(x.shape)), x)
    assert not codec.values and codec.decode not in value_decode_ops()
    assert value_decode_ops() == {c.decode for c in CODECS.values() if not c.lossless}


def test_a_second_registration_is_refused():
    with pytest.raises(ValueError, match="registered already"):
        register(CODECS[Encoding.GROUP])
    other = dataclasses.replace(CODECS[Encoding.GROUP], encoding="group_copy")
    with pytest.raises(ValueError, match="encode op of group"):
        register(other)
    assert set(codecs.CODECS) == set(Encoding)


def test_inline_forms_are_the_ops_bit_for_bit():
    torch.manual_seed(0)
    mask = torch.randn(5, 13) > 0
    packed = CODECS[Encoding.PACKED_MASK]
    assert torch.equal(packed.inline_encode(mask), packed.encode(mask))
    assert torch.equal(packed.inline_decode(packed.encode(mask), [5, 13]), mask)
    uniform = CODECS[Encoding.UNIFORM]
    codes = uniform.encode(torch.rand(7, 9), 3, 0.0, 1.0)
    a = uniform.decode(codes, [7, 9], 3, 0.0, 1.0, torch.float32)
    b = uniform.inline_decode(codes, [7, 9], 3, 0.0, 1.0, torch.float32)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert [c.encoding for c in CODECS.values() if c.inline_encode or c.inline_decode] == [
        Encoding.GROUP, Encoding.GROUP_CENTERED, Encoding.GROUP_STOCHASTIC, Encoding.UNIFORM, Encoding.PACKED_MASK]


def test_codec_form_picks_the_generated_form_per_device_and_direction():
    """"auto" follows ``generated_on`` (the masks everywhere, the GELU derivative's decode
    everywhere, the quantizers nowhere: measured slower on CPU, unmeasured on CUDA);
    "kernel" never, "generated" wherever a form exists; top-k has none."""
    group, uniform, packed = CODECS[Encoding.GROUP], CODECS[Encoding.UNIFORM], CODECS[Encoding.PACKED_MASK]
    auto = CodecForm.AUTO
    for device in ("cpu", "cuda"):
        assert group.generated("encode", device, auto) is None and group.generated("decode", device, auto) is None
        assert uniform.generated("encode", device, auto) is None
        assert uniform.generated("decode", device, auto) is uniform.inline_decode is not None
        assert packed.generated("encode", device, auto) is packed.inline_encode is not None
        assert packed.generated("decode", device, auto) is packed.inline_decode is not None
    assert group.generated("encode", "cpu", CodecForm.GENERATED) is group.inline_encode is not None
    for codec in CODECS.values():
        for direction in ("encode", "decode"):
            form = codec.inline_encode if direction == "encode" else codec.inline_decode
            for device in ("cpu", "cuda", "mps"):
                assert codec.generated(direction, device, CodecForm.KERNEL) is None
                assert codec.generated(direction, device, CodecForm.GENERATED) is form
    assert CODECS[Encoding.TOPK_MASK].inline_encode is None and CODECS[Encoding.TOPK_OFFSETS].inline_decode is None


def test_the_registry_names_the_kernels_the_ops_run():
    from razorpass.kernels import ops

    for codec in CODECS.values():
        for op in (codec.encode, codec.decode):
            takes_backend = any(a.name == "backend" for a in op._schema.arguments)
            for device, kernels in codec.kernels.items():
                if not takes_backend:
                    assert kernels == ("torch",), op
                    continue
                assert kernels[-1] == "torch" and set(kernels) <= set(ops.BACKENDS)
                if device == "cuda":
                    pytest.importorskip("triton")
                assert ops._kernel(op._schema.name, torch.device(device), "auto") == kernels[0], (op, device)


def test_the_gpu_proof_times_the_registrys_generated_forms():
    from razorpass.bench.gpu import generated_form

    for codec in CODECS.values():
        for op, form in ((codec.encode, codec.inline_encode), (codec.decode, codec.inline_decode)):
            assert generated_form(op._schema.name.removeprefix("razor::")) is form, op
