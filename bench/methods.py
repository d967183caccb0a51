"""The fine-tuning methods the benchmark compares, each one row of the table.

Every method trains a deep copy of the same model on the same batches with the same
seed; they differ only in how the training step is compiled and what it trains:

================  ================================================================
baseline          ``torch.compile(model)``, full fine-tune (the reference row)
bf16              baseline under ``torch.autocast(dtype=torch.bfloat16)``
checkpoint        baseline with ``torch.utils.checkpoint`` (non-reentrant) around
                  every block (found by :func:`bench.blocks.find_blocks`)
budget0.5         baseline compiled with ``activation_memory_budget = 0.5`` (Inductor
                  under ``torch._functorch.config.patch``: :class:`BudgetInductor`)
razor             ``razorpass.compile(model)``: the defaults (the "accurate" policy)
razor-int4        the defaults with ``quant_bits=4, quant_group_size=128`` (more bytes,
                  closer gradients)
razor-budget0.1   the defaults with ``memory_budget=0.1``: each graph saves at most 10% of
                  its dense bytes, bits chosen per tensor for the least error
backrazor0.9      ``razorpass.compile(model, policy="backrazor", sparsity=0.9)``: Back
                  Razor's rule (razorpass's default before the accurate policy)
backrazor0.97     the same at sparsity 0.97 (kept positions stored as offsets: cheaper
                  than the mask above sparsity 15/16, ``topk_layout="auto"``)
backrazor0.97-mask  the same with the 1-bit mask (``topk_layout="mask"``; also
                  backrazor0.97-all-mask)
backrazor0.9-all  Back Razor's rule on every target class (``targets=("all",)``, the GELU
                  input too; also backrazor0.97-all)
backrazor0.9-all-deriv3  every target class, the GELU backward stored as gelu'(x) in 3
                  bits (``gelu_encoding="deriv3"``) instead of a top-k of x
backrazor0.9-wgrad  ``targets=("linear", "conv", "mask")``: only activations that feed
                  weight gradients are sparsified, so every input gradient stays exact
bsr               ``razorpass.compile`` with the workload's BSR options, no compression
bsr+razor         BSR options + the defaults
bsr+backrazor0.9  BSR options + Back Razor's rule at 0.9 (also bsr+backrazor0.9-all)
head-only         baseline with every parameter but the head frozen (linear probe)
================  ================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from .blocks import find_head, freeze_all_but, wrap_blocks

__all__ = ["Method", "METHODS", "Prepared", "prepare", "resolve_methods", "CheckpointedBlock", "BudgetInductor"]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # razorpass.compile options; None compiles with plain torch.compile.
    razor: dict[str, Any] | None = None
    # Add the workload's BSR options (trainable_blocks, drop_layers, keep_rate).
    bsr: bool = False
    autocast: torch.dtype | None = None
    checkpoint: bool = False
    memory_budget: float | None = None
    head_only: bool = False

    @property
    def uses_razor(self) -> bool:
        return self.razor is not None or self.bsr

    def razor_options(self, bsr_options: dict[str, Any]) -> dict[str, Any] | None:
        """The options this method passes to razorpass.compile, or None."""
        if not self.uses_razor:
            return None
        return {**(self.razor or {}), **(bsr_options if self.bsr else {})}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("baseline", "torch.compile, full fine-tune"),
    Method("bf16", "torch.compile + bf16 autocast", autocast=torch.bfloat16),
    Method("checkpoint", "torch.compile + torch.utils.checkpoint per block", checkpoint=True),
    Method("budget0.5", "torch.compile, activation_memory_budget=0.5", memory_budget=0.5),
    Method("razor", "razorpass defaults (accurate policy: 3-bit groups of 256, softmax top-k 0.9, GELU 3-bit "
           "derivative, one code per norm and the layer after it)", razor={}),
    Method("razor-int4", "razorpass defaults with quant_bits=4, quant_group_size=128",
           razor={"quant_bits": 4, "quant_group_size": 128}),
    Method("razor-budget0.1", "razorpass defaults with memory_budget=0.1: bits per tensor (2-8, or dense) "
           "chosen for the least error within 10% of the dense saved bytes", razor={"memory_budget": 0.1}),
    Method("backrazor0.9", "Back Razor rule, sparsity 0.9", razor={"policy": "backrazor", "sparsity": 0.9}),
    Method("backrazor0.97", "Back Razor rule, sparsity 0.97", razor={"policy": "backrazor", "sparsity": 0.97}),
    Method("backrazor0.97-mask", "Back Razor rule, sparsity 0.97, kept positions as a 1-bit mask",
           razor={"policy": "backrazor", "sparsity": 0.97, "topk_layout": "mask"}),
    Method("backrazor0.9-all", "Back Razor rule, sparsity 0.9, every target class (GELU input too)",
           razor={"policy": "backrazor", "sparsity": 0.9, "targets": ("all",)}),
    Method("backrazor0.97-all", "Back Razor rule, sparsity 0.97, every target class",
           razor={"policy": "backrazor", "sparsity": 0.97, "targets": ("all",)}),
    Method("backrazor0.97-all-mask", "Back Razor rule, sparsity 0.97, every target class, 1-bit mask",
           razor={"policy": "backrazor", "sparsity": 0.97, "targets": ("all",), "topk_layout": "mask"}),
    Method("backrazor0.9-all-deriv3", "Back Razor rule, sparsity 0.9, every target class, GELU as a 3-bit derivative code",
           razor={"policy": "backrazor", "sparsity": 0.9, "targets": ("all",), "gelu_encoding": "deriv3"}),
    Method("backrazor0.9-wgrad", "Back Razor rule, sparsity 0.9, Linear/conv inputs only (exact input gradients)",
           razor={"policy": "backrazor", "sparsity": 0.9, "targets": ("linear", "conv", "mask")}),
    Method("bsr", "razorpass BSR (selected blocks, token dropping), no compression", razor={"targets": ()}, bsr=True),
    Method("bsr+razor", "razorpass BSR + the defaults", razor={}, bsr=True),
    Method("bsr+backrazor0.9", "razorpass BSR + Back Razor rule, sparsity 0.9", razor={"policy": "backrazor", "sparsity": 0.9}, bsr=True),
    Method("bsr+backrazor0.9-all", "razorpass BSR + Back Razor rule, sparsity 0.9, every target class",
           razor={"policy": "backrazor", "sparsity": 0.9, "targets": ("all",)}, bsr=True),
    Method("head-only", "torch.compile, only the head trains (linear probe)", head_only=True),
)}


def resolve_methods(names: str | list[str]) -> list[Method]:
    """Methods from a comma-separated string or a list of names, in the given order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods listed twice in {names}")
    return [METHODS[n] for n in names]


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under non-reentrant ``torch.utils.checkpoint``: only its inputs
    are saved for backward, its activations are recomputed there. Works on any block
    signature (args and kwargs pass through)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False, **kwargs)


Context = Callable[[], ContextManager[None]]


@dataclasses.dataclass
class Prepared:
    """A method applied to a model."""

    train_module: nn.Module  # what a training step calls (compiled)
    eager_module: nn.Module  # the same computation uncompiled (evaluation)
    # Wraps forward calls only (autocast: backward runs outside autocast).
    forward_context: Context
    razor_options: dict[str, Any] | None  # what razorpass.compile was given
    lr: float


class BudgetInductor:
    """Inductor with ``torch._functorch.config.activation_memory_budget`` set while it
    compiles; the partitioner, its only reader, runs then.

    A backend object of its own, on purpose: Dynamo keeps one cache per code object
    and tells entries apart by their guards and their backend, not by functorch's
    config. With the budget set as a global around a plain ``torch.compile``, a
    second model of the same class (the baseline's copy, compiled in the same
    process) would be served the other one's graphs."""

    def __init__(self, budget: float):
        self.budget = budget

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        with torch._functorch.config.patch(activation_memory_budget=self.budget):
            return compile_fx(gm, example_inputs)

    def __repr__(self) -> str:
        return f"BudgetInductor({self.budget})"


def _forward_context(method: Method, device_type: str) -> Context:
    if method.autocast is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device_type, dtype=method.autocast)


def prepare(method: Method, model: nn.Module, *, lr: float, head_lr: float, bsr_options: dict[str, Any],
            device_type: str) -> Prepared:
    """Apply ``method`` to ``model`` (modified in place: pass a copy).

    razorpass.compile may raise ValueError / NotImplementedError for options it does
    not support (yet); the caller reports the row as n/a.
    """
    if method.checkpoint:
        wrap_blocks(model, CheckpointedBlock)
    if method.head_only:
        freeze_all_but(model, find_head(model)[1])
    options = method.razor_options(bsr_options)
    if options is None:
        compiled = torch.compile(model) if method.memory_budget is None else torch.compile(
            model, backend=BudgetInductor(method.memory_budget))
    else:
        import razorpass

        compiled = razorpass.compile(model, **options)
    return Prepared(
        train_module=compiled,
        eager_module=getattr(compiled, "_orig_mod", model),
        forward_context=_forward_context(method, device_type),
        razor_options=options,
        lr=head_lr if method.head_only else lr,
    )
