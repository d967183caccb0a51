"""Train one workload with one method and measure it: the benchmark's inner loop.

Schedule of a method's run (``steps`` training steps, all on the same batches for
every method):

====================  ======================================================
step 0, 1             warm-up: compilation happens here (``compile_s`` is
                      their time minus two median steps)
step 2                profiled: peak memory of the step
steps 3 ...           timed: ``step_s`` is their median
after training        one forward under saved-tensor hooks (saved bytes);
                      one eager forward + backward under FlopCounterMode
                      (FLOPs; no optimizer step); test accuracy (eager,
                      ``torch.no_grad``, eval mode); the MemoryReport
                      breakdown of razorpass methods
paired rounds         (:func:`run_methods`, every method but the baseline)
                      one untimed step each of the method and of the
                      baseline, then ``rounds`` pairs of their steps timed
                      back to back, which one goes first alternating
====================  ======================================================

Paired timing. Methods run one after another, minutes apart, and a CPU's speed can
drift by tens of percent in that time (other tenants of the host, frequency), so a
ratio of two medians taken minutes apart can say 0.9x one run and 1.6x the next.
:func:`run_methods` keeps the baseline compiled while every other method runs and
ends each method with ``rounds`` pairs of steps: its step and the baseline's, on the
same batch, back to back. ``paired_ratio`` is the geometric mean of the per-pair
ratios, with a standard error from their spread: drift slower than one pair cancels.
The steps after training run past the LR schedule (learning rate 0), so they change
no parameter; they come after every other measurement anyway.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import statistics
import time
import traceback
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from . import measure
from .blocks import num_params
from .methods import METHODS, Method, prepare
from .workloads import Workload

__all__ = ["MethodResult", "run_methods", "WARMUP_STEPS", "PROFILE_STEP", "MIN_STEPS"]

WARMUP_STEPS = 2
PROFILE_STEP = WARMUP_STEPS
MIN_STEPS = PROFILE_STEP + 2  # at least one timed step
# Samples of the (cheap, eager-compiled) MemoryReport of razorpass methods.
BREAKDOWN_BATCH = 4


@dataclasses.dataclass
class MethodResult:
    """Everything measured for one method; ``status`` is "ok" or "n/a (reason)"."""

    method: str
    summary: str
    batch_size: int
    status: str = "ok"
    # Per test example, in a fixed order: classified right (pairs methods, see
    # measure.paired_difference).
    hits: list[bool] | None = None
    saved_bytes: int | None = None  # saved for backward by one training batch
    peak_bytes: int | None = None  # peak above the start of one training step
    peak_fwd_bwd_bytes: int | None = None  # the same peak up to the end of backward
    flops: int | None = None  # forward + backward of one training batch
    step_times: list[float | None] = dataclasses.field(default_factory=list)  # wall s; None: profiled step
    step_cpu_times: list[float | None] = dataclasses.field(default_factory=list)  # process CPU s
    # (this method's step s, the baseline's step s) of each paired round (run_methods)
    paired_times: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    trainable_params: int | None = None
    total_params: int | None = None
    # MemoryReport.by_op_class() per sample: op class -> (dense bytes, saved bytes).
    breakdown: dict[str, tuple[float, float]] | None = None
    razor_options: dict[str, Any] | None = None
    baseline_step_s: float | None = None  # the baseline's median, set by the caller
    baseline_hits: list[bool] | None = None  # the baseline's test outcomes, set by the caller
    wall_s: float = 0.0
    # Highest 1-minute load average seen during the training steps: above the core
    # count, other processes shared the CPU and step times are inflated.
    load_avg: float | None = None
    error: str | None = None  # traceback of a failed method
    notes: list[str] = dataclasses.field(default_factory=list)  # what was skipped, and why

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def correct(self) -> int | None:
        return None if self.hits is None else sum(self.hits)

    @property
    def test_size(self) -> int | None:
        return None if self.hits is None else len(self.hits)

    @property
    def accuracy(self) -> float | None:
        return None if not self.hits else self.correct / self.test_size

    @property
    def accuracy_se(self) -> float | None:
        return None if not self.hits else measure.binomial_se(self.correct, self.test_size)

    @property
    def accuracy_diff(self) -> tuple[float, float] | None:
        """(accuracy - baseline accuracy, paired SE) on the same test examples."""
        if not self.hits or not self.baseline_hits:
            return None
        return measure.paired_difference(self.hits, self.baseline_hits)

    @staticmethod
    def _median_timed(times: list[float | None]) -> float | None:
        timed = [t for t in times[WARMUP_STEPS:] if t is not None]
        return statistics.median(timed) if timed else None

    @property
    def step_s(self) -> float | None:
        return self._median_timed(self.step_times)

    @property
    def step_min_s(self) -> float | None:
        timed = [t for t in self.step_times[WARMUP_STEPS:] if t is not None]
        return min(timed) if timed else None

    @property
    def step_cpu_s(self) -> float | None:
        return self._median_timed(self.step_cpu_times)

    @property
    def compile_s(self) -> float | None:
        """The warm-up steps' time above as many ordinary steps; None for a method that
        compiles nothing (there it would only be the noise of the first steps)."""
        if self.step_s is None or (self.method in METHODS and METHODS[self.method].eager):
            return None
        return sum(self.step_times[:WARMUP_STEPS]) - WARMUP_STEPS * self.step_s

    @property
    def step_ratio(self) -> float | None:
        if self.step_s is None or not self.baseline_step_s:
            return None
        return self.step_s / self.baseline_step_s

    @property
    def paired_ratio(self) -> tuple[float, float] | None:
        """(step time / the baseline's, standard error) from the paired rounds: the
        geometric mean of the per-pair ratios (see the module docstring)."""
        return measure.paired_ratio(self.paired_times) if len(self.paired_times) >= 2 else None

    def per_sample(self, value: int | None) -> float | None:
        return None if value is None else value / self.batch_size


def _batches(workload: Workload, device: torch.device, seed: int) -> Iterator[measure.Batch]:
    split = workload.data.train
    for idx in measure.batch_indices(len(split), workload.scale.batch_size, workload.steps, seed):
        inputs, labels = split.batch(idx)
        yield tuple(t.to(device) for t in inputs), labels.to(device)


def _test_batches(workload: Workload) -> Iterator[measure.Batch]:
    split, size = workload.data.test, workload.eval_batch_size
    for start in range(0, len(split), size):
        yield split.batch(slice(start, start + size))


def _relative_paths(text: str) -> str:
    """A traceback without this machine's folders: paths under the current directory and
    under site-packages are written relative to them."""
    import site

    roots = [os.getcwd(), *site.getsitepackages()]
    for root in sorted(roots, key=len, reverse=True):
        text = text.replace(root.rstrip("/") + "/", "")
    return text


def _check_bsr_applied(method: Method, model: torch.nn.Module) -> None:
    """BSR must leave some parameters without a gradient (razorpass freezes them, or its
    graph detaches them); if every parameter got one, razorpass ignored
    ``trainable_blocks`` and the row would be a mislabelled baseline."""
    if method.bsr and all(p.grad is not None for p in model.parameters()):
        raise NotImplementedError("razorpass trained every parameter: trainable_blocks had no effect")


@contextlib.contextmanager
def _only_trained(model: torch.nn.Module, trained: set[int]) -> Iterator[None]:
    """Temporarily freeze the parameters the compiled step gave no gradient (BSR's
    frozen blocks), so an eager step computes exactly the gradients it computed."""
    changed = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def _breakdown(workload: Workload, result: MethodResult) -> None:
    """Saved bytes per op class (per sample) of a razorpass method that compresses, from
    ``razorpass.memory_report`` with the eager inner compiler (same partitioner, same
    saved tensors, no code generation; token dropping applied as razorpass.compile
    applies it) on a few training examples. Optional: a failure is noted, the row
    stays valid. ``memory_report`` resets Dynamo: run it when no compiled step of
    this process is still to be timed."""
    options = result.razor_options
    if not result.ok or options is None or options.get("targets", True) == ():  # not razorpass, or nothing compressed
        return
    import razorpass

    inputs, _ = workload.example_batch(BREAKDOWN_BATCH)
    try:
        report = razorpass.memory_report(copy.deepcopy(workload.model), inputs, **{**options, "compiler": "eager"})
    except Exception as e:  # noqa: BLE001 - the breakdown is an extra, not the row
        result.notes.append(f"no memory breakdown: {_reason(e)}")
        return
    result.breakdown = {k: (d / report.batch_size, s / report.batch_size) for k, (d, s) in report.by_op_class().items()}


def _reason(e: BaseException, limit: int = 160) -> str:
    """'Type: first line of the message', shortened: the reason of an n/a cell (of the
    backend's own exception when Dynamo wraps it)."""
    e = getattr(e, "inner_exception", None) or e
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_methods(workload: Workload, methods: Sequence[Method], device: torch.device, seed: int,
                rounds: int) -> list[MethodResult]:
    """Every method's result, in the order given. With a baseline among them and
    ``rounds`` >= 2, the baseline runs first and stays compiled, and every other
    method ends with ``rounds`` paired steps against it (module docstring); with
    ``rounds`` 0 or no baseline, each method runs alone (Dynamo reset after each). A
    method that fails is an n/a row (e.g. razorpass options it does not support
    yet); the others go on."""
    if rounds == 1 or rounds < 0:
        raise ValueError(f"paired rounds must be 0 (off) or at least 2, got {rounds}")
    bar = tqdm(total=len(methods), desc=workload.name, unit="method")
    base = next((m for m in methods if m.name == "baseline"), None)
    results: dict[str, MethodResult] = {}
    live = None
    # Every method's cache entries stay on the model's code objects until the
    # baseline goes: each method gets Dynamo's limits of one model.
    dynamo = torch._dynamo.config
    limits = dict(recompile_limit=dynamo.recompile_limit * len(methods),
                  accumulated_recompile_limit=dynamo.accumulated_recompile_limit * len(methods))
    with dynamo.patch(**limits):
        try:
            if base is not None and rounds:
                results[base.name], live = _run_method(workload, base, device, seed, keep=True)
                bar.update()
            for method in methods:
                if method.name not in results:
                    results[method.name], _ = _run_method(workload, method, device, seed, partner=live, rounds=rounds)
                    bar.update()
            live = None
            for result in results.values():  # last: razorpass.memory_report resets Dynamo
                _breakdown(workload, result)
        finally:
            live = None
            torch._dynamo.reset()
            gc.collect()
            bar.close()
    return [results[m.name] for m in methods]


@dataclasses.dataclass
class _Live:
    """A method's compiled training step, kept for paired rounds, and their batch."""

    step: measure.StepRunner
    batch: measure.Batch

    def timed(self) -> float:
        return measure.timed(lambda: self.step(self.batch), self.step.device)[1]


def _paired_rounds(mine: _Live, base: _Live, rounds: int) -> list[tuple[float, float]]:
    """(mine, base) step seconds of ``rounds`` pairs of steps, back to back; which one
    goes first alternates. One untimed step each first: both come back to their step
    after other work (evaluation, the previous method)."""
    mine.timed(), base.timed()
    pairs = []
    for r in range(rounds):
        if r % 2:
            m, b = mine.timed(), base.timed()
        else:
            b, m = base.timed(), mine.timed()
        pairs.append((m, b))
    return pairs


def _run_method(workload: Workload, method: Method, device: torch.device, seed: int = 0, *, keep: bool = False,
                partner: _Live | None = None, rounds: int = 0) -> tuple[MethodResult, _Live | None]:
    """(result, its step if ``keep``). With ``keep`` or a ``partner``, Dynamo is not
    reset (the kept step, or the partner's, must stay compiled); with a partner, the
    method ends with ``rounds`` paired steps against it."""
    result = MethodResult(method.name, method.summary, workload.scale.batch_size)
    started = time.perf_counter()
    live = None
    try:
        live = _run(workload, method, device, seed, result)
        if partner is not None:
            result.paired_times = _paired_rounds(live, partner, rounds)
    except Exception as e:  # noqa: BLE001 - one failing method must not sink the whole run
        result.status = f"n/a ({_reason(e)})"
        result.error = _relative_paths(traceback.format_exc())
        tqdm.write(f"[{workload.name}/{method.name}] {result.status}")
        live = None
    finally:
        if not keep and partner is None:
            torch._dynamo.reset()
        gc.collect()
        result.wall_s = time.perf_counter() - started
    return result, (live if keep else None)


def _run(workload: Workload, method: Method, device: torch.device, seed: int, result: MethodResult) -> _Live:
    torch.manual_seed(seed)
    model = copy.deepcopy(workload.model).to(device).train()
    prepared = prepare(method, model, lr=workload.lr, head_lr=workload.head_lr, bsr_options=workload.bsr,
                       device_type=device.type)
    result.razor_options = prepared.razor_options
    # fused: one kernel per step, no full-size temporaries (foreach AdamW allocates
    # several parameter-sized buffers per step, which would set every method's peak)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=prepared.lr,
                                  weight_decay=workload.weight_decay, fused=True)
    scheduler = measure.linear_warmup_decay(optimizer, workload.steps, workload.warmup)
    step = measure.StepRunner(prepared, optimizer, scheduler, device)

    trained = _train(workload, method, model, step, device, seed, result)
    _measure_batch(workload, model, step, trained, device, result)
    if workload.measures_accuracy:
        batches = tqdm(_test_batches(workload), desc="  test", leave=False,
                       total=-(-len(workload.data.test) // workload.eval_batch_size))
        result.hits = measure.evaluate(prepared.eager_module, batches, prepared.forward_context, device)
    return _Live(step, next(_batches(workload, device, seed)))


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _check_compiled(method: Method, graphs: int) -> None:
    """The first step of every method compiles: if it compiled no graph, Dynamo served
    it graphs compiled for another method of this process (same code, guards and
    backend), or ran it eagerly past its recompile limit, and the row would time
    something else. An eager method compiles nothing, and must not: a graph there
    would mean some other method's compiled module ran."""
    if method.eager:
        if graphs:
            raise RuntimeError(f"{method.name}: an eager method's first step compiled {graphs} graph(s)")
        return
    if graphs == 0:
        raise RuntimeError(f"{method.name}: the first training step compiled no graph (Dynamo reused another "
                           "method's graphs, or hit its recompile limit and ran eagerly)")


def _train(workload: Workload, method: Method, model: torch.nn.Module, step: measure.StepRunner,
           device: torch.device, seed: int, result: MethodResult) -> set[int]:
    """The training loop (warm-up, profiled and timed steps); returns the ids of the
    parameters that the compiled step gave a gradient."""
    trained: set[int] = set()
    bar = tqdm(_batches(workload, device, seed), total=workload.steps, desc=f"{workload.name}/{method.name}",
               unit="step", leave=False)
    for i, batch in enumerate(bar):
        graphs = _graphs_compiled()
        if i == PROFILE_STEP:
            with measure.PeakMemory(device) as peak:
                loss = step(batch, after_backward=peak.mark)
            result.peak_bytes, result.peak_fwd_bwd_bytes = peak.peak, peak.peak_at_mark
            seconds = cpu_seconds = None  # profiled, not timed
        else:
            loss, seconds, cpu_seconds = measure.timed(lambda: step(batch), device)
        if i == 0:
            _check_compiled(method, _graphs_compiled() - graphs)
            trained = {id(p) for p in model.parameters() if p.grad is not None}
            result.trainable_params = sum(p.numel() for p in model.parameters() if id(p) in trained)
            result.total_params = num_params(model)
            _check_bsr_applied(method, model)
        result.step_times.append(seconds)
        result.step_cpu_times.append(cpu_seconds)
        result.losses.append(loss.item())
        result.load_avg = max(result.load_avg or 0.0, os.getloadavg()[0])
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    return trained


def _measure_batch(workload: Workload, model: torch.nn.Module, step: measure.StepRunner, trained: set[int],
                   device: torch.device, result: MethodResult) -> None:
    """Saved-for-backward bytes (compiled forward) and FLOPs (eager forward + backward,
    no optimizer step) of one training batch."""
    inputs, labels = workload.example_batch()
    inputs, labels = tuple(t.to(device) for t in inputs), labels.to(device)
    exclude = [*model.parameters(), *model.buffers(), *inputs]
    result.saved_bytes = measure.saved_bytes(lambda: step.forward(inputs, labels), exclude)
    with _only_trained(model, trained):
        result.flops = measure.count_flops(lambda: step.forward(inputs, labels, eager=True).backward())
    step.optimizer.zero_grad(set_to_none=True)
