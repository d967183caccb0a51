"""Find the repeated blocks and the output head of a model, without knowing its class.

The benchmark applies per-block activation checkpointing, truncates models for smoke
tests and freezes everything but the head on models it has never seen by name:

* the **blocks** are those of razorpass' own rule (:func:`razorpass.find_blocks`,
  the blocks BSR indexes): the children of the ``nn.ModuleList`` / ``nn.Sequential``
  of two or more same-class children that holds the most parameters —
  ``encoder.layer`` of BERT / MiniLM / ViT, ``_blocks`` of EfficientNet. The
  benchmark drops that rule's attention requirement: CNN blocks are checkpointed too.
* the **head** is the last ``nn.Linear`` in registration order (the classifier of
  every model here).
"""

from __future__ import annotations

from torch import nn

__all__ = ["find_blocks", "find_head", "keep_first_blocks", "wrap_blocks", "freeze_all_but", "num_params"]


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every block, in order. Raises ValueError (razorpass'
    ``BlockError``, listing the candidates) when the model has no block list."""
    from razorpass import find_blocks as razor_find_blocks

    blocks = razor_find_blocks(model, None, runs_attention=lambda path, block: True)
    return [(path, model.get_submodule(path)) for path in blocks.paths]


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(path, module) of the output head: the last ``nn.Linear`` the model registers."""
    heads = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to use as its head")
    return heads[-1]


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return model.get_submodule(parent), name


def keep_first_blocks(model: nn.Module, n: int) -> nn.Module:
    """Drop every block after the first ``n`` (in place): a shallow model of the same
    kind for smoke tests. The model's own loop iterates over the shortened list."""
    blocks = find_blocks(model)
    if not 0 < n <= len(blocks):
        raise ValueError(f"cannot keep {n} of {len(blocks)} blocks")
    for path, _ in reversed(blocks[n:]):
        delattr(*_parent(model, path))
    return model


def wrap_blocks(model: nn.Module, wrapper: type[nn.Module]) -> int:
    """Replace every block ``b`` of the model by ``wrapper(b)`` (in place); returns the
    number of blocks wrapped."""
    blocks = find_blocks(model)
    for path, block in blocks:
        setattr(*_parent(model, path), wrapper(block))
    return len(blocks)


def freeze_all_but(model: nn.Module, keep: nn.Module) -> None:
    """requires_grad=False on every parameter that is not a parameter of ``keep``."""
    kept = {id(p) for p in keep.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in kept)
