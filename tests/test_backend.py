"""The backend: registration, entry points, fallback, cache keys, lean import."""

import ast
import dataclasses
import logging
import os
import pathlib
import pickle
import subprocess
import sys
import uuid

import pytest
import torch

import razorpass
from razorpass import RazorConfig, reference
from razorpass.partitioner import RazorPartitioner

from .models import MLP, loss_of

def _in_a_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new Python process (nothing imported yet), output captured."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


_SCRIPT = """
import torch
{pre}
m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
c = torch.compile(m, backend="razor", options={{"sparsity": 0.5, "compiler": "eager"}})
c(torch.randn(3, 8)).sum().backward()
{post}
print("OK", m[0].weight.grad.abs().sum().item() > 0)
"""


# the name alone (the entry point), then razorpass imported after compiling; and
# razorpass imported first: no "duplicate name" either way
@pytest.mark.parametrize("pre,post", [("", "import razorpass\nimport razorpass.backend"),
                                      ("import razorpass", "import razorpass.backend")])
def test_backend_name_works_with_and_without_import(pre, post):
    out = _in_a_fresh_process(_SCRIPT.format(pre=pre, post=post))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK True" in out.stdout


def test_lean_import():
    code = (
        "import sys, torch; import razorpass;"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor imported';"
        "assert not hasattr(torch.ops.razor, 'compress'), 'ops registered at import';"
        "import torch._inductor.config as c; assert c.custom_partitioner_fn is None; print('LEAN')"
    )
    out = _in_a_fresh_process(code)
    assert "LEAN" in out.stdout, out.stderr[-2000:]


def test_the_eager_compiler_runs_a_max_pool_in_a_fresh_process():
    """compiler="eager" takes Inductor's decompositions, and the max-pool one calls into
    torch._inductor.lowering, which nothing had imported in a fresh process: every CNN
    with a max pool (ResNet) failed to compile there."""
    code = (
        "import torch, razorpass;"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.MaxPool2d(2), torch.nn.Flatten(), "
        "torch.nn.Linear(8 * 7 * 7, 2));"
        "x = torch.randn(2, 3, 16, 16); ref = torch.autograd.grad(m(x).sum(), m[0].weight)[0];"
        "got = torch.autograd.grad(razorpass.compile(m, compiler='eager', strict=True, targets=('linear',))(x).sum(),"
        " m[0].weight)[0];"
        "torch.testing.assert_close(got, ref); print('POOLED')"
    )
    out = _in_a_fresh_process(code)
    assert "POOLED" in out.stdout, out.stderr[-2000:]


def test_a_pass_failure_falls_back_to_the_dense_gradient(monkeypatch, caplog):
    import razorpass.passes.compress_saved as cs
    from razorpass.passes.common import BailOut

    monkeypatch.delenv("RAZORPASS_STRICT", raising=False)  # this test is about the fallback

    def boom(*a, **k):
        raise BailOut("synthetic failure")

    monkeypatch.setattr(cs, "apply", boom)
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 3, 24)
    loss_of(model(x)).backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with caplog.at_level(logging.WARNING, logger="razorpass"), razorpass.record_compiles() as records:
        loss_of(razorpass.compile(model, sparsity=0.9, compiler="eager")(x)).backward()
    assert "synthetic failure" in records[0].fallback
    assert any("without compression" in r.message for r in caplog.records)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, dense[n], rtol=1e-6, atol=1e-7)


def test_memory_budget_partition_stays_correct():
    # activation_memory_budget < 1 lets the partitioner recompute freely; whatever it
    # decides, gradients must equal the reference and no dense root may be saved.
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 3, 24)
    cfg = RazorConfig(sparsity=0.7, block_size=64)
    with reference.apply(model, cfg):
        loss_of(model(x)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch._functorch.config.patch(activation_memory_budget=0.3), razorpass.record_compiles() as records:
        loss_of(razorpass.compile(model, cfg)(x)).backward()
    assert records[0].fallback is None
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=2e-3, atol=2e-4)


def test_partitioner_uuid_tracks_config_and_pickles():
    a = RazorPartitioner(RazorConfig(sparsity=0.9))
    b = RazorPartitioner(RazorConfig(sparsity=0.9))
    c = RazorPartitioner(RazorConfig(sparsity=0.5))
    assert a.uuid() == b.uuid() != c.uuid()
    assert pickle.loads(pickle.dumps(a)).uuid() == a.uuid()


def test_changing_sparsity_never_reuses_a_cached_graph():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 3, 24)
    with torch._inductor.config.patch(force_disable_caches=False, fx_graph_cache=True), \
            torch._functorch.config.patch(enable_autograd_cache=True):
        for sparsity in (0.5, 0.9):
            torch._dynamo.reset()
            cfg = RazorConfig(sparsity=sparsity, block_size=64)
            model.zero_grad(set_to_none=True)
            loss_of(razorpass.compile(model, cfg)(x)).backward()
            got = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            with reference.apply(model, cfg):
                loss_of(model(x)).backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(got[n], p.grad, rtol=2e-3, atol=2e-4)


_CACHED_TWICE = """
import sys, torch, razorpass
from razorpass.passes.pipeline import recording
from tests.models import loss_of

class Net(torch.nn.Module):
    # a layer named for this run alone: a graph no earlier run can have cached (the name
    # is in Dynamo's graph, which AOTAutograd's cache key hashes), with the kernels of
    # any other run (Inductor's cache of built kernels still serves them)
    def __init__(self, salt):
        super().__init__()
        self.layers = torch.nn.ModuleDict({"fc_" + salt: torch.nn.Linear(24, 40), "head": torch.nn.Linear(40, 6)})

    def forward(self, x):
        fc, head = self.layers.values()
        return head(torch.relu(fc(x)))

torch.manual_seed(0)
model, x = Net(sys.argv[1]), torch.randn(4, 3, 24)
for record in (recording, recording, razorpass.record_compiles):  # cold, cache hit, cache hit
    torch._dynamo.reset()
    with record() as records:
        loss_of(razorpass.compile(model, compiler="inductor")(x)).backward()
    print([len(r.compressed) for r in records])
"""


def test_record_compiles_records_a_graph_that_the_compile_caches_hold():
    # A second compile of the same graph with the caches on (what a second run of a
    # script gets) is an AOTAutograd cache hit, which skips the partitioner and with it
    # the record; inside record_compiles that cache is off, so the record is there.
    # A fresh process: the tests' environment turns the graph caches off for good.
    off = ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE",
           "TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO")
    env = {k: v for k, v in os.environ.items() if k not in off}
    out = subprocess.run([sys.executable, "-c", _CACHED_TWICE, uuid.uuid4().hex], env=env, capture_output=True,
                         text=True, cwd=pathlib.Path(__file__).parents[1], check=True).stdout.split("\n")
    cold, hit, recorded = (ast.literal_eval(line) for line in out[:3])
    assert cold == recorded and len(cold) == 1 and cold[0] > 0
    assert hit == []  # without record_compiles: no record, and no word about why


def test_bad_option_is_a_clear_error_before_compiling():
    model = MLP()
    with pytest.raises(ValueError, match="RazorConfig.sparsity"):
        razorpass.compile(model, sparsity=1.5)
    compiled = torch.compile(model, backend="razor", options={"sparsity": 2})
    with pytest.raises(Exception, match="RazorConfig.sparsity"):
        compiled(torch.randn(2, 24))


def test_a_root_saved_dense_is_left_uncompressed_and_the_rest_kept(monkeypatch):
    # If the partitioner still saves a compressed root dense, only that root loses its
    # compression: the graph is re-partitioned without it, not compiled unmodified.
    import razorpass.passes.check_saved as cs

    real, calls = cs.run, []

    def flaky(fw, ctx):
        calls.append(1)
        if len(calls) == 1:
            head_input = next(c.root for c in ctx.encoded if c.layer == "head")
            raise cs.DenseSaved([head_input])
        return real(fw, ctx)

    monkeypatch.setattr(cs, "PASS", dataclasses.replace(cs.PASS, run=flaky))
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 3, 24)
    cfg = RazorConfig(sparsity=0.7, block_size=64, compiler="eager")
    with razorpass.record_compiles() as records:
        loss_of(razorpass.compile(model, cfg)(x)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    rec = records[0]
    assert rec.fallback is None and len(calls) == 2
    assert [c.layer for c in rec.compressed] == ["fc2"]
    model.zero_grad(set_to_none=True)
    with reference.apply(model, cfg, exclude=("head",)):
        loss_of(model(x)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5)
