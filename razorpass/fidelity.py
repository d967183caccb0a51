"""How far razorpass's gradients are from the exact ones, per target class, in seconds.

A fine-tune tells whether accuracy holds, but takes minutes to hours. The direction
of one batch's gradient is a cheap proxy that names the culprit:

    report = razorpass.gradient_fidelity(model, (x,), lambda out: F.cross_entropy(out, y), sparsity=0.9)
    print(report.table())

Every row runs one forward and backward of ``model`` eagerly under the reference rule
(:mod:`razorpass.reference`, which the tests hold equal to the compiled path) with
some of the config's targets, and compares the gradient of every trainable parameter
with the dense one: the cosine of the whole flattened gradient, its norm ratio, and
the parameter whose direction moved most. Classes that feed *input* gradients
(matmul operands, softmax, GELU, LayerNorm, BatchNorm) pass their error down to every
earlier layer, so their worst parameter sits at the bottom of the network. Dropout
draws the same masks in every row (the RNG is reseeded); "mask" is lossless and gets
no row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from .config import RazorConfig

__all__ = ["FidelityRow", "FidelityReport", "gradient_fidelity", "budget_choices"]

_LOSSLESS = frozenset({"mask"})


@dataclasses.dataclass(frozen=True)
class FidelityRow:
    targets: tuple[str, ...]  # the classes sparsified in this row
    cosine: float  # cosine of the flattened gradient of all trainable parameters vs dense
    norm_ratio: float  # its norm / the dense norm
    # the parameter whose gradient direction changed most ("" if none), among those whose
    # dense gradient is not negligible (norm >= 1e-4 of the largest: a key bias's gradient
    # is zero up to rounding, its direction is noise)
    worst_param: str
    worst_cosine: float  # that parameter's cosine
    changed: int  # parameters whose gradient differs from the dense one at all


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    rows: list[FidelityRow]
    config: RazorConfig
    params: int  # trainable parameters compared (tensors)
    draws: int = 1  # rounding seeds each row's gradient is the mean of (stochastic rounding)

    def table(self) -> str:
        w = max([len("targets")] + [len("+".join(r.targets)) for r in self.rows])
        c = self.config
        how = (f"{c.quant_bits}-bit groups of {c.quant_group_size}" if c.memory_budget is None
               else f"memory_budget {c.memory_budget}") if c.policy == "accurate" else ""
        if c.policy == "accurate":
            how += (f", {c.quant_codebook} codebook, rounding {c.quant_rounding}"
                    + (f" (mean of {self.draws} draws)" if self.draws > 1 else ""))
        lines = [f"gradient vs dense, {c.policy} policy {how}, sparsity {c.sparsity} ({c.granularity}); "
                 f"{self.params} parameter tensors",
                 f"{'targets':<{w}} {'cosine':>7} {'norm':>6} {'changed':>8}  worst parameter (cosine)"]
        for r in self.rows:
            worst = f"{r.worst_param} ({r.worst_cosine:.3f})" if r.worst_param else "-"
            lines.append(f"{'+'.join(r.targets):<{w}} {r.cosine:7.3f} {r.norm_ratio:6.3f} {r.changed:8d}  {worst}")
        return "\n".join(lines)


def _first_tensor(out: Any) -> torch.Tensor:
    for attr in ("loss", "logits", "last_hidden_state"):
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ValueError("gradient_fidelity: the model returned no tensor; pass loss_fn")
    return leaves[0]


def _default_loss(out: Any) -> torch.Tensor:
    t = _first_tensor(out)
    return t if t.dim() == 0 else t.float().pow(2).mean()


def gradient_fidelity(model: torch.nn.Module, example_inputs: Any,
                      loss_fn: Callable[[Any], torch.Tensor] | None = None,
                      config: RazorConfig | dict | None = None, *, per_class: bool = True, seed: int = 0,
                      draws: int = 1, **options: Any) -> FidelityReport:
    """Compare the gradient of one batch under ``options`` with the exact gradient.

    ``example_inputs``: a tensor or a tuple of positional inputs. ``loss_fn(output)``
    returns the scalar loss (default: the output if it is a scalar, else the mean
    square of its first tensor). Rows: each lossy class of the config's targets alone
    (``per_class``), then all of them together. The model's mode (train / eval) is
    used as it is; gradients already on the parameters are restored afterwards.

    Under ``quant_rounding="stochastic"`` a row's gradient is the mean over ``draws``
    rounding seeds (0, 1, ...; dropout draws the dense step's masks in each): one draw
    is what one step sees, the mean over many shows the bias that remains.
    """
    from . import reference

    cfg = RazorConfig.from_options(config, **options)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    loss_fn = loss_fn or _default_loss
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("gradient_fidelity: the model has no parameter that requires grad")
    kept = [p.grad for _, p in params]
    choices = None
    if cfg.memory_budget is not None:
        try:
            choices = budget_choices(model, inputs, loss_fn, cfg, seed=seed)
        finally:
            for (_, p), g in zip(params, kept):
                p.grad = g

    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"gradient_fidelity: draws must be a positive int, got {draws!r}")
    draws = draws if cfg.quant_rounding == "stochastic" else 1

    def grads(row_cfg: RazorConfig | None) -> list[torch.Tensor]:
        if row_cfg is None:
            return one_step(None, None)
        steps = [one_step(row_cfg, i) for i in range(draws)]  # one draw unless stochastic (above)
        return [sum(g) / draws for g in zip(*steps)]

    def one_step(row_cfg: RazorConfig | None, rounding_seed: int | None) -> list[torch.Tensor]:
        for _, p in params:
            p.grad = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if row_cfg is None:
                loss = loss_fn(model(*inputs))
            else:
                with reference.apply(model, row_cfg, choices=choices, rounding_seed=rounding_seed):
                    loss = loss_fn(model(*inputs))
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"gradient_fidelity: loss_fn must return a scalar tensor, got "
                                 f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
            loss.backward()
        return [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                for _, p in params]

    try:
        dense = grads(None)
        lossy = [t for t in cfg.target_classes if t not in _LOSSLESS]
        row_targets = [(t,) for t in lossy] if per_class else []
        if len(lossy) > 1 or not per_class:
            row_targets.append(tuple(lossy))
        rows = [_compare(t, dense, grads(dataclasses.replace(cfg, targets=t)), [n for n, _ in params])
                for t in row_targets]
    finally:
        for (_, p), g in zip(params, kept):
            p.grad = g
    return FidelityReport(rows=rows, config=cfg, params=len(params), draws=draws)


def budget_choices(model: torch.nn.Module, inputs: tuple, loss_fn: Callable[[Any], torch.Tensor],
                   config: RazorConfig, seed: int = 0) -> dict[tuple[str, int], int]:
    """What ``config.memory_budget`` chooses for ``model`` on ``inputs``, as
    :func:`razorpass.reference.apply` takes it: compiles one step (the "eager" inner
    compiler: the choices come from the partition, not from code generation) and reads
    every graph's :class:`~razorpass.passes.records.BudgetRecord`. Leaves ``.grad`` set.
    Resets Dynamo before and after, as :func:`razorpass.memory_report` does."""
    from . import compile as razor_compile
    from . import record_compiles

    torch._dynamo.reset()
    compiled = razor_compile(model, dataclasses.replace(config, compiler="eager"))
    with record_compiles() as records, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss_fn(compiled(*inputs)).backward()
    torch._dynamo.reset()
    choices: dict[tuple[str, int], int] = {}
    for rec in records:
        if rec.budget is not None:
            for key, bits in rec.budget.reference_choices().items():
                if choices.setdefault(key, bits) != bits:
                    raise ValueError(f"memory_budget chose different bits for {key} in two graphs")
    return choices


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float((a @ b) / (na * nb))


def _compare(targets: tuple[str, ...], dense: list[torch.Tensor], got: list[torch.Tensor],
             names: list[str]) -> FidelityRow:
    whole_d, whole_g = torch.cat(dense), torch.cat(got)
    changed = [(n, d, g) for n, d, g in zip(names, dense, got) if not torch.equal(d, g)]
    floor = 1e-4 * max(float(d.norm()) for d in dense)
    worst = min(((_cos(g, d), n) for n, d, g in changed if float(d.norm()) >= floor), default=(1.0, ""))
    dn = whole_d.norm()
    return FidelityRow(targets=targets, cosine=_cos(whole_g, whole_d),
                       norm_ratio=float(whole_g.norm() / dn) if dn > 0 else float("nan"),
                       worst_param=worst[1], worst_cosine=worst[0], changed=len(changed))
