"""Partition a small function through razorpass's pipeline with AOTAutograd alone (no
Dynamo, no Inductor): what the pass tests run on.

``partition(fn, params, inputs, config)`` traces ``fn(*params, *inputs)`` with
``aot_function``, with the backend's decompositions and ``RazorPartitioner`` as the
partitioner (``params`` are the static-lifetime inputs, as Dynamo marks a module's
parameters), runs forward and backward once and returns the final forward and backward
graphs, the ``PartitionRecord`` and the gradients of ``params``. ``off`` names passes
to switch off (Inductor's ``disabled_passes``, which razorpass's runner honours).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from functorch.compile import aot_function
from torch._inductor.decomposition import select_decomp_table

import razorpass
from razorpass import RazorConfig
from razorpass.partitioner import RazorPartitioner


@dataclass
class Partitioned:
    fw: fx.GraphModule
    bw: fx.GraphModule
    record: object  # razorpass.passes.records.PartitionRecord
    out: torch.Tensor
    grads: list[torch.Tensor]

    def calls(self, graph: str, target) -> list[fx.Node]:
        """The nodes of the forward ("fw") or backward ("bw") graph that call ``target``."""
        gm = self.fw if graph == "fw" else self.bw
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def partition(fn, params, inputs, config: RazorConfig | dict | None = None, *, off: str = "",
              loss=lambda out: (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum()) -> Partitioned:
    config = RazorConfig.from_options(config)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    razor, graphs = RazorPartitioner(config), {}

    def partition_fn(gm, joint_inputs, **kwargs):
        kwargs["static_lifetime_input_indices"] = list(range(len(params)))
        return razor(gm, joint_inputs, **kwargs)

    def compiler(name):
        def compile_(gm, example_inputs):
            graphs[name] = gm
            return gm
        return compile_

    with razorpass.record_compiles() as records, torch._inductor.config.patch(disabled_passes=off):
        compiled = aot_function(fn, compiler("fw"), compiler("bw"), partition_fn=partition_fn,
                                decompositions=select_decomp_table())
        out = compiled(*params, *inputs)
        loss(out).backward()
    (record,) = records
    return Partitioned(graphs["fw"], graphs["bw"], record, out.detach(), [p.grad for p in params])
