"""The repeated block sequence of a model: the unit that BSR trains, freezes and drops
tokens in.

A model's **blocks** are the children of the ``nn.ModuleList`` / ``nn.Sequential``
whose children all have one class (two or more of them), that runs attention, and that
holds the most parameters: ``encoder.layer`` of BERT, ``layers`` of ViT, ``blocks`` of
timm, ``transformer.h`` of GPT-2. No class name is consulted. ``RazorConfig.blocks``
(a module-path glob such as ``"encoder.layer.*"``) overrides the search; its outermost
matches, in order, are the blocks.

The same rule is evaluated on two views of a model, which agree on every model whose
modules all run in ``forward``:

* :func:`find_blocks` on the ``nn.Module`` tree (``razorpass.compile`` uses it before
  tracing). Whether a block runs attention is decided by ``runs_attention``, a probe
  the caller passes in (token selection runs the block once on a small input).
* :func:`find_blocks_in_graph` on a Dynamo graph (the pre-autograd passes use it).
  Membership comes from ``node.meta["nn_module_stack"]``, attention from the graph's
  ``scaled_dot_product_attention`` / softmax nodes, parameter counts from the
  parameter placeholders. Block indices are the integer path components, so a graph
  that holds only some of the blocks (a graph break) still indexes them correctly;
  negative indices count from the highest index the graph holds.

Errors are :class:`BlockError` (a ``ValueError``) and always say what the model has.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .common import clean_fqn  # "L['self'].encoder.layer[0]" -> "encoder.layer.0"

__all__ = [
    "BlockError",
    "BlockList",
    "GraphBlocks",
    "find_blocks",
    "find_blocks_in_graph",
    "is_attention_node",
    "SOFTMAX_FUNCTIONS",
]

# Callables through which a softmax reaches a Dynamo graph (call_function targets) or a
# TorchFunctionMode (``func``); ``Tensor.softmax`` also appears as call_method "softmax".
SOFTMAX_FUNCTIONS = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})


class BlockError(ValueError):
    """The model has no block list that the BSR options can refer to, or an index names a
    block the model does not have. The message lists what the model has."""


@dataclass(frozen=True)
class BlockList:
    """The blocks of one model, in order: ``paths[i]`` is the module path of block ``i``
    (``indices[i]`` its index, which differs from ``i`` only in a partial graph)."""

    paths: tuple[str, ...]
    indices: tuple[int, ...]
    kind: str  # class name of the blocks, for messages only

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def count(self) -> int:
        """How many blocks the list spans (the highest index + 1)."""
        return max(self.indices) + 1

    def describe(self) -> str:
        """'12 blocks at encoder.layer.0..11' (or the explicit paths when not one list)."""
        first, last = self.paths[0], self.paths[-1]
        parent = first.rpartition(".")[0]
        if all(p.rpartition(".")[0] == parent for p in self.paths) and last.rpartition(".")[2].isdigit():
            where = f"{first}..{last.rpartition('.')[2]}"
        else:
            where = ", ".join(self.paths)
        return f"{self.count} blocks ({self.kind}) at {where}"

    def resolve(self, indices: Iterable[int], option: str) -> tuple[int, ...]:
        """Normalise ``indices`` (negative ones count from the end) to sorted block indices;
        BlockError naming ``RazorConfig.<option>`` for one the model does not have."""
        n = self.count
        out = set()
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise BlockError(
                    f"RazorConfig.{option}: block index {i} does not exist; the model has {self.describe()} "
                    f"(valid indices {-n}..{n - 1})"
                )
            out.add(j)
        return tuple(sorted(out))

    def path(self, index: int) -> str:
        return self.paths[self.indices.index(index)]


# ----------------------------------------------------------------------------- modules
def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _outermost(paths: Sequence[str]) -> list[str]:
    """Drop every path that lies inside another path of the list (keeps order)."""
    chosen: list[str] = []
    for p in paths:
        if not any(p.startswith(q + ".") for q in chosen):
            chosen.append(p)
    return chosen


def _sequences(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(path, children) of every ModuleList / Sequential of >= 2 same-class children
    that hold parameters."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            children = list(module)
            if len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
                found.append((path, children))
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_blocks(model: nn.Module, pattern: str | None, runs_attention: Callable[[str, nn.Module], bool]) -> BlockList:
    """The blocks of ``model`` (see the module docstring).

    ``runs_attention(path, block)`` says whether a block runs attention; it is asked
    about the first child of each candidate sequence only (the children share a class).
    """
    if pattern is not None:
        modules = dict(model.named_modules())
        paths = _outermost([p for p in modules if p and fnmatch.fnmatchcase(p, pattern)])
        if not paths:
            raise BlockError(f"RazorConfig.blocks={pattern!r} matches no module of {type(model).__name__}; "
                             f"{_candidates_text(model)}")
        kind = "/".join(sorted({type(modules[p]).__name__ for p in paths}))
        return BlockList(tuple(paths), tuple(range(len(paths))), kind)

    sequences = _sequences(model)
    with_attention = []
    for path, children in sequences:
        if runs_attention(_join(path, "0"), children[0]):
            with_attention.append((sum(_num_params(c) for c in children), path, children))
    if not with_attention:
        raise BlockError(f"{type(model).__name__} has no list of attention blocks: {_candidates_text(model)}. "
                         "Name the blocks with RazorConfig.blocks (a module-path glob) if the model has them.")
    _, path, children = max(with_attention, key=lambda c: c[0])
    names = [name for name, _ in (model.get_submodule(path).named_children())]
    return BlockList(tuple(_join(path, n) for n in names), tuple(range(len(names))), type(children[0]).__name__)


def _candidates_text(model: nn.Module) -> str:
    seqs = _sequences(model)
    if not seqs:
        return "it has no nn.ModuleList / nn.Sequential of two or more same-class blocks"
    listed = "; ".join(f"{p or '(root)'}: {len(c)} x {type(c[0]).__name__}" for p, c in seqs)
    return f"same-class block sequences found: {listed}"


# ----------------------------------------------------------------------------- graphs
def _stack_paths(node: fx.Node) -> list[tuple[str, type | str]]:
    """(module path, module class) of every module the node ran inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(clean_fqn(raw), kind) for raw, kind in stack.values()]


def is_attention_node(node: fx.Node) -> bool:
    """A Dynamo-graph node that computes attention probabilities: a
    scaled_dot_product_attention call, or a softmax over the last dim of a rank-4
    [batch, heads, queries, keys] tensor."""
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        return True
    is_softmax = (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS) or (
        node.op == "call_method" and node.target == "softmax"
    )
    if not is_softmax:
        return False
    val = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(val, torch.Tensor) and val.dim() == 4


@dataclass
class GraphBlocks:
    """The blocks found in one Dynamo graph and which nodes run inside each."""

    blocks: BlockList
    member: dict[fx.Node, int] = field(default_factory=dict)  # node -> block index

    def last_position(self, order: dict[fx.Node, int]) -> int:
        """Topological position of the last node that runs inside any block."""
        return max(order[n] for n in self.member)


def find_blocks_in_graph(gm: fx.GraphModule, example_inputs: Sequence, pattern: str | None) -> GraphBlocks:
    """The blocks of the model a Dynamo graph was captured from (see the module docstring)."""
    kinds: dict[str, str] = {}  # path -> class name, in first-appearance order
    members: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, kind in _stack_paths(node):
            kinds.setdefault(path, getattr(kind, "__name__", str(kind)))
            members.setdefault(path, []).append(node)

    if pattern is not None:
        paths = _outermost([p for p in kinds if p and fnmatch.fnmatchcase(p, pattern)])
        if not paths:
            raise BlockError(f"RazorConfig.blocks={pattern!r} matches no module that runs in this graph; "
                             f"{_graph_candidates_text(kinds)}")
        blocks = BlockList(tuple(paths), tuple(range(len(paths))), "/".join(sorted({kinds[p] for p in paths})))
    else:
        blocks = _choose_graph_sequence(gm, example_inputs, kinds, members)

    member: dict[fx.Node, int] = {}
    for index, path in zip(blocks.indices, blocks.paths):
        for node in members.get(path, ()):
            member[node] = index
    return GraphBlocks(blocks, member)


def _graph_sequences(kinds: dict[str, str]) -> dict[str, list[tuple[int, str]]]:
    """parent path -> [(index, child path)] of integer-named children of one class."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for path in kinds:
        parent, _, last = path.rpartition(".")
        if last.isdigit():
            groups.setdefault(parent, []).append((int(last), path))
    return {
        parent: sorted(children)
        for parent, children in groups.items()
        if len(children) >= 2 and len({kinds[p] for _, p in children}) == 1
    }


def _graph_candidates_text(kinds: dict[str, str]) -> str:
    seqs = _graph_sequences(kinds)
    if not seqs:
        return "the graph runs no list of two or more same-class blocks"
    listed = "; ".join(f"{p or '(root)'}: {len(c)} x {kinds[c[0][1]]}" for p, c in seqs.items())
    return f"same-class block sequences in the graph: {listed}"


def _choose_graph_sequence(gm, example_inputs, kinds, members) -> BlockList:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    param_home: list[tuple[str, int]] = []  # (innermost module path, numel) per parameter input
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, nn.Parameter):
            stack = _stack_paths(node)
            param_home.append((stack[-1][0] if stack else "", value.numel()))

    best = None
    for parent, children in _graph_sequences(kinds).items():
        if not any(is_attention_node(n) for _, p in children for n in members[p]):
            continue
        prefix = parent + "."
        params = sum(numel for home, numel in param_home if home.startswith(prefix))
        if best is None or params > best[0]:
            best = (params, parent, children)
    if best is None:
        raise BlockError(f"no list of attention blocks in this graph: {_graph_candidates_text(kinds)}. "
                         "Name the blocks with RazorConfig.blocks (a module-path glob) if the model has them.")
    _, parent, children = best
    return BlockList(tuple(p for _, p in children), tuple(i for i, _ in children), kinds[children[0][1]])
