"""memory-budget: choose, per quantized root, how many bits it keeps (or whether it stays
dense) so that the graph saves at most ``memory_budget`` of what it would save dense,
with the least gradient error by a static proxy.

Runs between two partitions of the same joint graph. The first partition uses the
policy's uniform ``quant_bits``; its saved tensors give the graph's dense size D (each
encoded root counted at its dense size, graph inputs left out) and the *fixed* bytes
F: everything saved that is not a quantized root's codes (top-k codes, packed masks,
GELU derivative codes, statistics, tensors no class covers). The quantized roots share
``budget * D - F``. The choices go back to ``compress_saved`` (``ctx.budget_bits``) and
the joint graph is partitioned again; if that partition saves more than planned (its
own choices moved, e.g. a dense norm's statistics), :class:`Planner` plans once more
with the excess counted as fixed. Dense, a normalization's root also costs the layer
inputs computed from it that its code served (``QuantizedRoot.derived_bytes``).

The choice. A root r with u uses (weight gradients and norm backwards that read it)
may be stored dense (error 0) or at b in ``GROUP_BITS`` where that is smaller than dense,
with error u / (2^b - 1)^2: the noise of a b-bit uniform quantizer on the group's own
range, relative to that range, counted once per gradient it enters. The proxy is
static: the choice is made at compile time, when only shapes are known; a data proxy
(the dropped energy of each group) would need the values, that is a recompile or a
saved layout decided at run time. Per-use error independent of the tensor's size is
the point: a small tensor costs few bytes to keep exact, so it is kept exact first
(a classifier's head input, pooled features), and the bytes go where they buy most.

The allocation is a multiple-choice knapsack; :func:`allocate` solves its Lagrangian
relaxation: each root takes the option minimising ``error + price * bytes`` (ties to
fewer bytes, so equal roots choose alike), at the smallest price whose choices fit.
Such an allocation has the least total error of all allocations that take no more
bytes than it does; what it leaves of the budget is then spent greedily (the move that
removes most error per byte first), which only lowers the error. Roots read by the same
modules and of one size (an attention's q and k) are one item and take the same bits.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch < 2.13 has no optimization_hint; its size_hint gives the same hint for the
    # backed sizes the planner reads (the GPU image runs torch 2.11)
    from torch.fx.experimental.symbolic_shapes import size_hint as optimization_hint

from ..kernels.quantize import GROUP_BITS
from .codecs import CODECS
from .context import PassContext
from .records import BudgetChoice, BudgetRecord, QuantizedRoot, SavedTensor
from .vocab import Encoding

__all__ = ["Planner", "allocate", "plan", "quantization_error", "saved_bytes"]

log = logging.getLogger("razorpass")


def quantization_error(bits: int) -> float:
    """Relative noise of a ``bits``-bit uniform quantizer (step² of a unit range); 0 for
    ``bits == 0`` (dense)."""
    return 0.0 if bits == 0 else 1.0 / ((1 << bits) - 1) ** 2


def _pick(options: Sequence[tuple[int, Fraction]], price: Fraction) -> int:
    """Index of the option minimising error + price * bytes; ties to fewer bytes."""
    return min(range(len(options)), key=lambda i: (options[i][1] + price * options[i][0], options[i][0]))


def allocate(options: Sequence[Sequence[tuple[int, float]]], capacity: int,
             fill: bool = True) -> tuple[list[int], float, bool]:
    """One option index per item (each option a (bytes, error) pair), total bytes at most
    ``capacity`` where possible: ``(indices, price, fits)``. When nothing fits, every item
    takes its fewest bytes and ``fits`` is False. ``fill``: spend what the price left."""
    # exact arithmetic: at a breakpoint price two options must tie exactly
    exact = [[(b, Fraction(e)) for b, e in opts] for opts in options]
    prices = {Fraction(0)}
    for opts in exact:
        for bi, ei in opts:
            for bj, ej in opts:
                if bj > bi and ej < ei:
                    prices.add((ei - ej) / (bj - bi))
    ladder = sorted(prices)

    def total(price: Fraction) -> tuple[int, list[int]]:
        idx = [_pick(opts, price) for opts in exact]
        return sum(opts[i][0] for opts, i in zip(options, idx)), idx

    # total bytes never grow with the price: the smallest price that fits, by bisection
    lo = bisect.bisect_left(range(len(ladder)), True, key=lambda k: total(ladder[k])[0] <= capacity)
    if lo == len(ladder):
        return [min(range(len(o)), key=lambda i: (o[i][0], o[i][1])) for o in options], math.inf, False
    used, idx = total(ladder[lo])
    return (_fill(options, idx, capacity - used) if fill else idx), float(ladder[lo]), True


def _fill(options: Sequence[Sequence[tuple[int, float]]], idx: list[int], spare: int) -> list[int]:
    """Spend what the price left unused: repeatedly move the item whose move to an option
    of more bytes and less error removes most error per byte, while it fits. Only lowers
    the total error."""
    idx = list(idx)
    while True:
        best = None
        for k, (opts, i) in enumerate(zip(options, idx)):
            b0, e0 = opts[i]
            for j, (b, e) in enumerate(opts):
                if e < e0 and 0 < b - b0 <= spare:
                    key = ((e0 - e) / (b - b0), -k)
                    if best is None or key > best[0]:
                        best = (key, k, j, b - b0)
        if best is None:
            return idx
        _, k, j, extra = best
        idx[k], spare = j, spare - extra


def _nbytes(entry: SavedTensor) -> int:
    return optimization_hint(entry.nbytes)


def saved_bytes(saved: Sequence[SavedTensor]) -> int:
    """Bytes of the saved tensors that are not graph inputs."""
    return sum(_nbytes(e) for e in saved if not e.input)


# Plans per graph: the first from a partition at uniform bits, the next correcting for
# bytes a partition with the first plan's choices saved beyond it.
MAX_ROUNDS = 2


@dataclass
class Planner:
    """The budget's rounds for one graph, between its partitions."""

    ctx: PassContext
    record: BudgetRecord | None = None
    first: tuple[list[SavedTensor], list] | None = None  # the first partition's saved tensors and encoded roots
    rounds: int = 0

    def replan(self, saved: Sequence[SavedTensor]) -> bool:
        """After a partition that saved ``saved``: True when the joint graph is to be
        partitioned again with new choices (left in ``ctx.budget_bits``)."""
        if self.rounds == MAX_ROUNDS:
            return False
        cfg, ctx = self.ctx.config, self.ctx
        if self.record is None:
            self.first = (list(saved), ctx.encoded_by("compress_saved"))
            before = {r.root: cfg.quant_bits for r in self.first[1] if isinstance(r, QuantizedRoot)}
            self.record = plan(*self.first, ctx)
        else:
            held = saved_bytes(saved)
            over = held - self.record.planned_bytes
            if held <= self.record.target_bytes or over <= 0:
                return False
            before = dict(ctx.budget_bits)
            self.record = plan(*self.first, ctx, self.record.unplanned + over)
        self.rounds += 1
        return ctx.budget_bits != before


def plan(saved: Sequence[SavedTensor], encoded: Sequence, ctx: PassContext, unplanned: int = 0) -> BudgetRecord:
    """The choices for the graph whose first partition saved ``saved``, encoding
    ``encoded`` (its records). ``unplanned``: bytes a partition with earlier choices
    saved beyond their plan, counted as fixed."""
    cfg = ctx.config
    roots = [r for r in encoded if isinstance(r, QuantizedRoot)]
    owned = {name for r in roots for name in r.outputs}
    dense = sum(optimization_hint(e.dense_bytes) for e in saved if not e.input)
    fixed = sum(_nbytes(e) for e in saved if not e.input and e.name not in owned) + unplanned
    target = int(cfg.memory_budget * dense)
    table = []
    for r in roots:
        numel, nbytes = math.prod(optimization_hint(s) for s in r.shape), optimization_hint(r.dense_bytes)
        # dense, a norm's x̂ no longer serves the layer after it: its input is saved too
        opts = [(0, nbytes + optimization_hint(r.derived_bytes), 0.0)]
        for b in GROUP_BITS:
            size = CODECS[Encoding.GROUP].nbytes(numel, r.group_size, b)
            if size < nbytes:
                opts.append((b, size, r.consumers * quantization_error(b)))
        table.append((r, numel, nbytes, tuple(opts)))
    # Roots read by the same modules and of one size (q and k of one attention) are one
    # item: they take the same bits, so the reference can follow the choice by module.
    items: dict[tuple, list[int]] = {}
    for k, (r, numel, _, opts) in enumerate(table):
        items.setdefault((tuple(sorted(set(r.modules))), numel, tuple(o[0] for o in opts)), []).append(k)
    members = list(items.values())
    item_opts = [[(sum(table[k][3][j][1] for k in ks), sum(table[k][3][j][2] for k in ks))
                  for j in range(len(table[ks[0]][3]))] for ks in members]
    idx, price, fits = allocate(item_opts, max(target - fixed, 0))
    pick = {k: i for ks, i in zip(members, idx) for k in ks}
    choices = tuple(
        BudgetChoice(root=r.root, layer=r.layer, modules=r.modules, numel=numel, dense_bytes=nbytes,
                     bits=opts[pick[k]][0], nbytes=opts[pick[k]][1], error=opts[pick[k]][2], options=opts)
        for k, (r, numel, nbytes, opts) in enumerate(table))
    planned = fixed + sum(c.nbytes for c in choices)
    if not fits:
        log.warning("razorpass: memory_budget %.3g not reachable for this graph: %d of its %d dense bytes are saved "
                    "at the fewest bits (target %d)", cfg.memory_budget, planned, dense, target)
    ctx.budget_bits = {c.root: c.bits for c in choices}
    return BudgetRecord(budget=cfg.memory_budget, dense_bytes=dense, fixed_bytes=fixed, target_bytes=target,
                        planned_bytes=planned, price=price, choices=choices, unplanned=unplanned)
