"""``razor::quantize_group_centered`` and the ``center_quantize`` pass: a BatchNorm input
quantized as ``x - mean`` without the difference written out. The op gives the codes
and bounds of ``quantize_group`` on the materialized difference, bit for bit (portable
and AVX-512 paths, channel runs that straddle groups, non-contiguous inputs, other
dtypes through the fallback); the pass changes no gradient."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import razorpass
from razorpass.kernels import ops, quantize, quantize_cpu
from razorpass.passes import pipeline

from .test_quantize_group import simd  # noqa: F401  (fixture: portable and wide paths)

CASES = [  # (shape, group): channel runs of 35 across groups of 16; exact 64-runs; inner 1; a cut last group
    ((4, 3, 5, 7), 16), ((2, 8, 8, 8), 64), ((5, 6), 8), ((3, 4, 10), 24), ((2, 5, 3, 3), 64), ((1, 2, 1, 1), 8)]


def _same(got, want):
    """Codes equal; bounds equal bit for bit (a zero's sign too), a NaN bound where the
    other has one, whatever its payload."""
    (codes, bounds), (w_codes, w_bounds) = got, want
    nan = bounds.isnan()
    return (torch.equal(codes, w_codes) and torch.equal(nan, w_bounds.isnan())
            and torch.equal(bounds.view(torch.int16)[~nan], w_bounds.view(torch.int16)[~nan]))


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + torch.arange(shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    return x, x.mean([d for d in range(len(shape)) if d != 1], keepdim=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", CASES, ids=str)
def test_centered_equals_quantize_of_the_difference(shape, group, bits, simd):  # noqa: F811
    assert quantize_cpu.load() is not None
    x, mean = _data(shape, seed=sum(shape) + bits)
    flat = x.view(-1)
    flat[:group] = 2.5  # a constant group where it fits in one channel: step 0, code 0
    flat[-1] = float("nan")  # a NaN group
    if flat.numel() > 2 * group:
        flat[group + 3] = float("inf")
    want = quantize.torch_quantize_group(x - mean, group, bits)
    for center in (mean, mean.reshape(-1)):  # (1, C, 1, ...) as the graph has it, or flat
        assert _same(ops.quantize_group_centered(x, center, group, bits), want)
    if x.dim() == 4:  # a channels-last x is read in logical order
        cl = x.contiguous(memory_format=torch.channels_last)
        assert _same(ops.quantize_group_centered(cl, mean, group, bits), want)


def test_other_dtypes_subtract_first():
    x, mean = _data((2, 4, 6), 0)
    for xd, md in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        got = ops.quantize_group_centered(x.to(xd), mean.to(md), 16, 3)
        want = quantize.torch_quantize_group(x.to(xd) - mean.to(md), 16, 3)
        assert _same(got, want)


def test_bad_center_is_refused():
    with pytest.raises(ValueError, match="x.shape\\[1\\] elements"):
        ops.quantize_group_centered(torch.zeros(2, 4, 3), torch.zeros(3), 8, 3)
    with pytest.raises(ValueError, match="x.shape\\[1\\] elements"):
        ops.quantize_group_centered(torch.zeros(8), torch.zeros(8), 8, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.quantize_group_centered(torch.zeros(2, 4, 3), torch.zeros(4), 12, 3)


def test_opcheck():
    x, mean = _data((2, 3, 4, 4), 1)
    torch.library.opcheck(torch.ops.razor.quantize_group_centered.default, (x, mean, 16, 3))


class _BNNet(torch.nn.Module):
    """Two BatchNorms after convolutions (the second over an odd 5x5 map) and a 1-d one."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.BatchNorm2d(16)
        self.fc, self.b3 = torch.nn.Linear(16, 12), torch.nn.BatchNorm1d(12)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.nn.functional.relu6(self.b2(self.c2(x)))
        return self.head(torch.relu(self.b3(self.fc(x.mean((2, 3))))))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_the_pass_changes_no_gradient(compiler, monkeypatch):
    """Every quantized BatchNorm input of the net goes through the centered op, and the
    gradients are those of the same compilation without the pass: bit for bit under the
    eager compiler (the same codes, the same backward graph), and under Inductor too,
    as its backward graph is unchanged."""

    def step(with_pass):
        # a pass is switched off by name as Inductor's own are (``disabled_passes``)
        off = "" if with_pass else "center_quantize"
        torch.manual_seed(0)
        model, x = _BNNet().train(), torch.randn(4, 3, 11, 11)
        with razorpass.record_compiles() as records, torch._inductor.config.patch(disabled_passes=off):
            compiled = razorpass.compile(model, compiler=compiler, fullgraph=True)
            compiled(x).square().mean().backward()
        (rec,) = records
        assert rec.fallback is None
        return {n: p.grad for n, p in model.named_parameters()}, rec

    grads0, rec0 = step(False)
    (grads1, rec1), code = run_and_get_code(step, True)
    bn_roots = [r for r in rec1.encoded if "batchnorm" in r.op_classes]
    assert len(bn_roots) == 3 and "center_quantize" not in rec0.passes
    assert rec1.count("center_quantize") == len(bn_roots)
    if compiler == "inductor":
        assert code[0].count("torch.ops.razor.quantize_group_centered.default(") == len(bn_roots)
    assert grads0.keys() == grads1.keys()
    for k in grads0:
        assert torch.equal(grads0[k], grads1[k]), k
