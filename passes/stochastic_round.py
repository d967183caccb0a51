"""stochastic-round: the per-group codes of a forward graph rounded stochastically, under
one seed per step drawn from PyTorch's generator.

Runs on the partitioned forward graph when ``RazorConfig.quant_rounding`` is
"stochastic". Every ``quantize_group(x, group, bits)`` of a root that backward reads
linearly becomes ``quantize_group_stochastic(x, seed, group, bits)``: the same bounds
and layout, each level rounded up with probability its fractional part, so that the
decoded tensor is an unbiased estimate of ``x`` (the codec's rule:
``kernels/quantize.py``) and so is every gradient computed linearly from it (a weight
gradient ``dYᵀ x``, a matmul operand's gradient). A normalization's x̂ stays rounded
to nearest: its backward reads x̂ twice (``x̂ · mean(dy γ x̂)``), so the noise's
variance would turn into a bias of the input gradient, and the layer after the norm
reads the same code.

``seed`` is one ``randint(0, 2**31)`` int64 scalar on the device of the first code, drawn
right before it: a step draws one seed from the global generator, so
``torch.manual_seed`` (or a restored RNG state) gives the same codes, and
``razorpass.reference`` draws the same seed at the same point. All codes of one step
share the seed (the noise of element ``i`` is a hash of the seed and ``i``, so one
tensor quantized twice gets one code).

It runs before ``inline_codecs`` and ``center_quantize``: the stochastic encode has no
generated form and no centered kernel, so it stays an op and a BatchNorm input is
quantized after its subtraction. The backward is unchanged (``dequantize_group``
decodes both roundings), and so is what crosses to it. The result counts the encodes
rewritten.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .codecs import CODECS
from .context import PassContext
from .framework import GraphPass, PassResult, Stage
from .records import QuantizedRoot
from .rewrite import Rewriter
from .vocab import Encoding, OpClass, Rounding

__all__ = ["run", "PASS", "SEED_HIGH"]

aten = torch.ops.aten

SEED_HIGH = 1 << 31  # seeds are drawn from [0, SEED_HIGH)
NORM_CLASSES = frozenset({OpClass.LAYERNORM, OpClass.BATCHNORM})  # read x̂ nonlinearly: rounded to nearest


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.config.quant_rounding is not Rounding.STOCHASTIC:
        return PassResult()
    nearest, stochastic = CODECS[Encoding.GROUP].encode, CODECS[Encoding.GROUP_STOCHASTIC].encode
    # the encode nodes of roots read linearly (the partitioner keeps joint-graph names)
    linear = {r.encode_node for r in ctx.encoded_by("compress_saved")
              if isinstance(r, QuantizedRoot) and not NORM_CLASSES.intersection(r.op_classes)}
    seeds: dict[torch.device, fx.Node] = {}
    done = 0
    with Rewriter(gm) as rw:
        for node in list(rw.graph.nodes):
            if node.op != "call_function" or node.target is not nearest or node.kwargs or node.name not in linear:
                continue
            x = node.args[0]
            val = x.meta.get("val") if isinstance(x, fx.Node) else None
            if not isinstance(val, torch.Tensor):
                continue
            seed = seeds.get(val.device)
            if seed is None:
                with rw.graph.inserting_before(node):
                    seed = rw.graph.call_function(aten.randint.low, (0, SEED_HIGH, []),
                                                  {"dtype": torch.int64, "device": val.device})
                with rw.fake_mode:
                    seed.meta["val"] = torch.empty((), dtype=torch.int64, device=val.device)
                seeds[val.device] = seed
            rw.replace(node, stochastic, (x, seed, *node.args[1:]))
            done += 1
    return PassResult(done)


PASS = GraphPass("stochastic_round", Stage.POST_PARTITION, run)
