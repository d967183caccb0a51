"""Measure what a training step saves for backward, dense vs razorpass.

``memory_report(model, example_inputs, **options)`` compiles the model twice with the
same razor backend, once compressing nothing (the dense baseline: what the same
compilation saves without razorpass's rule) and once with ``options``; then runs one forward of
each under ``torch.autograd.graph.saved_tensors_hooks`` and counts the bytes of every
tensor autograd keeps, deduplicated by storage, parameters, buffers and inputs excluded.
Per-layer rows come from the partition records (which saved tensor is whose mask,
values or dense copy), matched one-to-one with the tensors seen at run time.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Any, Callable

import torch

from .config import RazorConfig
from .passes.records import BudgetRecord, PartitionRecord

__all__ = ["MemoryReport", "LayerRow", "memory_report", "measure_saved"]


@dataclasses.dataclass
class LayerRow:
    layer: str  # module path of the consumer(s) (compressed) or producer (dense)
    op_class: str  # "linear", "conv", ... for compressed rows; the producing op for dense rows
    dense_bytes: int  # bytes this tensor would take saved dense
    saved_bytes: int  # bytes actually saved


@dataclasses.dataclass
class MemoryReport:
    batch_size: int
    baseline_bytes: int  # saved for backward with no compression (measured)
    saved_bytes: int  # saved for backward with the config (measured)
    rows: list[LayerRow]  # per layer, under the config
    baseline_rows: list[LayerRow]
    config: RazorConfig
    fallbacks: list[str]
    budgets: list[BudgetRecord] = dataclasses.field(default_factory=list)  # memory_budget's choices, per graph

    @property
    def ratio(self) -> float:
        return self.baseline_bytes / max(self.saved_bytes, 1)

    def by_op_class(self) -> dict[str, tuple[int, int]]:
        """op class -> (dense bytes, saved bytes), under the config."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.rows:
            out[r.op_class][0] += r.dense_bytes
            out[r.op_class][1] += r.saved_bytes
        return {k: (v[0], v[1]) for k, v in sorted(out.items())}

    def table(self, per_sample: bool = True) -> str:
        div = self.batch_size if per_sample else 1
        unit = "MiB/sample" if per_sample else "MiB"
        lines = [f"{'layer':<48} {'class':<10} {'dense ' + unit:>16} {'saved ' + unit:>16}"]
        for r in self.rows:
            lines.append(f"{r.layer[:48]:<48} {r.op_class:<10} {r.dense_bytes / div / 2**20:>16.3f} {r.saved_bytes / div / 2**20:>16.3f}")
        lines.append(
            f"{'total (measured)':<48} {'':<10} {self.baseline_bytes / div / 2**20:>16.3f} {self.saved_bytes / div / 2**20:>16.3f}"
            f"   ({self.ratio:.2f}x less)"
        )
        for i, b in enumerate(self.budgets):
            lines.append(f"memory_budget {b.budget:g}, graph {i}: target {b.target_bytes / div / 2**20:.3f}, "
                         f"fixed {b.fixed_bytes / div / 2**20:.3f}, saved {b.saved_bytes / div / 2**20:.3f} {unit} "
                         f"({'met' if b.met else 'NOT met'}); each root: least error + price x bytes at price {b.price:.3g}")
            for c in b.choices:
                how = "dense" if c.bits == 0 else f"{c.bits} bits"
                lines.append(f"  {c.layer[:60]:<60} {how:>8} {c.nbytes / div / 2**20:>10.3f}  error {c.error:.2e}")
        return "\n".join(lines)

    def backrazor_analytic(self) -> dict[str, float]:
        """Back Razor's own analytic accounting of the tensors this report measured,
        per op class plus "total", in bytes for the whole batch.

        Back Razor (TinyTL-style profiler) counts a sparse fp32 tensor of ``n``
        elements at density ``d`` as ``n*4*d*(0.5 if fp16 values) + n/8`` bytes. Its ViT
        recipe: fp16 values, fp32 for LayerNorm inputs; the GELU input stays dense in
        fp16 (``n*2``); every Linear keeps its own copy of its input (q, k and v
        projections: three). Tensors razorpass leaves dense (statistics, masks) count
        at their measured size. The density is this report's ``1 - sparsity``.
        Needs a report made with every class labelled (``targets=("all",)``), so that
        the GELU input can be told from other dense tensors.
        """
        labelled = {"linear", "matmul", "softmax", "layernorm", "gelu"}
        if not labelled <= set(self.config.target_classes):
            raise ValueError("backrazor_analytic needs a report made with targets=('all',) "
                             f"(this one has {self.config.target_classes})")
        d = 1.0 - self.config.sparsity
        out: dict[str, float] = defaultdict(float)
        for r in self.rows:
            classes = set(r.op_class.split("+"))
            n = r.dense_bytes / 4
            if r.op_class == "gelu":
                nbytes = n * 2
            elif classes <= _BACKRAZOR_SPARSE:
                fp16 = classes != {"layernorm"}
                copies = _linear_copies(r.layer) if classes == {"linear"} else 1
                nbytes = copies * (n * 4 * d * (0.5 if fp16 else 1.0) + n / 8)
            else:
                nbytes = r.saved_bytes
            out[r.op_class] += nbytes
        out["total"] = sum(out.values())
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = dataclasses.asdict(self.config)
        d["ratio"] = self.ratio
        return d


# The classes Back Razor stores sparse (see MemoryReport.backrazor_analytic).
_BACKRAZOR_SPARSE = frozenset({"linear", "conv", "matmul", "softmax", "layernorm"})


def _linear_copies(layer: str) -> int:
    """How many Linear layers share one compressed input: "a.{key,query,value}" -> 3."""
    if "{" in layer and layer.endswith("}"):
        return layer[layer.index("{") + 1:-1].count(",") + 1
    return 1


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def measure_saved(fn: Callable[[], Any], exclude: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """Run ``fn`` and return (tensor, bytes) for every distinct storage autograd saves,
    in the order they are saved; storages of ``exclude`` (parameters, inputs) are left out.
    Bytes are whole storages, counted once."""
    skip = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    seen: set[tuple[int, int]] = set()
    saved: list[tuple[torch.Tensor, int]] = []

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip and key not in seen:
            seen.add(key)
            saved.append((t, key[1]))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return saved


def _rows(records: list[PartitionRecord], saved: list[tuple[torch.Tensor, int]]) -> list[LayerRow]:
    """Attribute the measured tensors to layers with the partition records.

    Each record lists its graph's saved tensors in order, with their role (mask,
    values or dense) and layer; they are matched to the measured tensors in order by
    shape and dtype. A measured tensor with no match is reported as "(unattributed)".
    """
    # Graph inputs are excluded from the measurement unless the compiled graph saved a
    # copy of one (e.g. a layout conversion for a convolution): then it is matched here.
    planned = [p for rec in records for p in rec.saved]
    used = [False] * len(planned)
    rows: dict[tuple[str, str], list[int]] = {}
    cursor = 0
    for t, nbytes in saved:
        order = list(range(cursor, len(planned))) + list(range(cursor))
        hit = next(
            (i for i in order if not used[i] and planned[i].shape == tuple(t.shape) and planned[i].dtype == t.dtype),
            None,
        )
        if hit is None:
            key, dense = ("(unattributed)", "dense"), nbytes
        else:
            used[hit], cursor = True, hit + 1
            p = planned[hit]
            layer = f"(copy of graph input {p.name})" if p.input else p.layer
            key, dense = (layer, p.op_class), p.dense_bytes
        row = rows.setdefault(key, [0, 0])
        row[0] += dense
        row[1] += nbytes
    return [LayerRow(k[0], k[1], v[0], v[1]) for k, v in rows.items()]


def _run_once(model: torch.nn.Module, cfg: RazorConfig, example_inputs, dynamic) -> tuple[list, list[PartitionRecord]]:
    from . import record_compiles
    from .backend import RazorBackend

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=RazorBackend(cfg), dynamic=dynamic)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    exclude = [*model.parameters(), *model.buffers(), *inputs]
    with record_compiles() as records:
        out = compiled(*inputs)  # compile outside the hooks
    del out
    saved = measure_saved(lambda: compiled(*inputs), exclude)
    return saved, records


def memory_report(model: torch.nn.Module, example_inputs, config: RazorConfig | dict | None = None,
                  dynamic: bool | None = False, **options: Any) -> MemoryReport:
    """Bytes saved for backward by one forward of ``model``, dense vs ``options``.

    ``example_inputs`` is a tensor or a tuple of positional inputs; the batch size used
    for per-sample figures is dim 0 of the first tensor input.

    With BSR's ``drop_layers``, token selection is installed on a copy of ``model``
    (what :func:`razorpass.compile` installs on the model itself), so both runs, dense
    and compressed, see the tokens that survive; ``model`` is left as it was.

    It compiles ``model`` twice and calls ``torch._dynamo.reset()`` before and after,
    so that both compiles run the partitioner whatever was compiled before: every
    other compiled model of the process recompiles on its next call. Call it before
    or after training, not between the steps of a compiled model you are timing.
    """
    cfg = RazorConfig.from_options(config, **options)
    if cfg.drop_layers:
        from .backend import prepare_model

        model = prepare_model(copy.deepcopy(model), cfg)
    base_cfg = dataclasses.replace(cfg, targets=())
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    batch = next(t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0)
    base_saved, base_records = _run_once(model, base_cfg, inputs, dynamic)
    saved, records = _run_once(model, cfg, inputs, dynamic)
    torch._dynamo.reset()
    fallbacks = [r.fallback for r in records if r.fallback]
    return MemoryReport(
        batch_size=batch,
        baseline_bytes=sum(b for _, b in base_saved),
        saved_bytes=sum(b for _, b in saved),
        rows=_rows(records, saved),
        baseline_rows=_rows(base_records, base_saved),
        config=cfg,
        fallbacks=fallbacks,
        budgets=[r.budget for r in records if r.budget is not None],
    )
