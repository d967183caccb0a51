"""Saved bytes against gradient fidelity: uniform bits against ``memory_budget``.

    .venv/bin/python -m razorpass.bench.budget                                   # tweets (MiniLM), ~8 min
    .venv/bin/python -m razorpass.bench.budget --workload fashion --bits 3,4,8 --budgets 0.12,0.15,0.2

One training batch of the workload, as in ``razorpass.bench.fidelity``. For each row
the model is compiled for one step (the "eager" inner compiler: what is saved comes
from the partition, not from code generation) to read what each graph saves against
its dense size, then :func:`razorpass.gradient_fidelity` gives the cosine of the whole
gradient against the exact one (under a budget, with the bits that compile chose).
Rows: the accurate policy at uniform ``--bits``, then at each ``--budgets`` fraction.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from .workloads import WORKLOADS


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m razorpass.bench.budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tweets")
    p.add_argument("--bits", default="2,3,4", help="uniform quant_bits rows (comma-separated)")
    p.add_argument("--budgets", default="0.0969,0.1,0.12,0.15", help="memory_budget rows (comma-separated)")
    p.add_argument("--batch-size", type=int, help="examples in the batch (default: the workload's batch size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = [{"quant_bits": int(b)} for b in _floats(args.bits)] + [{"memory_budget": b} for b in _floats(args.budgets)]
    from razorpass import RazorConfig

    for opts in rows:
        RazorConfig(**opts)  # a bad option fails here, before the model loads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import torch.nn.functional as F

    import razorpass

    from .workloads import load_workload

    n = args.batch_size
    workload = load_workload(args.workload, "default", seed=args.seed, train_size=max(n or 0, 64), test_size=8)
    inputs, labels = workload.example_batch(n)
    model = workload.model.train()

    def loss(out):
        return F.cross_entropy(out, labels)

    print(f"{workload.name}: {workload.model_summary}; batch of {len(labels)}")
    print(f"{'row':<22} {'saved / dense':>13} {'MiB/sample':>10} {'cosine':>7}  worst parameter (cosine)")
    for opts in rows:
        torch._dynamo.reset()
        compiled = razorpass.compile(model, compiler="eager", **opts)
        with razorpass.record_compiles() as records, torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            loss(compiled(*inputs)).backward()
        dense = sum(int(e.dense_bytes) for r in records for e in r.saved if not e.input)
        saved = sum(int(e.nbytes) for r in records for e in r.saved if not e.input)
        row = razorpass.gradient_fidelity(model, inputs, loss, per_class=False, seed=args.seed, **opts).rows[0]
        name = ", ".join(f"{k}={v}" for k, v in opts.items())
        print(f"{name:<22} {saved / dense:>13.4f} {saved / len(labels) / 2**20:>10.3f} {row.cosine:>7.3f}  "
              f"{row.worst_param} ({row.worst_cosine:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
