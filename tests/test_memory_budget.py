"""memory_budget: bits per quantized tensor (or dense), chosen so that a graph saves at
most the budget's fraction of its dense bytes with the least error by the proxy.

The allocator is checked against brute force on random instances (the Lagrangian
choice has the least error of every allocation of no more bytes); the compiled graph's
saved bytes against the bytes autograd holds at run time; its gradients against the
reference rule following the same choices (float64, as in test_policy).
"""

import itertools
import random

import pytest
import torch

import razorpass
from razorpass import RazorConfig, reference
from razorpass.passes import memory_budget
from razorpass.report import measure_saved

from .models import loss_of
from .test_policy import _close, _double, _run


def _brute(options, capacity):
    best = None
    for pick in itertools.product(*[range(len(o)) for o in options]):
        b = sum(o[i][0] for o, i in zip(options, pick))
        e = sum(o[i][1] for o, i in zip(options, pick))
        if b <= capacity and (best is None or e < best):
            best = e
    return best


def _totals(options, idx):
    return sum(o[i][0] for o, i in zip(options, idx)), sum(o[i][1] for o, i in zip(options, idx))


def test_allocation_is_least_error_for_its_bytes_and_fill_only_lowers_it():
    rng = random.Random(0)
    for _ in range(150):
        options = []
        for _ in range(rng.randint(1, 4)):
            sizes = sorted(rng.sample(range(1, 60), rng.randint(1, 5)))
            errs = sorted((rng.random() for _ in sizes), reverse=True)
            errs[-1] = 0.0 if rng.random() < 0.5 else errs[-1]  # the biggest option: dense
            options.append(list(zip(sizes, errs)))
        capacity = rng.randint(0, sum(o[-1][0] for o in options))
        base, price, fits = memory_budget.allocate(options, capacity, fill=False)
        idx, price2, fits2 = memory_budget.allocate(options, capacity)
        assert (price, fits) == (price2, fits2)
        if not fits:
            assert sum(min(b for b, _ in o) for o in options) > capacity
            assert idx == [min(range(len(o)), key=lambda i: o[i]) for o in options]
            continue
        b0, e0 = _totals(options, base)
        b1, e1 = _totals(options, idx)
        assert b0 <= b1 <= capacity and e1 <= e0
        assert _brute(options, b0) == pytest.approx(e0, abs=1e-12)  # optimal for the bytes it takes
        assert _brute(options, capacity) <= e1 + 1e-12


def test_equal_items_choose_alike():
    opts = [(10, 1.0), (20, 0.5), (40, 0.0)]
    idx, _, fits = memory_budget.allocate([opts] * 6, 6 * 20 + 5, fill=False)
    assert fits and len(set(idx)) == 1


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_budget_names_the_field(value):
    with pytest.raises(ValueError, match=r"RazorConfig\.memory_budget must be a fraction in \(0, 1\]"):
        RazorConfig(memory_budget=value)


def test_budget_needs_the_accurate_policy_and_the_reference_needs_the_choices():
    with pytest.raises(ValueError, match="policy='accurate'"):
        RazorConfig(memory_budget=0.1, policy="backrazor")
    model, inputs = _double("mlp")
    with pytest.raises(ValueError, match="choices="):
        with reference.apply(model, memory_budget=0.1):
            pass


def _compile_step(model, inputs, cfg):
    """Gradients of one compiled step, its record, and the compiled model (compiled)."""
    compiled = razorpass.compile(model, cfg, fullgraph=True)
    with razorpass.record_compiles() as records:
        got = _run(model, inputs, compiled)
    (rec,) = records
    assert rec.fallback is None and rec.budget is not None
    return got, rec, compiled


# vit at 0.3: the first plan's partition saves a LayerNorm's statistics it did not plan
# for, and the second round plans for them
@pytest.mark.parametrize("name", ["bert", "cnn", "vit"])
def test_budget_holds_and_gradients_follow_the_reference(name):
    model, inputs = _double(name)
    dense = _run(model, inputs, model)
    errors = []
    for budget in (0.06, 0.3):
        cfg = RazorConfig(compiler="eager", memory_budget=budget)
        got, rec, compiled = _compile_step(model, inputs, cfg)
        b = rec.budget
        # what autograd holds at run time, parameters and inputs excluded (the same graphs)
        held = sum(n for _, n in measure_saved(lambda: compiled(*inputs), [*model.parameters(), *model.buffers(), *inputs]))
        assert held == b.saved_bytes <= b.target_bytes == int(budget * b.dense_bytes) and b.met
        chosen = {c.root: c.bits for c in b.choices}
        quant = {c.root: c.bits for c in rec.compressed if hasattr(c, "bits")}
        assert quant == {r: bits for r, bits in chosen.items() if bits}  # the graph encodes what was chosen
        with reference.apply(model, cfg, choices=b.reference_choices()):
            ref = _run(model, inputs, model)
        _close(got, ref, dense, rtol=1e-9)
        errors.append(b.error)
    assert errors[1] < errors[0]  # more bytes, less error by the proxy


def test_fidelity_and_memory_report_follow_the_budget():
    """gradient_fidelity under a budget compiles one step for the choices and runs the
    reference with them: its cosine is the compiled gradient's; memory_report lists
    each choice and measures the bytes the record plans."""
    from razorpass.fidelity import _cos

    model, inputs = _double("bert")
    dense = _run(model, inputs, model)
    cfg = RazorConfig(compiler="eager", memory_budget=0.06)
    got, rec, _ = _compile_step(model, inputs, cfg)
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    report = razorpass.gradient_fidelity(model, inputs, loss_of, cfg, per_class=False)
    (row,) = report.rows
    assert row.cosine == pytest.approx(_cos(flat(got), flat(dense)), abs=1e-9) and row.cosine < 0.9999
    mem = razorpass.memory_report(model, inputs, cfg)
    (b,) = mem.budgets
    assert mem.saved_bytes == b.saved_bytes == rec.budget.saved_bytes
    table = mem.table(per_sample=False)
    assert "memory_budget 0.06, graph 0" in table and "(met)" in table
    assert sum(f"{c.bits} bits" in table or "dense" in table for c in b.choices) == len(b.choices)
