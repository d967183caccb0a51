"""BSR token selection: after chosen blocks, keep only the tokens the CLS token attends
to most and fuse the rest into one token (EViT's rule, as BSR uses it).

**The rule** (at every selection block, in training and in eval). Let the block see
``N`` tokens, token 0 being CLS.

1. ``score`` = the CLS row of the block's post-softmax self-attention, averaged over
   heads, without CLS itself: ``attn[:, :, 0, 1:].mean(1)``, shape ``[B, N - 1]``.
   When attention is ``scaled_dot_product_attention`` (probabilities never
   materialised) only that one query row is computed:
   ``softmax(q_cls · Kᵀ · scale + mask_row0)``. Scores are taken before attention
   dropout, so they do not depend on the dropout draw.
2. ``k = ceil(keep_rate * (N - 1))`` tokens are kept, ranked by score (descending;
   ties go to the lower position), in that order.
3. With ``fuse_token``, the dropped tokens become one extra token: their sum weighted
   by their (unnormalised) scores. The sequence becomes ``[CLS, kept..., fused]``:
   ``N -> 1 + k + 1`` tokens. Nothing happens when ``k == N - 1``.
4. It applies to the output of the block's **attention residual add** (the first
   ``x + f(attention)`` whose operand is the block's own input), before anything else
   reads it, so the MLP, the second residual and every later block compute on the
   selected tokens, forward and backward. (In a post-norm block such as BERT's the
   selected sum then goes through the attention's LayerNorm.)
5. Padding: a masked key gets exactly zero attention, so padding ranks last and
   contributes nothing to the fused token. When fewer real tokens than ``k`` remain,
   padding positions fill the kept slots and stay masked. Every later block receives
   its token-aligned arguments (the attention mask: every tensor argument whose last
   one or two dims have the original token count) gathered to the surviving tokens;
   the fused token takes the mask of the highest-ranked dropped token, i.e. it is
   attendable iff it fused at least one real token.

**How it is applied** (:func:`apply_token_selection`, called by
``razorpass.compile`` before tracing, since token counts change shapes that a traced
graph has baked in). Nothing about a model class is assumed and no class or forward
is replaced: every selection block gets a forward pre-hook that enters
:class:`_Selector`, a ``TorchFunctionMode`` that watches the block's own torch calls,
takes the scores at its attention op (``scaled_dot_product_attention`` or a softmax
over a ``[B, H, N, N]`` tensor) and swaps the result of the residual add for the
selected tokens; a forward hook leaves the mode. Later blocks get a pre-hook that
gathers their token-aligned arguments. Dynamo traces the hooks and the mode like any
Python, so the compiled graph contains the selection (``fullgraph=True`` works) and
parameter paths are unchanged. Before any hook is installed, every selection block is
run once on a small random input with the same selector, so a block without attention,
without a residual add after it, or with causal attention (no token can play CLS)
fails in ``razorpass.compile`` with a :class:`TokenSelectionError`, not at the first
step.

The ranking is the custom op ``razor::rank_tokens`` (a stable descending argsort): it
makes tie-breaking identical in eager, AOTAutograd and Inductor, and it is the marker
by which the pre-autograd pass knows that token selection was applied before tracing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle
from torch.utils._pytree import tree_flatten, tree_map

from .config import RazorConfig
from .kernels.ops import RANK_TOKENS_OP, rank_tokens
from .passes.blocks import SOFTMAX_FUNCTIONS, BlockList, find_blocks

__all__ = [
    "TokenSelectionError",
    "rank_tokens",
    "freeze_parameters",
    "keep_count",
    "token_counts",
    "cls_attention_sdpa",
    "select_tokens",
    "apply_token_selection",
    "remove_token_selection",
    "attention_blocks",
    "RANK_TOKENS_OP",
]


class TokenSelectionError(ValueError):
    """Token selection cannot apply to a block (no attention, no residual add after it,
    causal attention, hidden states not [batch, tokens, channels])."""


class _CausalAttention(TokenSelectionError):
    """Raised from inside a block whose attention is ``is_causal=True``."""


# ----------------------------------------------------------------------------- the rule


def keep_count(n_tokens: int, keep_rate: float) -> int:
    """Tokens kept besides CLS at a selection block that sees ``n_tokens`` (EViT's formula)."""
    return math.ceil(keep_rate * (n_tokens - 1))


def token_counts(n_tokens: int, num_blocks: int, drop_layers: Sequence[int], keep_rate: float,
                 fuse_token: bool = True) -> list[int]:
    """Tokens entering each block, then leaving the last one (``num_blocks + 1`` numbers)."""
    drop = {i % num_blocks for i in drop_layers}
    counts = [n_tokens]
    for i in range(num_blocks):
        n = counts[-1]
        k = keep_count(n, keep_rate)
        counts.append(1 + k + int(fuse_token) if i in drop and k < n - 1 else n)
    return counts


def cls_attention_sdpa(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Step 1 for ``scaled_dot_product_attention``: the CLS query row only.

    query [B, Hq, N, E], key [B, Hk, N, E] (Hk divides Hq), attn_mask broadcastable to
    [B, Hq, N, N] (bool: True = attend; float: added). Returns [B, N - 1].
    """
    if key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = (query[..., :1, :] @ key.transpose(-2, -1)) * scale  # [B, H, 1, N]
    if attn_mask is not None:
        row = attn_mask[..., :1, :] if attn_mask.shape[-2] > 1 else attn_mask
        logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row
    # exp(l - logsumexp(l)) rather than softmax: this one-row tensor is not an attention
    # softmax output, and must not be taken for one by compress-saved's "softmax" class.
    return (logits - logits.logsumexp(-1, keepdim=True)).exp()[..., 0, 1:].mean(1)


def select_tokens(x: torch.Tensor, scores: torch.Tensor, keep_rate: float,
                  fuse_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 on x [B, N, C] with scores [B, N - 1].

    Returns the new tokens [B, M, C] and, for each, the position in x it came from
    [B, M] (the fused token: the highest-ranked dropped token).
    """
    B, N, C = x.shape
    k = keep_count(N, keep_rate)
    if k >= N - 1:
        return x, torch.arange(N, device=x.device).expand(B, N)
    order = RANK_TOKENS_OP(scores.detach())
    kept = order[:, :k]
    rest = x[:, 1:]
    tokens = [x[:, :1], rest.gather(1, kept.unsqueeze(-1).expand(B, k, C))]
    source = [torch.zeros_like(kept[:, :1]), kept + 1]
    if fuse_token:
        dropped = order[:, k:]
        weights = scores.gather(1, dropped).to(x.dtype).unsqueeze(-1)
        dropped_tokens = rest.gather(1, dropped.unsqueeze(-1).expand(B, N - 1 - k, C))
        tokens.append((dropped_tokens * weights).sum(1, keepdim=True))
        source.append(dropped[:, :1] + 1)
    return torch.cat(tokens, 1), torch.cat(source, 1)


# ----------------------------------------------------------------------------- runtime
_RESIDUAL_ADDS = frozenset({torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
                            torch.Tensor.add, torch.add})
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _cls_attention(func, args, kwargs, out, n_tokens: int) -> tuple[str, torch.Tensor] | None:
    """(op name, scores) if ``func`` is the block's self-attention over its n tokens."""
    if func is F.scaled_dot_product_attention:
        a = {**dict(zip(_SDPA_PARAMS, args)), **kwargs}
        q, k = a["query"], a["key"]
        if q.dim() != 4 or q.shape[-2] != n_tokens or k.shape[-2] != n_tokens:
            return None
        if a.get("is_causal", False):
            raise _CausalAttention("attention is causal (is_causal=True): token 0 sees no other token, "
                                      "so there is no CLS token whose attention could rank them")
        return "scaled_dot_product_attention", cls_attention_sdpa(q, k, a.get("attn_mask"), a.get("scale"))
    if func in SOFTMAX_FUNCTIONS:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if (isinstance(out, torch.Tensor) and out.dim() == 4 and dim in (-1, 3)
                and out.shape[-1] == n_tokens and out.shape[-2] == n_tokens):
            return "softmax", out[:, :, 0, 1:].mean(1)
    return None


class _TokenTrail:
    """What the blocks of one model share during a forward: the token count the first
    selection block saw (``n0``) and, for every current token, its position among those
    ``n0`` (``origin``, [B, M]). Written by selection blocks, read by the blocks after."""

    def __init__(self) -> None:
        self.n0: int | None = None
        self.origin: torch.Tensor | None = None

    def align(self, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """Gather the token-aligned tensor arguments to the current tokens."""
        n0, m = self.n0, hidden.shape[1]
        if m == n0:
            return args, kwargs
        origin = self.origin
        batch = origin.shape[0]

        def gather(t):
            if not isinstance(t, torch.Tensor) or t is hidden or t.dim() < 2 or t.shape[0] not in (1, batch):
                return t
            if t.shape[-1] == n0:
                t = torch.take_along_dim(t, origin.view(batch, *([1] * (t.dim() - 2)), m), dim=-1)
            if t.dim() >= 3 and t.shape[-2] == n0:
                t = torch.take_along_dim(t, origin.view(batch, *([1] * (t.dim() - 3)), m, 1), dim=-2)
            return t

        return tree_map(gather, args), tree_map(gather, kwargs)


@dataclass(frozen=True)
class _Site:
    """One selection block: where it is and what it does."""

    path: str
    keep_rate: float
    fuse_token: bool
    first: bool  # the first selection block of the model (starts the trail)


class _Selector(TorchFunctionMode):
    """Sees the torch calls of one selection block's forward (steps 1 and 4).

    State machine: waiting for the attention op -> waiting for the residual add whose
    operand is the block input -> done (every later call passes through untouched).
    """

    def __init__(self, site: _Site, trail: _TokenTrail):
        super().__init__()
        self.site, self.trail = site, trail
        self.reset(None)

    def reset(self, hidden: torch.Tensor | None) -> None:
        self.hidden = hidden
        self.attention: str | None = None
        self.scores: torch.Tensor | None = None
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.done:
            return out
        hidden = self.hidden
        if self.scores is None:
            found = _cls_attention(func, args, kwargs, out, hidden.shape[1])
            if found is not None:
                self.attention, self.scores = found
            return out
        if (func in _RESIDUAL_ADDS and any(a is hidden for a in args[:2])
                and isinstance(out, torch.Tensor) and out.shape == hidden.shape):
            self.done = True
            site = self.site
            out, source = select_tokens(out, self.scores, site.keep_rate, site.fuse_token)
            self.trail.origin = source if site.first else self.trail.origin.gather(1, source)
        return out


def _hidden_states(args: tuple, kwargs: dict, path: str) -> torch.Tensor:
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if not leaves or leaves[0].dim() != 3:
        raise TokenSelectionError(f"block {path!r}: token selection needs hidden states of shape "
                                  f"[batch, tokens, channels] as the first tensor argument, got "
                                  f"{tuple(leaves[0].shape) if leaves else 'no tensor'}")
    return leaves[0]


class _EnterSelection:
    """Forward pre-hook of a selection block: align its token arguments, enter the selector."""

    handle: RemovableHandle

    def __init__(self, selector: _Selector):
        self.selector = selector

    def __call__(self, module, args, kwargs):
        selector = self.selector
        site, trail = selector.site, selector.trail
        hidden = _hidden_states(args, kwargs, site.path)
        if site.first:
            trail.n0 = hidden.shape[1]
        else:
            args, kwargs = trail.align(args, kwargs, hidden)
        selector.reset(hidden)
        selector.__enter__()
        return args, kwargs


class _LeaveSelection:
    """Forward hook (always called) of a selection block: leave the selector; a block
    that finished without selecting is an error (the probe makes it unreachable)."""

    handle: RemovableHandle

    def __init__(self, selector: _Selector):
        self.selector = selector

    def __call__(self, module, args, output):
        selector = self.selector
        selector.__exit__(None, None, None)
        if output is not None and not selector.done:
            raise TokenSelectionError(_missing(selector.site.path, selector.attention))
        return None


class _AlignTokens:
    """Forward pre-hook of a block after the first selection block."""

    handle: RemovableHandle

    def __init__(self, path: str, trail: _TokenTrail):
        self.path, self.trail = path, trail

    def __call__(self, module, args, kwargs):
        return self.trail.align(args, kwargs, _hidden_states(args, kwargs, self.path))


_HOOK_TYPES = (_EnterSelection, _LeaveSelection, _AlignTokens)


def _missing(path: str, attention: str | None) -> str:
    if attention is None:
        return (f"block {path!r} ran no self-attention over its tokens (no scaled_dot_product_attention "
                "and no softmax over a [batch, heads, tokens, tokens] tensor)")
    return (f"block {path!r}: found its attention ({attention}) but no residual add of the block input "
            "after it (x + attention(...)); token selection goes between the attention residual and the MLP")


# ----------------------------------------------------------------------------- probing
@dataclass
class _Probe:
    attention: str | None = None
    selected: bool = False
    causal: bool = False
    error: str | None = None


def _candidate_widths(block: nn.Module) -> list[int]:
    """Hidden sizes to try, most common trailing parameter dim first."""
    counts = Counter(p.shape[-1] for p in block.parameters() if p.dim() >= 1)
    return [w for w, _ in counts.most_common(4)]


def _probe(path: str, block: nn.Module, keep_rate: float, fuse_token: bool) -> _Probe:
    """Run ``block`` once on a random [2, 6, C] input under a selector (no grad, the global
    RNG untouched) and report what the selector saw."""
    first = next(block.parameters(), None)
    if first is None:
        return _Probe(error="it has no parameters")
    floats = [p for p in block.parameters() if p.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    on_cpu = first.device.type == "cpu"
    devices = [] if on_cpu else [first.device]
    device_type = {} if on_cpu else {"device_type": first.device.type}
    result = _Probe(error="no hidden size to try")
    for width in _candidate_widths(block):
        selector = _Selector(_Site(path, keep_rate, fuse_token, first=True), _TokenTrail())
        with torch.random.fork_rng(devices=devices, **device_type), torch.no_grad():
            torch.manual_seed(0)
            x = torch.randn(2, 6, width, dtype=dtype, device=first.device)
            selector.reset(x)
            try:
                with selector:
                    block.forward(x)  # not block(x): the block's own hooks must not see the probe
            except _CausalAttention as e:
                return _Probe(attention="scaled_dot_product_attention", causal=True, error=str(e))
            except Exception as e:  # noqa: BLE001 - a width the block does not take
                result = _Probe(error=f"{type(e).__name__}: {e}")
                continue
        causal = selector.scores is not None and bool((selector.scores.sum(-1) == 0).all())
        return _Probe(attention=selector.attention, selected=selector.done, causal=causal)
    return result


def _check(path: str, probe: _Probe) -> None:
    if probe.causal:
        raise TokenSelectionError(f"block {path!r}: attention is causal, so token 0 attends to no other token; "
                                  "token selection needs a CLS token that attends to all tokens (ViT, BERT)")
    if probe.attention is None and probe.error is not None:
        raise TokenSelectionError(f"block {path!r} could not be run on a [batch, tokens, channels] input "
                                  f"to locate its attention ({probe.error})")
    if not probe.selected:
        raise TokenSelectionError(_missing(path, probe.attention))


# ----------------------------------------------------------------------------- install
def _find(model: nn.Module, config: RazorConfig):
    """(the model's blocks, the memoised probe that decided which blocks run attention)."""
    probes: dict[str, _Probe] = {}

    def probe(path: str, block: nn.Module) -> _Probe:
        if path not in probes:
            probes[path] = _probe(path, block, config.keep_rate, config.fuse_token)
        return probes[path]

    return find_blocks(model, config.blocks, lambda p, b: probe(p, b).attention is not None), probe


def attention_blocks(model: nn.Module, config: RazorConfig | None = None) -> BlockList:
    """The blocks token selection and ``trainable_blocks`` index (``config.blocks`` or
    found; see :mod:`razorpass.passes.blocks`)."""
    return _find(model, config or RazorConfig())[0]


def freeze_parameters(model: nn.Module, config: RazorConfig) -> list[str]:
    """``trainable_blocks`` on the module tree: set ``requires_grad=False`` on every
    parameter that trains nowhere, so that every path (the razor graph, an eager run
    Dynamo falls back to, the optimizer) trains the same parameters. Returns their names.

    A parameter trains when a module that owns it lies in a trainable block, or is
    registered after the block list (final norm, pooler, head). A parameter tied
    between a frozen and a training owner (an embedding tied to an LM head) keeps
    ``requires_grad``; the razor graph freezes it per use (``freeze_blocks``). The
    ``freeze_blocks`` pass checks this module-level verdict against the traced graph.
    """
    if config.trainable_blocks is None:
        return []
    blocks = attention_blocks(model, config)
    trainable = set(blocks.resolve(config.trainable_blocks, "trainable_blocks"))
    inside = dict(zip(blocks.paths, blocks.indices))
    container = blocks.paths[0].rpartition(".")[0]
    trains: set[int] = set()
    frozen: set[int] = set()
    past_blocks = False
    for path, module in model.named_modules(remove_duplicate=False):
        block = next((i for p, i in inside.items() if path == p or path.startswith(p + ".")), None)
        if block is not None:
            past_blocks, verdict = True, block in trainable
        elif container and (path == container or path.startswith(container + ".")):
            continue  # the block list itself owns no parameters of its own
        else:
            verdict = past_blocks
        for p in module.parameters(recurse=False):
            (trains if verdict else frozen).add(id(p))
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) in frozen and id(p) not in trains:
            p.requires_grad_(False)
            p._razor_frozen = True  # for the graph pass's consistency check
            names.append(name)
    return names


def apply_token_selection(model: nn.Module, config: RazorConfig) -> nn.Module:
    """Install token selection on ``model`` in place (see the module docstring) and return it.

    Re-applying replaces an earlier installation. Raises BlockError / TokenSelectionError
    (both ValueError) naming what the model has when the options cannot apply.
    """
    remove_token_selection(model)
    if not config.drop_layers:
        return model
    blocks, probe = _find(model, config)
    drop = blocks.resolve(config.drop_layers, "drop_layers")
    if config.trainable_blocks is not None:
        blocks.resolve(config.trainable_blocks, "trainable_blocks")
    for i in drop:
        path = blocks.path(i)
        _check(path, probe(path, model.get_submodule(path)))

    trail = _TokenTrail()
    for i, path in zip(blocks.indices, blocks.paths):
        block = model.get_submodule(path)
        if i in drop:
            selector = _Selector(_Site(path, config.keep_rate, config.fuse_token, first=i == drop[0]), trail)
            enter, leave = _EnterSelection(selector), _LeaveSelection(selector)
            enter.handle = block.register_forward_pre_hook(enter, with_kwargs=True)
            leave.handle = block.register_forward_hook(leave, always_call=True)
        elif i > drop[0]:
            align = _AlignTokens(path, trail)
            align.handle = block.register_forward_pre_hook(align, with_kwargs=True)
    return model


def remove_token_selection(model: nn.Module) -> nn.Module:
    """Remove every hook :func:`apply_token_selection` installed on ``model``."""
    for module in model.modules():
        ours = [h for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
                if isinstance(h, _HOOK_TYPES)]
        for hook in ours:
            hook.handle.remove()
    return model
