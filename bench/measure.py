"""How the benchmark measures a training step: time, peak memory, bytes saved for
backward, FLOPs, and test accuracy.

* **Peak memory** of one step (``zero_grad(set_to_none=True)``, forward, loss,
  backward, optimizer step), over the whole step and up to the end of backward.
  CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
  step. CPU: ``torch.profiler.profile(profile_memory=True)`` records every allocation
  and free of the CPU allocator with its address; the peak of the bytes allocated
  inside the step and still alive is the figure: activations, temporaries and the new
  gradients. Tensors from before the step (parameters, optimizer state, data, the
  last step's gradients) do not count, even when the step frees them: on CPU a
  full fine-tune's figure includes one set of gradients that the CUDA figure, which
  sees the old set freed, does not. Deterministic, unlike process RSS, and
  independent of what the process profiled before (:func:`_peak_of_block`).
* **Saved for backward**: one forward under ``saved_tensors_hooks``
  (:func:`razorpass.report.measure_saved`): every distinct storage autograd keeps,
  parameters, buffers and inputs excluded. It sees the tensors a compiled graph
  saves (compressed ones included) and, under checkpointing, only the block inputs.
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` around one forward +
  backward. Dynamo does not compile under a dispatch mode (it runs the original
  module), so the count is that of the method's *eager* module; the caller freezes
  what the compiled step left without gradient. Counted: ops with a registered
  formula — matmul, linear, convolution, attention, forward and backward, recomputed
  checkpointed blocks included — at 2 FLOPs per multiply-add. Not counted: pointwise
  ops, norms, softmax, the optimizer, razorpass' compress / decompress, and
  recomputation chosen by the compiled partitioner.
* **Step time**: wall clock of the whole step (CUDA: synchronised).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .methods import Context, Prepared

__all__ = [
    "batch_indices",
    "linear_warmup_decay",
    "StepRunner",
    "PeakMemory",
    "saved_bytes",
    "count_flops",
    "evaluate",
    "binomial_se",
    "paired_difference",
    "paired_ratio",
    "timed",
]

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices into ``range(n)``: epoch ``e`` visits a permutation
    seeded with ``seed + e``; the last incomplete batch of an epoch is dropped, so every
    step has the same shapes (no recompilation)."""
    if n < batch_size:
        raise ValueError(f"the training split has {n} examples, fewer than one batch of {batch_size}")
    per_epoch = n // batch_size
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        yield order[i * batch_size:(i + 1) * batch_size]


def linear_warmup_decay(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup * steps`` steps, then linear decay to 0."""
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    """One training step of a prepared method: the unit every measurement wraps."""

    def __init__(self, prepared: Prepared, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device):
        self.prepared = prepared
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device

    def forward(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """The training loss (a graph for backward), of the compiled or the eager module."""
        module = self.prepared.eager_module if eager else self.prepared.train_module
        with self.prepared.forward_context():
            logits = module(*inputs)
        return nn.functional.cross_entropy(logits.float(), labels)

    def __call__(self, batch: Batch, after_backward: Callable[[], None] | None = None) -> torch.Tensor:
        """zero_grad(set_to_none=True), forward, backward, ``after_backward()``, optimizer
        and LR step; returns the loss (detached, not synchronised)."""
        inputs, labels = batch
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward(inputs, labels)
        loss.backward()
        if after_backward is not None:
            after_backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds) of ``fn()``, synchronised on CUDA.

    CPU seconds (all threads of this process) are less sensitive than wall time to
    other processes sharing the cores, though not immune (spinning worker threads)."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


class PeakMemory:
    """Peak bytes allocated inside a ``with`` block and alive at once (CUDA: above what
    was allocated at its start): ``.peak`` over the whole block and ``.peak_at_mark``
    up to the last :meth:`mark` (e.g. the end of backward, before the optimizer step)."""

    _MARK = "razorpass_bench::mark"

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.peak_at_mark = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            _sync(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def mark(self) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_at_mark = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            with torch.profiler.record_function(self._MARK):  # a timestamp on the profiler's clock
                pass

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        self.peak, self.peak_at_mark = _peak_of_block(self._prof, self._MARK)


def _peak_of_block(prof, mark: str) -> tuple[int, int]:
    """(peak, peak up to the last ``mark``) of the bytes allocated inside a profiled
    block and still alive, from the profiler's allocation events (address, size, time;
    FunctionEvent would fold them into the op that made them).

    A free counts only when its address was allocated inside the block. The CPU
    allocator reports a free with the size it recorded when it last saw that address
    allocated under a profiler, so a tensor allocated before the block (the last
    step's gradients) is freed either unseen or, when its address was last seen in an
    earlier profiled block, with that block's stale size: summing every reported free
    made the figure depend on what the process had profiled before."""
    from torch._C._profiler import _EventType

    allocations, marks = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation:
            fields = e.typed[1]
            if fields.device.type == "cpu":
                allocations.append((e.start_time_ns, fields.alloc_size, fields.ptr))
        elif e.name == mark:
            marks.append(e.start_time_ns)
        stack.extend(e.children)
    last_mark = max(marks, default=None)
    live: dict[int, int] = {}
    running = peak = peak_at_mark = 0
    # By time; at equal times frees (negative sizes) first: an address is freed
    # before it can be allocated again.
    for t, nbytes, ptr in sorted(allocations):
        if nbytes > 0:
            live[ptr] = nbytes
            running += nbytes
        else:
            running -= live.pop(ptr, 0)
        peak = max(peak, running)
        if last_mark is not None and t <= last_mark:
            peak_at_mark = peak
    return peak, peak_at_mark


def saved_bytes(forward: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward``
    runs (the graph is freed afterwards)."""
    from razorpass.report import measure_saved

    return sum(nbytes for _, nbytes in measure_saved(forward, exclude))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the ops with a FlopCounterMode formula while ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with warnings.catch_warnings():
        # FlopCounterMode's module tracker installs global module hooks, which makes
        # torch.compile warn on every call of a compiled module.
        warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
        with FlopCounterMode(display=False) as counter:
            fn()
    return counter.get_total_flops()


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterator[Batch], context: Context, device: torch.device) -> list[bool]:
    """Whether ``module`` (in eval mode) classifies each example of ``batches`` right,
    in order (the per-example outcomes pair methods on the same test examples)."""
    was_training = module.training
    module.eval()
    hits: list[bool] = []
    try:
        for inputs, labels in batches:
            inputs = tuple(t.to(device) for t in inputs)
            with context():
                logits = module(*inputs)
            hits += (logits.argmax(-1).cpu() == labels).tolist()
    finally:
        module.train(was_training)
    return hits


def binomial_se(correct: int, total: int) -> float:
    """Standard error of an accuracy measured on ``total`` independent examples."""
    p = correct / total
    return math.sqrt(p * (1 - p) / total)


def paired_difference(mine: Sequence[bool], ref: Sequence[bool]) -> tuple[float, float]:
    """(accuracy difference, its standard error) of two methods on the same examples.

    Paired: the SE comes from the per-example differences d_i = mine_i - ref_i, so it
    only counts the examples on which the two methods disagree; two methods that
    agree on most examples can be told apart far below the unpaired SE of either
    accuracy.
    """
    if len(mine) != len(ref) or not mine:
        raise ValueError(f"paired outcomes need equal, non-empty lengths, got {len(mine)} and {len(ref)}")
    n = len(mine)
    d = [int(a) - int(b) for a, b in zip(mine, ref)]
    mean = sum(d) / n
    if n == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_ratio(pairs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(ratio, its standard error) of two timings measured in pairs (a_i, b_i): the
    geometric mean of a_i / b_i, and its SE from the spread of log(a_i / b_i) (delta
    method: ratio x SE of the mean log). Pairs taken close together in time cancel
    a drift of the machine's speed that the two medians would each carry."""
    if len(pairs) < 2:
        raise ValueError(f"a paired ratio needs at least 2 pairs, got {len(pairs)}")
    if not all(a > 0 and b > 0 for a, b in pairs):
        raise ValueError(f"paired timings must be positive, got {list(pairs)}")
    logs = [math.log(a / b) for a, b in pairs]
    ratio = math.exp(statistics.fmean(logs))
    return ratio, ratio * statistics.stdev(logs) / math.sqrt(len(logs))
