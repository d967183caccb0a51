"""What a pass sees besides its graph: the config, what the partitioner knows about the
joint graph, the facts computed once per partition attempt, and the results of the
passes that ran before it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .facts import GraphFacts
from .framework import PassConfig, PassResult
from .records import EncodedRoot

__all__ = ["PreAutogradContext", "PassContext"]


@dataclass
class PreAutogradContext:
    """What a pass on the Dynamo (pre-autograd) graph sees: the config and the example
    inputs (``nn.Parameter`` objects for the lifted parameters)."""

    config: PassConfig
    example_inputs: Sequence[Any]
    # set by freeze_blocks: parameters that trainable_blocks freezes at every use
    frozen_params: list[Any] = field(default_factory=list)


@dataclass
class PassContext:
    """One joint graph's partitioning: what the partitioner hook was told, what carries
    across the pipeline's attempts (roots a retry leaves dense, the budget's bits), and
    this attempt's facts and pass results (``reset`` forgets those)."""

    config: PassConfig
    num_fwd_outputs: int
    static_lifetime_input_indices: list[int]
    excluded_roots: list[str] = field(default_factory=list)  # roots the partitioner saved dense
    budget_bits: dict[str, int] = field(default_factory=dict)  # memory_budget: root -> bits (0: dense)
    results: dict[str, PassResult] = field(default_factory=dict)  # this attempt's, by pass name
    joint: fx.GraphModule | None = None  # the rewritten joint graph, for the post-partition check
    _facts: GraphFacts | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Forget what an attempt computed (not the excluded roots, not the budget)."""
        self.results, self.joint, self._facts = {}, None, None

    def facts(self, gm: fx.GraphModule) -> GraphFacts:
        """The facts of the joint graph ``gm``, computed on the first call of an attempt
        (a pass that replaces the graph, like ``canonicalize``, runs before any asks)."""
        if self._facts is None or self._facts.graph is not gm.graph:
            if self._facts is not None:
                raise RuntimeError("razorpass: facts asked for a second joint graph in one attempt")
            self._facts = GraphFacts.of(gm, self.num_fwd_outputs, self.static_lifetime_input_indices)
        return self._facts

    def encoded_by(self, name: str) -> list[EncodedRoot]:
        """The roots the pass ``name`` encoded in this attempt ([] if it did not run)."""
        return list(getattr(self.results.get(name), "encoded", ()))

    @property
    def encoded(self) -> list[EncodedRoot]:
        """Every root this attempt's passes encoded, in the order the passes ran."""
        return [r for res in self.results.values() for r in getattr(res, "encoded", ())]
