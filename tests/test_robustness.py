"""Robustness of razorpass outside the common path: zero-size tensors, NaN / inf
activations, complex and integer activations, inference, dynamic shapes, graph breaks
and a long training loop.

Every gradient is compared against an independent computation: the eager reference of
the rule (``razorpass.reference.apply``) where the rule applies, plain eager where
nothing is compressed.
"""

from __future__ import annotations

import gc
import logging
import math

import pytest
import torch
import torch.nn as nn

import razorpass
from razorpass.passes.vocab import SkipReason
from razorpass import RazorConfig, reference
from razorpass.format import compressed_nbytes

from .models import MLP, loss_of, tiny_bert

TIGHT = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: on a shared, loaded machine OpenMP threads waiting on each other
    # make each step ~30x slower (200 training steps: 13 s instead of 0.5 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, fn, *inputs, loss=loss_of):
    model.zero_grad(set_to_none=True)
    loss(fn(*inputs)).backward()
    return _grads(model)


def _assert_grads_close(got, want, **tol):
    tol = tol or TIGHT
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def _layers(record):
    return sorted(c.layer for c in record.compressed)


# ------------------------------------------------------------------ a. zero-size
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("granularity", ["block", "sample"])
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_compress_empty_tensor(shape, granularity, backend):
    x = torch.empty(shape)
    cfg = RazorConfig(policy="backrazor", sparsity=0.6, granularity=granularity, block_size=16)
    c = razorpass.compress(x, sparsity=0.6, granularity=granularity, block_size=16, backend=backend)
    assert c.mask.shape[0] == 0 and c.values.shape[0] == 0
    assert c.nbytes == 0 == compressed_nbytes(shape, cfg, x.dtype)
    d = razorpass.decompress(c, backend=backend)
    assert d.shape == x.shape and d.dtype == x.dtype
    assert torch.equal(d, torch.zeros(shape))


@pytest.mark.parametrize("granularity", ["block", "sample"])
def test_zero_size_batch_compiles_and_matches_eager(granularity):
    """A batch of 0 samples (Dynamo specializes size 0): the compiled model runs, and its
    gradients (all zero: no samples) equal eager's and the reference's."""
    model = MLP()
    x = torch.randn(0, 3, 24)
    cfg = RazorConfig(policy="backrazor", sparsity=0.7, granularity=granularity, block_size=64, compiler="eager", value_dtype="float32")
    dense = _run(model, model, x)
    with reference.apply(model, cfg):
        ref = _run(model, model, x)
    with razorpass.record_compiles() as records:
        got = _run(model, razorpass.compile(model, cfg), x)
    assert [r.fallback for r in records] == [None]
    _assert_grads_close(got, ref)
    _assert_grads_close(got, dense)


class ZeroWidth(nn.Module):
    """A zero-size intermediate: ``mid`` reads h[:, :0] of shape (B, 0)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.mid = nn.Linear(0, 6)
        self.fc2 = nn.Linear(40, 6)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + self.mid(h[:, :0])


@pytest.mark.parametrize("granularity", ["block", "sample"])
def test_zero_size_intermediate(granularity):
    """Before the fix, "sample" made a group of 0 elements for the (B, 0) tensor and the
    compiler died of ZeroDivisionError. Its sparsified copy is itself (no elements), so
    the expected gradients are the reference with ``mid`` excluded (the reference itself
    fails on it: its sparsify divides by the zero group size under "sample", and its
    Linear backward cannot reshape a (B, 0) input to (-1, 0))."""
    torch.manual_seed(0)
    model = ZeroWidth()
    x = torch.randn(4, 24)
    cfg = RazorConfig(policy="backrazor", sparsity=0.7, granularity=granularity, block_size=64, compiler="eager", value_dtype="float32",
                      targets=("linear",))
    with reference.apply(model, RazorConfig.from_options(cfg, exclude=("mid",))):
        ref = _run(model, model, x)
    dense = _run(model, model, x)
    with razorpass.record_compiles() as records:
        got = _run(model, razorpass.compile(model, cfg), x)
    assert [r.fallback for r in records] == [None]
    assert "fc2" in _layers(records[0])
    _assert_grads_close(got, ref)
    assert (got["fc2.weight"] - dense["fc2.weight"]).abs().max() > 1e-3, "fc2's input was not sparsified"
    if granularity == "sample":
        assert [(s.reason, s.detail) for s in records[0].skipped] == [(SkipReason.NO_SAMPLE_SIZE, "per-sample size 0")]


# ------------------------------------------------------------------ b. NaN / inf
class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _loss_without_row_1(out):
    # sample 1 carries the non-finite value; the loss leaves it out, so its output
    # gradient is 0 and fc2's weight gradient is NaN exactly in the columns where the
    # saved copy of fc2's input keeps a non-finite element of sample 1 (0 * NaN, 0 * inf)
    return (out[[0, 2, 3]] * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum()


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_non_finite_activation_is_kept(special):
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(4, 16)
    x[1, 3] = special
    sparsity, block = 0.9, 64
    cfg = RazorConfig(policy="backrazor", sparsity=sparsity, block_size=block, compiler="eager", value_dtype="float32",
                      targets=("linear",))
    with reference.apply(model, cfg):
        ref = _run(model, model, x, loss=_loss_without_row_1)
    with razorpass.record_compiles() as records:
        got = _run(model, razorpass.compile(model, cfg), x, loss=_loss_without_row_1)
    assert [r.fallback for r in records] == [None] and _layers(records[0]) == ["fc2"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], equal_nan=True, **TIGHT, msg=lambda m, k=k: f"{k}: {m}")

    # Independently: fc2's input h = relu(fc1(x)) is one group of 4 x 16 = 64 elements;
    # its non-finite elements all lie in row 1 and are the largest magnitudes (NaN
    # above all), so the kept ones are the first k of them (ties to the lower index).
    with torch.no_grad():
        h = torch.relu(model.fc1(x))
    k = math.ceil((1 - sparsity) * block)
    non_finite_cols = (~torch.isfinite(h[1])).nonzero().flatten().tolist()
    assert len(non_finite_cols) >= 1
    expected = torch.zeros(16, dtype=torch.bool)
    expected[non_finite_cols[:k]] = True
    assert torch.equal(torch.isnan(got["fc2.weight"]).any(0), expected), "non-finite activations not kept as top-k"
    if special != special:  # NaN: a whole row of NaN, more than k of them
        assert len(non_finite_cols) > k


# ------------------------------------------------------------------ c. complex / int
class ComplexLinear(nn.Module):
    """A complex Linear between two real ones (view_as_complex / view_as_real)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.cl = nn.Linear(8, 8, dtype=torch.cfloat)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        c = torch.view_as_complex(h.reshape(h.shape[0], 8, 2)) * (1 + 1j)
        return self.fc2(torch.view_as_real(self.cl(c)).reshape(h.shape[0], 16))


class FFTThenLinear(nn.Module):
    """A complex intermediate (rfft) that reaches a Linear through view_as_real."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        spec = torch.view_as_real(torch.fft.rfft(h, dim=-1))[:, :8]  # (B, 8, 2)
        return self.fc2(spec.reshape(h.shape[0], 16))


class IntegerPath(nn.Module):
    """An integer intermediate (a count) cast back to float and fed to a Linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        counts = (self.fc1(x) > 0).to(torch.int32).cumsum(-1)
        return self.fc2(counts.float() * torch.tanh(self.fc1(x)))


def _complex_loss(out):
    return (out.abs().pow(2) * torch.linspace(-1, 1, out.shape[-1])).sum()


def test_complex_linear_warns_and_stays_dense(caplog):
    torch.manual_seed(0)
    model = ComplexLinear()
    x = torch.randn(4, 16)
    cfg = RazorConfig(policy="backrazor", sparsity=0.7, block_size=8, compiler="eager", value_dtype="float32", targets=("linear",))
    dense = _run(model, model, x, loss=_complex_loss)
    # the expected rule: fc2's (real) input sparsified, the complex Linear left dense
    with reference.apply(model, RazorConfig.from_options(cfg, exclude=("cl",))):
        ref = _run(model, model, x, loss=_complex_loss)
    with caplog.at_level(logging.WARNING, logger="razorpass"), razorpass.record_compiles() as records:
        got = _run(model, razorpass.compile(model, cfg), x, loss=_complex_loss)
    assert [r.fallback for r in records] == [None]
    assert _layers(records[0]) == ["fc2"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "razorpass" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "cl" in warnings[0] and "complex64" in warnings[0] and "aten.mul" in warnings[0], warnings[0]
    (skip,) = records[0].skipped
    assert skip.reason is SkipReason.UNSUPPORTED_DTYPE and "complex64" in skip.detail
    _assert_grads_close(got, ref)
    for k in ("cl.weight", "cl.bias", "fc1.weight", "fc1.bias"):  # the complex layer and below: exact
        torch.testing.assert_close(got[k], dense[k], **TIGHT)
    assert (got["fc2.weight"] - dense["fc2.weight"]).abs().max() > 1e-3, "fc2's input was not sparsified"


@pytest.mark.parametrize("model_cls", [FFTThenLinear, IntegerPath])
def test_complex_or_integer_intermediate_of_a_real_linear(model_cls, caplog):
    """A complex (fft) or integer intermediate that reaches a Linear as a real tensor:
    that real tensor is compressed like any other; nothing to warn about."""
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(4, 16)
    cfg = RazorConfig(policy="backrazor", sparsity=0.7, block_size=8, compiler="eager", value_dtype="float32", targets=("linear",))
    dense = _run(model, model, x)
    with reference.apply(model, cfg):
        ref = _run(model, model, x)
    with caplog.at_level(logging.WARNING, logger="razorpass"), razorpass.record_compiles() as records:
        got = _run(model, razorpass.compile(model, cfg), x)
    assert [r.fallback for r in records] == [None] and _layers(records[0]) == ["fc2"]
    assert not [r for r in caplog.records if r.name == "razorpass" and r.levelno >= logging.WARNING]
    _assert_grads_close(got, ref)
    assert (got["fc2.weight"] - dense["fc2.weight"]).abs().max() > 1e-3, "fc2's input was not sparsified"


# ------------------------------------------------------------------ d. inference
@pytest.fixture
def compress_calls(monkeypatch):
    """Counts calls of the compress kernels (native and PyTorch) behind razor::compress."""
    from razorpass.kernels import ops

    calls = []
    for owner, name in ((ops.topk_compress_cpu, "cpu_compress"), (ops, "torch_compress")):
        orig = getattr(owner, name)

        def counted(*a, _orig=orig, **kw):
            calls.append(1)
            return _orig(*a, **kw)

        monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_inference_compresses_nothing(compiler, compress_calls):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 3, 24)
    cfg = RazorConfig(policy="backrazor", sparsity=0.9, block_size=64, compiler=compiler)
    compiled = razorpass.compile(model, cfg)
    tol = TIGHT if compiler == "eager" else dict(rtol=1e-4, atol=1e-5)
    with razorpass.record_compiles() as records:
        with torch.no_grad():
            y = compiled(x)
            torch.testing.assert_close(y, model(x), **tol)
        model.eval()
        try:
            with torch.no_grad():
                y = compiled(x)
                torch.testing.assert_close(y, model(x), **tol)
        finally:
            model.train()
    # no partition (no backward graph), no compressed root, no kernel call
    assert all(not r.compressed for r in records), records
    assert compress_calls == []
    if compiler == "eager":  # (one more Inductor compile would cost ~10 s)
        # the counter sees training: the same model compresses its fc2 and head inputs
        with razorpass.record_compiles() as records:
            loss_of(compiled(x)).backward()
        assert len(records[0].compressed) == 2 and len(compress_calls) == 2


# ------------------------------------------------------------------ e. dynamic shapes
def test_dynamic_batch_and_sequence_compile_once():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = tiny_bert()
    model.train()
    cfg = RazorConfig(policy="backrazor", sparsity=0.7, block_size=64, compiler="eager", value_dtype="float32", targets=("linear",))
    compiled = razorpass.compile(model, cfg)
    graphs_before = counters["stats"]["unique_graphs"]
    gap = 0.0
    with razorpass.record_compiles() as records:
        for batch, seq in ((2, 8), (3, 12), (4, 10)):
            ids = torch.randint(0, 64, (batch, seq))
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[-1, seq - 2:] = 0
            for t in (ids, mask):
                torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(t, 1)
            got = _run(model, compiled, ids, mask)
            with reference.apply(model, cfg):
                ref = _run(model, model, ids, mask)
            dense = _run(model, model, ids, mask)
            assert got.keys() == ref.keys()
            for k in ref:
                # embedding gradients accumulate repeated ids in another order
                tol = dict(rtol=2e-4, atol=1e-4) if "embeddings" in k else TIGHT
                torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m, k=k: f"{(batch, seq)} {k}: {m}")
            gap = max(gap, max((dense[k] - ref[k]).abs().max().item() for k in ref))
    assert len(records) == 1 and records[0].fallback is None
    # per layer: q/k/v (shared input), attention output, intermediate, output
    assert len(records[0].compressed) == 4 * 2
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    assert gap > 1e-2, "the sparsification rule had no visible effect"


# ------------------------------------------------------------------ f. graph breaks
class Broken(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 40)
        self.fc3 = nn.Linear(40, 6)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        if self.kind == "print":
            print("razorpass test: a graph break between fc2 and fc3")
        elif h.mean() > -1e9:  # data-dependent Python branch
            h = h + 0
        return self.fc3(h)


@pytest.mark.parametrize("kind", ["print", "branch"])
def test_graph_break_between_linears(kind):
    torch.manual_seed(0)
    model = Broken(kind)
    x = torch.randn(4, 3, 24)
    cfg = RazorConfig(policy="backrazor", sparsity=0.7, block_size=64, compiler="eager", value_dtype="float32", targets=("linear",))
    dense = _run(model, model, x)
    with reference.apply(model, cfg):
        ref = _run(model, model, x)
    with razorpass.record_compiles() as records:
        got = _run(model, razorpass.compile(model, cfg), x)
    assert [r.fallback for r in records] == [None, None]
    # graph 1 compresses fc2's input; graph 2 fc3's input (an activation of graph 1
    # for "print", the branch's h + 0 for "branch"); fc1 reads the batch
    assert [_layers(r) for r in records] == [["fc2"], ["fc3"]]
    _assert_grads_close(got, ref)
    assert (got["fc3.weight"] - dense["fc3.weight"]).abs().max() > 1e-3


# ------------------------------------------------------------------ g. no growth
def _live_tensors():
    """(count, bytes) of the live real tensors (not the compiler's fake / meta ones)."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    tensors = [o for o in gc.get_objects()
               if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.device.type != "meta"]
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return len(tensors), sum(storages.values())


def test_training_loop_memory_does_not_grow():
    torch.manual_seed(0)
    model = MLP()
    cfg = RazorConfig(policy="backrazor", sparsity=0.9, block_size=64, compiler="eager")
    compiled = razorpass.compile(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    seen = {}
    with razorpass.record_compiles() as records:
        for step in range(1, 201):
            x = torch.randn(8, 3, 24)
            opt.zero_grad(set_to_none=True)
            loss_of(compiled(x)).backward()
            opt.step()
            if step in (20, 200):
                seen[step] = _live_tensors()
    assert len(records) == 1 and len(records[0].compressed) == 2
    assert seen[20] == seen[200], f"live tensors (count, bytes) grew: step 20 {seen[20]}, step 200 {seen[200]}"


def test_a_kernel_build_lock_left_by_a_killed_process_is_cleared(tmp_path, monkeypatch, caplog):
    """torch waits forever on an extension's build lock; a process killed while building
    the native kernel left one behind, and every later process hung on first use, as did
    a process already waiting when the builder was killed."""
    import os
    import pathlib
    import threading
    import time

    from torch.utils import cpp_extension

    from razorpass.kernels import topk_compress_cpu as native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: built.append(name) or "module")
    build = native._build.__wrapped__  # uncached
    build("razorpass_lock_check", str(native._SOURCE))  # learns the extension's full name
    lock = pathlib.Path(cpp_extension._get_build_directory(built[0], False)) / "lock"
    monkeypatch.setattr(native, "LOCK_POLL_S", 0.02)
    # stale: left by a killed build; turning stale: its builder was killed while this
    # process already waited; fresh: a build under way, whose builder removes the lock
    for case in ("stale", "turning stale", "fresh"):
        lock.write_text("")
        age = {"stale": native.STALE_LOCK_S + 60, "turning stale": native.STALE_LOCK_S - 0.3, "fresh": 0}[case]
        os.utime(lock, (time.time() - age,) * 2)
        builder = threading.Timer(0.3, lambda: lock.unlink(missing_ok=True)) if case == "fresh" else None
        if builder:
            builder.start()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="razorpass"):
            assert build("razorpass_lock_check", str(native._SOURCE)) == "module"
        if builder:
            builder.join()
        assert not lock.exists(), case
        assert ("did not finish" in caplog.text) is (case != "fresh"), case
    assert len(built) == 4
