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
====================  ======================================================
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
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from . import measure
from .blocks import num_params
from .methods import Method, Prepared, prepare
from .workloads import Workload

__all__ = ["MethodResult", "run_method", "WARMUP_STEPS", "PROFILE_STEP", "MIN_STEPS"]

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
        if self.step_s is None:
            return None
        return sum(self.step_times[:WARMUP_STEPS]) - WARMUP_STEPS * self.step_s

    @property
    def step_ratio(self) -> float | None:
        if self.step_s is None or not self.baseline_step_s:
            return None
        return self.step_s / self.baseline_step_s

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


def _breakdown(workload: Workload, prepared: Prepared, result: MethodResult) -> None:
    """Saved bytes per op class (per sample) of a razorpass method that compresses, from
    ``razorpass.memory_report`` with the eager inner compiler (same partitioner, same
    saved tensors, no code generation; token dropping applied as razorpass.compile
    applies it) on a few training examples. Optional: a failure is noted, the row
    stays valid."""
    options = prepared.razor_options
    if options is None or options.get("targets", True) == ():  # not razorpass, or nothing compressed
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


def run_method(workload: Workload, method: Method, device: torch.device, seed: int = 0) -> MethodResult:
    """Train a copy of ``workload.model`` with ``method`` and measure it. Failures of
    the method (e.g. razorpass options it does not support yet) become an n/a row."""
    result = MethodResult(method.name, method.summary, workload.scale.batch_size)
    started = time.perf_counter()
    try:
        _run(workload, method, device, seed, result)
    except Exception as e:  # noqa: BLE001 - one failing method must not sink the whole run
        result.status = f"n/a ({_reason(e)})"
        result.error = _relative_paths(traceback.format_exc())
        tqdm.write(f"[{workload.name}/{method.name}] {result.status}")
    finally:
        torch._dynamo.reset()
        gc.collect()
        result.wall_s = time.perf_counter() - started
    return result


def _run(workload: Workload, method: Method, device: torch.device, seed: int, result: MethodResult) -> None:
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
    _breakdown(workload, prepared, result)


def _train(workload: Workload, method: Method, model: torch.nn.Module, step: measure.StepRunner,
           device: torch.device, seed: int, result: MethodResult) -> set[int]:
    """The training loop (warm-up, profiled and timed steps); returns the ids of the
    parameters that the compiled step gave a gradient."""
    trained: set[int] = set()
    bar = tqdm(_batches(workload, device, seed), total=workload.steps, desc=f"{workload.name}/{method.name}",
               unit="step", leave=False)
    for i, batch in enumerate(bar):
        if i == PROFILE_STEP:
            with measure.PeakMemory(device) as peak:
                loss = step(batch, after_backward=peak.mark)
            result.peak_bytes, result.peak_fwd_bwd_bytes = peak.peak, peak.peak_at_mark
            seconds = cpu_seconds = None  # profiled, not timed
        else:
            loss, seconds, cpu_seconds = measure.timed(lambda: step(batch), device)
        if i == 0:
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
    with step.prepared.step_context():
        result.saved_bytes = measure.saved_bytes(lambda: step.forward(inputs, labels), exclude)
    with _only_trained(model, trained), step.prepared.step_context():
        result.flops = measure.count_flops(lambda: step.forward(inputs, labels, eager=True).backward())
    step.optimizer.zero_grad(set_to_none=True)
