"""The reference's TorchFunctionMode and ``apply``, the context that runs a model under it."""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..config import RazorConfig
from .attention import _Softmax
from .codecs import _Derived, _Quantized
from .handlers import DECLINED, HANDLERS
from .ops import _DROPOUT, _HEAVY, _ORDER_KEEPING, _PARAM_VIEWS, _is_basic_index, _is_identity_dropout
from .rules import not_smaller, not_smaller_quantized


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place op on it or a view of it)."""
    try:
        return t._version
    except RuntimeError:  # an inference tensor has none (and no backward to feed)
        return -1


class _ReferenceMode(TorchFunctionMode):
    """Runs every torch function called inside ``apply`` as the reference does. In order:
    a light function of free tensors runs plain and its outputs are free too
    (``_light_of_free``); a view of a parameter or of a top-k-stored output is tracked
    like its source (``_same_memory``); else the function's handler in ``HANDLERS``
    (``handlers.py``) runs, and where there is none or it declines, the plain call.
    Handlers read the methods without a leading underscore."""

    def __init__(self, config: RazorConfig, paths: list[str], inputs: set[int], state: set[int],
                 choices: dict[tuple[str, int], int] | None = None, seeds: dict | None = None):
        super().__init__()
        self.config, self.paths, self.inputs, self.state = config, paths, inputs, state
        # quant_rounding="stochastic": the step's seed per device, drawn at its first code
        # (as the compiled forward draws it); the model's forward pre-hook clears it
        self.seeds = {} if seeds is None else seeds
        self.rounding_seed: int | None = None  # apply(rounding_seed=): every step's seed, no draw
        self.choices = choices  # memory_budget's (module path, numel) -> bits, 0 dense
        self.derived: dict[int, torch.Tensor] = {}
        self.topk_stored: dict[int, torch.Tensor] = {}  # outputs a top-k class stores (softmax)
        self.param_views: dict[int, torch.Tensor] = {}  # parameters seen through _PARAM_VIEWS
        # outputs computed from a normalization's quantized x̂ -> (output, the same
        # computation on the stored x̂, the output's version then): a layer reading
        # one reads the second, while the output is unchanged
        self.from_norm: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._light_of_free(func, args, kwargs):
            out = func(*args, **kwargs)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.derived[id(t)] = t
            return out
        same = self._same_memory(func, args, kwargs)
        if same is not None:
            return same
        handler = HANDLERS.get(func)
        out = DECLINED if handler is None else handler(self, func, args, kwargs)
        return func(*args, **kwargs) if out is DECLINED else out

    def _light_of_free(self, func, args, kwargs) -> bool:
        if func in _HEAVY:
            return False
        ts = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        free = [self._free(t) for t in ts]
        return any(free) and all(f or id(t) in self.state for f, t in zip(free, ts))

    def _same_memory(self, func, args, kwargs):
        """A view of a parameter, or an order-keeping reshape of a top-k-stored softmax
        output: the result is tracked like its source (a parameter's view stays exact,
        P.view(...) read by P·V is the same top-k copy). None for anything else."""
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None:
            return None
        identity_dropout = func in _DROPOUT and _is_identity_dropout(args, kwargs)
        if self.topk_stored.get(id(src)) is src and (func in _ORDER_KEEPING or identity_dropout):
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.topk_stored[id(out)] = out
            return out
        if self._caller_memory(src):
            whole = func is torch.Tensor.__getitem__ and _is_basic_index(args)  # [0:n] of n rows is an alias
            if func in _PARAM_VIEWS or identity_dropout or whole:
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor) and (not whole or out.shape == src.shape):
                    self.param_views[id(out)] = out
                return out
        return None

    def _free(self, t: torch.Tensor) -> bool:
        """Held by the caller (a model input, parameter or buffer that needs no gradient)
        or computed from such tensors (and parameters) by light functions alone: the
        compiled path recomputes those instead of saving them, so they are never
        sparsified."""
        if self.derived.get(id(t)) is t:
            return True
        return (id(t) in self.inputs or id(t) in self.state) and not t.requires_grad

    def _caller_memory(self, t: torch.Tensor) -> bool:
        """A parameter, or one seen through ``_PARAM_VIEWS``: the compiled path never saves
        a copy of it, so it stays exact. (Not "free": a light function of a trainable
        parameter, ``W * 2``, is an activation, compressed on both sides.)"""
        return isinstance(t, torch.nn.Parameter) or self.param_views.get(id(t)) is t

    def encoding(self, x: torch.Tensor, dtype: torch.dtype | None = None, *, cls: str,
                 exact_if_free: bool = True):
        """How ``x`` (seen as ``dtype``: the autocast copy an op saves) is stored for
        backward by class ``cls``: None (exact: a free tensor when ``exact_if_free``, or
        one whose encoded copy is not smaller than itself, the size rule), the config
        (top-k) or a ``_Quantized``. A tensor a top-k class also stores (the softmax
        output read by P·V) is top-k for every class."""
        if exact_if_free and (self._free(x) or self._caller_memory(x)):
            return None
        cfg, dt = self.config, dtype or x.dtype
        if cfg.encoding_of(cls) == "quant" and not (dt == x.dtype and self.topk_stored.get(id(x)) is x):
            bits = cfg.quant_bits
            if self.choices is not None:  # a tensor memory_budget did not choose bits for stays exact
                bits = self.choices.get((self.paths[-1] if self.paths else "", x.numel()), 0)
                if not bits:
                    return None
            stochastic = cfg.quant_rounding == "stochastic" and cls not in ("layernorm", "batchnorm")
            normal = cfg.quant_codebook == "normal" and cls in ("linear", "conv", "layernorm")
            q = _Quantized(cfg.quant_group(cls), bits, self.seed if stochastic else None,
                           "normal" if normal else "uniform")
            return None if not_smaller_quantized(tuple(x.shape), dt, q.group, q.bits, q.codebook) else q
        return None if not_smaller(tuple(x.shape), dt, cfg) else cfg

    def seed(self, device: torch.device) -> int:
        """The step's stochastic-rounding seed on ``device``: drawn from PyTorch's
        generator, ``randint(0, 2**31)``, at the step's first code there."""
        if self.rounding_seed is not None:
            return self.rounding_seed
        if device not in self.seeds:
            self.seeds[device] = int(torch.randint(0, 1 << 31, (), dtype=torch.int64, device=device))
        return self.seeds[device]

    def softmax(self, x: torch.Tensor, dim) -> torch.Tensor:
        enc = self.encoding(x, cls="softmax", exact_if_free=False)
        y = _Softmax.apply(x, dim, enc)
        if isinstance(enc, RazorConfig):
            self.topk_stored[id(y)] = y
        return y

    def selected(self, *needs_grad) -> bool:
        path = self.paths[-1] if self.paths else ""
        cfg = self.config
        return (
            any(isinstance(t, torch.Tensor) and t.requires_grad for t in needs_grad) and torch.is_grad_enabled()
            and any(fnmatch.fnmatchcase(path, p) for p in cfg.include)
            and not any(fnmatch.fnmatchcase(path, p) for p in cfg.exclude)
        )

    def track(self, out: torch.Tensor, sink: list) -> torch.Tensor:
        if sink:
            self.from_norm[id(out)] = (out, sink[0].detach().to(out.dtype), _version(out))
        return out

    def _stored(self, t):
        """The value a tracked tensor was derived as, while ``t`` is unchanged: an in-place
        op this context does not replay (``h += residual``) bumps its version and ends
        the tracking (the compiled graph sees that op as a new, untracked tensor)."""
        hit = self.from_norm.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t and hit[2] == _version(t) else None

    def derive(self, func, args, kwargs):
        """A pointwise function of one tracked tensor (the others smaller, broadcast):
        the result is tracked too, as the same function of the stored value."""
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tracked = [(t, v) for t in leaves if (v := self._stored(t)) is not None]  # before an in-place func
        out = func(*args, **kwargs)
        if (len(tracked) == 1 and isinstance(out, torch.Tensor)
                and (out.numel() == tracked[0][0].numel() or func is F.pad)
                and all(t is tracked[0][0] or t.numel() < out.numel() for t in leaves)):
            src, stored = tracked[0]
            swap = lambda t: stored.clone() if t is src else t  # noqa: E731
            with torch.no_grad():
                value = func(*torch.utils._pytree.tree_map(swap, args), **torch.utils._pytree.tree_map(swap, kwargs))
            self.from_norm[id(out)] = (out, value.detach(), _version(out))
        return out

    def layer_encoding(self, x: torch.Tensor, dtype, cls: str):
        """A linear / conv input's encoding: derived from a normalization's stored x̂
        when it is computed from it pointwise, else its own (``encoding``)."""
        stored = self._stored(x)
        if stored is not None and self.config.encoding_of(cls) == "quant" and not self._free(x):
            return _Derived(stored)
        return self.encoding(x, dtype, cls=cls)


@contextlib.contextmanager
def apply(model: torch.nn.Module, config: RazorConfig | None = None, *,
          choices: dict[tuple[str, int], int] | None = None, rounding_seed: int | None = None,
          **options) -> Iterator[None]:
    """Run ``model`` eagerly with the reference rule while the block is active.

    Under ``quant_rounding="stochastic"`` each step draws its seed from PyTorch's
    generator at its first code, as the compiled step does; ``rounding_seed`` gives
    every step that seed instead and draws nothing (so dropout's masks stay those of a
    dense step: ``gradient_fidelity`` compares with one).

    ``memory_budget`` chooses bits per tensor from the whole graph's saved bytes, known
    only once it is partitioned: pass the compile's choices as ``choices`` ((module
    path, numel) -> bits, 0 for dense; ``BudgetRecord.reference_choices()``). Quantized
    tensors then take those bits, and one with no entry stays exact."""
    config = RazorConfig.from_options(config, **options)
    if config.memory_budget is not None and choices is None:
        raise ValueError("reference.apply with memory_budget needs choices=: the bits come from the compiled graph "
                         "(record_compiles()[i].budget.reference_choices())")
    paths: list[str] = []
    inputs: set[int] = set()
    handles = []

    seeds: dict = {}

    def record_inputs(module, args, kwargs):
        seeds.clear()  # a new step: its stochastic codes draw a new seed
        inputs.update(id(t) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))

    handles.append(model.register_forward_pre_hook(record_inputs, with_kwargs=True))

    def enter(name):
        def hook(module, args):
            paths.append(name)
        return hook

    def leave(module, args, output):
        paths.pop()

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(enter(name)))
        handles.append(mod.register_forward_hook(leave))
    state = {id(t) for t in [*model.parameters(), *model.buffers()]}
    try:
        mode = _ReferenceMode(config, paths, inputs, state, choices, seeds)
        mode.rounding_seed = rounding_seed
        with mode:
            yield
    finally:
        for h in handles:
            h.remove()
