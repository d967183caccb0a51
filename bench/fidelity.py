"""Gradient fidelity per target class on a workload's real model and data.

    .venv/bin/python -m razorpass.bench.fidelity                        # tweets (MiniLM), batch 32, ~1 min
    .venv/bin/python -m razorpass.bench.fidelity --workload fashion --targets all --sparsity 0.97
    .venv/bin/python -m razorpass.bench.fidelity --targets gelu --gelu-encoding deriv3
    .venv/bin/python -m razorpass.bench.fidelity --memory-budget 0.088   # bits chosen per tensor

One training batch of the workload (its first ``--batch-size`` examples, the model in
training mode, cross-entropy on the labels) and :func:`razorpass.gradient_fidelity`:
the cosine and norm ratio of the gradient against the exact one, for each target class
alone and for all of them together, and the parameter whose direction moved most. It
runs eagerly (the reference rule), so it takes seconds where a fine-tune takes
minutes: a quick way to see which class a model's accuracy loss comes from.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from .workloads import WORKLOADS


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m razorpass.bench.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tweets")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--targets", help="comma-separated target classes (default: razorpass's defaults; 'all')")
    p.add_argument("--granularity", choices=("block", "sample"), default="block")
    p.add_argument("--gelu-encoding", choices=("topk", "deriv2", "deriv3", "deriv4"),
                   help="what the gelu target saves: the top-k input (topk) or gelu'(x) at 2/3/4 bits "
                        "(default: the policy's)")
    p.add_argument("--policy", choices=("accurate", "backrazor"), default="accurate")
    p.add_argument("--quant-bits", type=int, help="bits of the accurate policy's quantized classes (default: razorpass's)")
    p.add_argument("--quant-group-size", type=int, help="their group size (default: razorpass's)")
    p.add_argument("--quant-rounding", choices=("nearest", "stochastic"), help="how their codes round "
                   "(default: razorpass's)")
    p.add_argument("--quant-codebook", choices=("uniform", "normal"), help="their levels (default: razorpass's)")
    p.add_argument("--draws", type=int, default=1,
                   help="stochastic rounding: each row's gradient is the mean over this many seeds (default 1)")
    p.add_argument("--memory-budget", type=float,
                   help="memory_budget: the bits per tensor a compile of one step chooses (default: none)")
    p.add_argument("--batch-size", type=int, help="examples in the batch (default: the workload's batch size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch.nn.functional as F

    import razorpass

    from .workloads import load_workload

    options = {"sparsity": args.sparsity, "granularity": args.granularity, "gelu_encoding": args.gelu_encoding,
               "policy": args.policy}
    for name in ("quant_bits", "quant_group_size", "quant_rounding", "quant_codebook", "memory_budget"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.targets:
        options["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    razorpass.RazorConfig(**options)  # a bad option fails here, before the model loads
    n = args.batch_size
    if n is not None and n < 1:
        raise SystemExit("--batch-size must be >= 1")
    workload = load_workload(args.workload, "default", seed=args.seed, train_size=max(n or 0, 64), test_size=8)
    inputs, labels = workload.example_batch(n)
    model = workload.model.train()
    report = razorpass.gradient_fidelity(model, inputs, lambda out: F.cross_entropy(out, labels),
                                         seed=args.seed, draws=args.draws, **options)
    print(f"{workload.name}: {workload.model_summary}; batch of {len(labels)}")
    print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
