"""The ``razor`` torch.compile backend and ``razorpass.compile``.

``torch.compile(model, backend="razor", options={...})`` resolves the name through the
``torch_dynamo_backends`` entry point (no import needed) and calls
``razor(gm, example_inputs, options={...}, mode=...)``.

``razorpass.compile(model, ...)`` also applies the model-level transforms (BSR token
selection), compiles in place on request (``inplace=True``: the model keeps its class,
``forward`` signature and ``state_dict`` keys, which is what Hugging Face ``Trainer``
and ``save_pretrained`` need), compiles the wrapped module of a
``DistributedDataParallel``, and warns once per model when a training call ran without
any razor graph (Dynamo fell back to eager, a compile stance or ``torch._dynamo.disable``
turned compilation off, or a frame was skipped): then nothing was compressed.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from .config import RazorConfig

__all__ = ["razor", "compile", "RazorBackend", "RazorFallbackWarning"]

log = logging.getLogger("razorpass")


class RazorFallbackWarning(RuntimeWarning):
    """A model compiled with razorpass ran (part of) a training step without razorpass."""


class RazorBackend:
    """A torch.compile backend bound to one :class:`RazorConfig`. ``runs`` counts the
    calls of the graphs it compiled (what the fallback warning of ``compile`` reads)."""

    def __init__(self, config: RazorConfig):
        self.config = config
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs: Any):
        compiled = self._compile(gm, example_inputs)
        backend = self

        def run(*args):
            backend.runs += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # keep the calling convention
        return run

    def _compile(self, gm: torch.fx.GraphModule, example_inputs):
        from .passes.pipeline import run_pre_autograd

        from .kernels import ops  # noqa: F401  (registers razor::compress / razor::decompress)
        from .partitioner import RazorPartitioner

        gm = run_pre_autograd(gm, example_inputs, self.config)
        partitioner = RazorPartitioner(self.config)
        if self.config.compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            # Inductor's layout optimization converts convolution inputs and weights to
            # channels-last and saves those copies for backward: on a ViT, a copy of the
            # batch and of the patch-embedding weight. razorpass exists to not store them.
            patches = {"custom_partitioner_fn": partitioner, "layout_optimization": False}
            if self.config.granularity == "sample":
                # before Inductor's joint-graph passes fold the reshapes that carry the
                # sample dim (passes/mark_samples.py)
                from torch._inductor import config as inductor_config

                from .passes.mark_samples import MarkSamples

                user = inductor_config.joint_custom_pre_pass
                user = [] if user is None else list(user) if isinstance(user, (list, tuple)) else [user]
                patches["joint_custom_pre_pass"] = [MarkSamples(), *user] if user else MarkSamples()
            return compile_fx(gm, example_inputs, config_patches=patches)
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        import torch._inductor.lowering  # noqa: F401  (its max_pool decomposition calls into it)
        from torch._inductor.decomposition import select_decomp_table

        # Inductor's decompositions, so that "eager" sees (and compresses) the same
        # joint graph as "inductor" and differs only by running it op by op.
        return aot_autograd(
            fw_compiler=boxed_nop,
            bw_compiler=boxed_nop,
            partition_fn=partitioner,
            decompositions=select_decomp_table(),
        )(gm, example_inputs)

    def __repr__(self) -> str:
        return f"RazorBackend({self.config!r})"

    def __reduce__(self):
        return (RazorBackend, (self.config,))


class _FallbackGuard:
    """Wraps what a razorpass-compiled model calls; after each training call (grad
    enabled) it checks that the razor graphs ran, and warns once if none did, or fewer
    than an earlier call ran (Dynamo's recompile limit hit for one of the frames)."""

    def __init__(self, fn, backend: RazorBackend, name: str):
        self.fn, self.backend, self.name = fn, backend, name
        self.best, self.warned = 0, False

    def __call__(self, *args, **kwargs):
        before = self.backend.runs
        out = self.fn(*args, **kwargs)
        if not self.warned and torch.is_grad_enabled():
            ran = self.backend.runs - before
            if ran == 0 or ran < self.best:
                self.warned = True
                what = "without any razor graph" if ran == 0 else f"only {ran} of its {self.best} razor graphs"
                warnings.warn(
                    f"razorpass: {self.name} ran a training step {what}, so what it saved for backward was not "
                    "compressed (Dynamo fell back to eager at its recompile limit, a compile stance or "
                    "torch._dynamo.disable turned compilation off, or the frame is one Dynamo skips). "
                    "TORCH_LOGS=recompiles,graph_breaks shows why. Warned once per model.",
                    RazorFallbackWarning, stacklevel=2)
            self.best = max(self.best, ran)
        return out


def razor(gm: torch.fx.GraphModule, example_inputs, options: Any = None, mode: str | None = None, **kwargs: Any):
    """The ``razor`` backend: ``options`` is a dict of RazorConfig fields or a RazorConfig."""
    if mode not in (None, "default"):
        raise ValueError(f"the razor backend supports mode=None or 'default', got {mode!r}")
    return RazorBackend(RazorConfig.from_options(options))(gm, example_inputs)


def compile(model: torch.nn.Module, config: RazorConfig | dict | None = None, *, dynamic: bool | None = None,
            fullgraph: bool = False, inplace: bool = False, **options: Any):
    """Compile ``model`` with razorpass: ``razorpass.compile(model, sparsity=0.9)``.

    ``config`` is a RazorConfig (or dict); keyword ``options`` override its fields.

    Returns a compiled wrapper (like ``torch.compile``), or with ``inplace=True`` the
    model itself, compiled in place (like ``nn.Module.compile``, but also for models
    whose ``forward`` Dynamo would skip, such as ``nn.Sequential``): its class,
    ``forward`` signature and ``state_dict`` keys are unchanged, so Hugging Face
    ``Trainer`` sees its columns and ``save_pretrained`` writes plain keys. A
    ``DistributedDataParallel`` is handled by compiling its module in place and
    returning the DDP wrapper (the same as ``DDP(razorpass.compile(module))``).
    """
    cfg = RazorConfig.from_options(config, **options)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"razorpass.compile takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        compile(model.module, cfg, dynamic=dynamic, fullgraph=fullgraph, inplace=True)
        return model
    model = prepare_model(model, cfg)
    backend = RazorBackend(cfg)
    name = type(model).__name__
    if inplace:
        call_impl = model._call_impl

        def razor_call(*args, **kwargs):  # razorpass's own frame: Dynamo never skips it
            return call_impl(*args, **kwargs)

        compiled = torch.compile(razor_call, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        model._compiled_call_impl = _FallbackGuard(compiled, backend, name)
        return model
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    compiled.forward = _FallbackGuard(compiled.forward, backend, name)
    return compiled


def prepare_model(model: torch.nn.Module, config: RazorConfig) -> torch.nn.Module:
    """Model-level transforms that must happen before tracing (token dropping changes
    shapes that Dynamo would bake into the graph). Identity unless BSR options ask.

    With ``drop_layers``, installs BSR token selection on ``model`` in place (forward
    hooks; parameters and module paths unchanged) and checks every BSR index against
    the model's blocks: see :mod:`razorpass.bsr`. With ``trainable_blocks``, freezes
    (``requires_grad=False``) the parameters that train nowhere before the first call,
    so an eager run trains what the razor graph trains; the ``freeze_blocks`` pass
    applies the rule per use in the traced graph (and checks the two agree).
    """
    from .bsr import apply_token_selection, freeze_parameters

    model = apply_token_selection(model, config)
    frozen = freeze_parameters(model, config)
    if frozen:
        log.info("razorpass: trainable_blocks froze %d parameters of %s", len(frozen), type(model).__name__)
    return model
