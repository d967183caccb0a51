"""One Dynamo trace per model and session, shared by the tests that compile that model
under many configs.

Dynamo turns a model's Python into FX graphs; razorpass works on those graphs and
below (its pre-autograd passes, AOTAutograd, the partitioner, the post-partition
passes, the compiler). Tracing a Hugging Face model is most of the time a small case
spends compiling, and it is the same trace for every config. So a test module that
runs one model under many configs asks :func:`shared` for it: the model is built once
(under ``torch.manual_seed(0)``, as each case would build it) and compiled once with
one backend object, :class:`_Dispatch`; each graph Dynamo hands that backend is
compiled by ``RazorBackend(config)`` on a deep copy, once per config, when it first
runs under :meth:`Shared.using`. Every case still runs the whole razorpass backend on
the graph; only Dynamo's trace is shared (``razorpass.compile``'s model wrapper, which
adds nothing to the graph, is tested in test_backend.py).

A module that shares models must override conftest's ``_fresh_dynamo`` (a reset drops
the trace); a reset by another module in the same worker only costs a new trace: the
next call traces again and its graphs are compiled anew. A case that finds no record
of a razor graph in its block (Dynamo ran the model eagerly) must fail: the tests that
use this assert their records.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterator

import torch

import razorpass
from razorpass import RazorConfig
from razorpass.backend import RazorBackend

__all__ = ["Shared", "shared"]


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy that AOTAutograd still reads as Dynamo's graph, from which it learns
    which inputs are parameters: the copy keeps ``_param_name_to_source`` and each
    placeholder's ``_dynamo_source``, which ``copy.deepcopy`` drops."""
    new = copy.deepcopy(gm)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, copied in zip(gm.graph.find_nodes(op="placeholder"), new.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            copied._dynamo_source = old._dynamo_source
    return new


class _Dispatch:
    """A torch.compile backend: each graph it is given runs the razorpass compile of
    the config in ``self.config`` at call time, compiled on its first call with that
    config (its records kept, and handed to every later ``using`` block that runs it)."""

    def __init__(self):
        self.config: RazorConfig | None = None
        self.records: list | None = None  # the list of the active ``using`` block

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compiled: dict[RazorConfig, tuple[Callable, list]] = {}
        dispatch = self

        def run(*args: Any) -> Any:
            if dispatch.config is None:
                raise RuntimeError("a shared model ran outside Shared.using(config)")
            if dispatch.config not in compiled:
                with razorpass.record_compiles() as records:
                    fn = RazorBackend(dispatch.config)(_copy(gm), example_inputs)
                compiled[dispatch.config] = fn, records
            fn, records = compiled[dispatch.config]
            dispatch.records.extend(records)
            return fn(*args)  # as Dynamo calls what a backend returns

        return run


@dataclasses.dataclass
class Shared:
    model: torch.nn.Module
    inputs: Any
    compiled: torch.nn.Module  # torch.compile(model) with the dispatching backend
    _dispatch: _Dispatch

    @contextlib.contextmanager
    def using(self, config: RazorConfig) -> Iterator[list]:
        """Run ``compiled`` under ``config``; yields the records of the razor graphs
        that ran in the block (like ``razorpass.record_compiles``, but also those
        compiled by an earlier block with the same config)."""
        records: list = []
        self._dispatch.config, self._dispatch.records = config, records
        # Without resets between cases, one code object collects an entry per shared
        # model and autocast state (the decorator wrapper of every Hugging Face
        # forward is one function): past Dynamo's limit of 8 it would run eagerly.
        limits = dict(recompile_limit=64, accumulated_recompile_limit=1024)
        try:
            with torch._dynamo.config.patch(**limits):
                yield records
        finally:
            self._dispatch.config = self._dispatch.records = None


_SHARED: dict[Any, Shared] = {}


def shared(key: Any, build: Callable[[], tuple[torch.nn.Module, Any]]) -> Shared:
    """The session's :class:`Shared` for ``key``, built by ``build()`` under
    ``torch.manual_seed(0)`` on first use (the model in train mode)."""
    if key not in _SHARED:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model, inputs = build()
        model.train()
        dispatch = _Dispatch()
        _SHARED[key] = Shared(model, inputs, torch.compile(model, backend=dispatch), dispatch)
    return _SHARED[key]
