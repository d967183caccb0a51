"""The offsets layout of a top-k copy: the kept positions per group instead of the
packed mask. Lossless: the offsets are checked bit for bit against the mask they come
from, the decoded tensor against ``razor::decompress`` of the mask, and a compiled
step's gradients against the mask layout's; the bytes saved are counted from the
shapes alone."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import razorpass
from razorpass import RazorConfig
from razorpass.format import compressed_nbytes
from razorpass.kernels import ops
from razorpass.report import measure_saved

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _oracle_offsets(mask: torch.Tensor, group_size: int, k: int) -> list[list[int]]:
    """Kept positions of every mask row, read bit by bit in Python, padded with the
    group size."""
    rows = []
    for row in mask.tolist():
        kept = [j for j in range(group_size) if (row[j // 8] >> (j % 8)) & 1]
        assert len(kept) <= k
        rows.append(kept + [group_size] * (k - len(kept)))
    return rows


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, except that a NaN need only meet a NaN: torch's CPU kernels
    do not all keep a NaN's payload (``razor::decompress`` differs from its own PyTorch
    kernel there)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    return torch.equal(a[keep].view(_INT[a.dtype]), b[keep].view(_INT[b.dtype]))


@pytest.mark.parametrize("shape, group, k", [
    ((5, 100), 64, 3),      # padded last group (500 = 7 * 64 + 52)
    ((3, 7), 8, 8),         # k = group: every element kept; 21 = 2 * 8 + 5
    ((10,), 8, 4),          # last group of 2 real elements, fewer than k
    ((4, 1024), 1024, 31),  # sparsity 0.97 at the default block
    ((3, 5), 8, 0),         # nothing kept
    ((0, 5), 8, 2),         # no elements
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offsets_are_the_masks_kept_positions_and_decode_to_the_same_tensor(shape, group, k, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    flat = x.view(-1)
    if flat.numel() > 12:  # NaN counts as the largest; ties go to the lower position; -0.0 kept as is
        flat[1], flat[5], flat[6], flat[9] = float("nan"), 3.0, 3.0, -0.0
    mask, values = ops.compress(x, group, k, torch.bfloat16)
    for backend in ("auto", "torch"):  # the native CPU kernel, then the PyTorch one
        offsets, values2 = ops.compress_offsets(x, group, k, torch.bfloat16, backend)
        assert offsets.dtype == torch.int16 and tuple(offsets.shape) == tuple(values.shape)
        assert offsets.tolist() == _oracle_offsets(mask, group, k)
        assert _same_bits(values2, values)
        for out in (torch.float32, dtype):
            dense = ops.decompress(mask, values, list(shape), group, out)
            assert _same_bits(ops.decompress_offsets(offsets, values, list(shape), group, out, backend), dense)


def test_groups_of_32768_and_more_store_int32_offsets():
    torch.manual_seed(1)
    x = torch.randn(2, 40000)
    mask, values = ops.compress(x, 40000, 50, torch.float32)
    for backend in ("auto", "torch"):
        offsets, _ = ops.compress_offsets(x, 40000, 50, torch.float32, backend)
        assert offsets.dtype == torch.int32 and offsets.tolist() == _oracle_offsets(mask, 40000, 50)
        assert torch.equal(ops.decompress_offsets(offsets, values, [2, 40000], 40000, torch.float32, backend),
                           ops.decompress(mask, values, [2, 40000], 40000, torch.float32))


def test_offsets_of_another_shape_or_dtype_are_refused():
    x = torch.randn(4, 64)
    offsets, values = ops.compress_offsets(x, 64, 4, torch.bfloat16)
    with pytest.raises(ValueError, match="int16 offsets"):
        ops.decompress_offsets(offsets.to(torch.int32), values, [4, 64], 64, torch.float32)
    with pytest.raises(ValueError, match="int16 offsets"):
        ops.decompress_offsets(offsets[:, :3], values, [4, 64], 64, torch.float32)
    with pytest.raises(ValueError, match="topk_layout"):
        RazorConfig(topk_layout="bits")


def _index_bytes(group: int, k: int, layout: str) -> int:
    """Bytes per group of the positions: the packed mask or 2-byte (4 from 2**15) offsets."""
    mask, offsets = math.ceil(group / 8), k * (2 if group <= 32767 else 4)
    return {"mask": mask, "offsets": offsets, "auto": min(mask, offsets)}[layout]


@pytest.mark.parametrize("group", [8, 64, 1024, 4096, 32768, 100000])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.93, 0.94, 0.97, 0.99, 0.999])
def test_auto_takes_the_smaller_layout(group, sparsity):
    cfg = RazorConfig(sparsity=sparsity)
    k = math.ceil((1 - Fraction(sparsity).limit_denominator(10**6)) * group)
    mask, offsets = _index_bytes(group, k, "mask"), _index_bytes(group, k, "offsets")
    assert cfg.topk_offsets(group, k) == (offsets < mask)
    assert RazorConfig(topk_layout="mask").topk_offsets(group, k) is False
    assert RazorConfig(topk_layout="offsets").topk_offsets(group, k) is True


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.Linear(256, 8))


@pytest.mark.parametrize("compiler, granularity", [("eager", "block"), ("eager", "sample"), ("inductor", "block")])
def test_a_compiled_step_stores_offsets_at_high_sparsity_and_gets_the_same_gradient(compiler, granularity):
    # 2-D: a "sample" is a row of the Linear's input on every path (Inductor's joint-graph
    # passes may fold the views around a 3-D Linear, and the layer then receives 2-D)
    x = torch.randn(256, 64)
    grads, saved, layouts = {}, {}, {}
    # "auto" compiles the graph "offsets" does (a third Inductor compile would add time only)
    tried = ("mask", "offsets", "auto") if compiler == "eager" else ("mask", "offsets")
    for layout in tried:
        model = _model()
        cfg = RazorConfig(policy="backrazor", sparsity=0.97, granularity=granularity, compiler=compiler,
                          topk_layout=layout)
        compiled = razorpass.compile(model, cfg)
        with razorpass.record_compiles() as records:
            compiled(x).square().sum().backward()
        grads[layout] = [p.grad for p in model.parameters()]
        layouts[layout] = [c.layout for c in records[0].compressed]
        saved[layout] = sum(b for _, b in measure_saved(lambda: compiled(x), exclude=[*model.parameters(), x]))
        # what the format module says razorpass saves for the two Linear inputs
        assert saved[layout] - 256 * 256 * 4 == 2 * compressed_nbytes((256, 256), cfg, torch.float32)
    for a, b in zip(grads["offsets"], grads["mask"]):
        assert torch.equal(a, b)
    expected = {"mask": ["mask"] * 2, "offsets": ["offsets"] * 2, "auto": ["offsets"] * 2}
    assert layouts == {k: expected[k] for k in tried}
    # Saved: the GELU input dense (Back Razor's rule does not target it) and the inputs of
    # the last two Linears, each 256 * 256 elements in groups of 1024 (block) or of one
    # sample, 256 (sample); k = ceil(0.03 * group) bf16 values per group.
    group = 1024 if granularity == "block" else 256
    k, groups = math.ceil(Fraction(3, 100) * group), 256 * 256 // group
    for layout in ("mask", "offsets"):
        per_group = _index_bytes(group, k, layout) + 2 * k
        assert saved[layout] == 256 * 256 * 4 + 2 * groups * per_group
    assert saved.get("auto", saved["offsets"]) == saved["offsets"] < saved["mask"]
    # and the gradient is Back Razor's: the eager reference of the same rule
    model = _model()
    with razorpass.reference.apply(model, RazorConfig(policy="backrazor", sparsity=0.97, granularity=granularity)):
        model(x).square().sum().backward()
    for p, g in zip(model.parameters(), grads["offsets"]):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
