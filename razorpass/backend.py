"""The ``razor`` torch.compile backend and ``razorpass.compile``.

``torch.compile(model, backend="razor", options={...})`` resolves the name through the
``torch_dynamo_backends`` entry point (no import needed) and calls
``razor(gm, example_inputs, options={...}, mode=...)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import RazorConfig

__all__ = ["razor", "compile", "RazorBackend"]


class RazorBackend:
    """A torch.compile backend bound to one :class:`RazorConfig`."""

    def __init__(self, config: RazorConfig):
        self.config = config

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs: Any):
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
            return compile_fx(gm, example_inputs, config_patches=patches)
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
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


def razor(gm: torch.fx.GraphModule, example_inputs, options: Any = None, mode: str | None = None, **kwargs: Any):
    """The ``razor`` backend: ``options`` is a dict of RazorConfig fields or a RazorConfig."""
    if mode not in (None, "default"):
        raise ValueError(f"the razor backend supports mode=None or 'default', got {mode!r}")
    return RazorBackend(RazorConfig.from_options(options))(gm, example_inputs)


def compile(model: torch.nn.Module, config: RazorConfig | dict | None = None, *, dynamic: bool | None = None,
            fullgraph: bool = False, **options: Any):
    """Compile ``model`` with razorpass: ``razorpass.compile(model, sparsity=0.9)``.

    ``config`` is a RazorConfig (or dict); keyword ``options`` override its fields.
    """
    cfg = RazorConfig.from_options(config, **options)
    model = prepare_model(model, cfg)
    return torch.compile(model, backend=RazorBackend(cfg), dynamic=dynamic, fullgraph=fullgraph)


def prepare_model(model: torch.nn.Module, config: RazorConfig) -> torch.nn.Module:
    """Model-level transforms that must happen before tracing (token dropping changes
    shapes that Dynamo would bake into the graph). Identity unless BSR options ask.

    With ``drop_layers``, installs BSR token selection on ``model`` in place (forward
    hooks; parameters and module paths unchanged) and checks every BSR index against
    the model's blocks: see :mod:`razorpass.bsr`. ``trainable_blocks`` needs no
    transform: the ``freeze_blocks`` pre-autograd pass applies it to the traced graph.
    """
    from .bsr import apply_token_selection

    return apply_token_selection(model, config)
