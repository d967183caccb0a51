"""``razorpass-bench``: run the methods of one workload and write the table, CSV, JSON
and plots.

    razorpass-bench                              # default job: tweets, 7 methods, ~20 min on 2 cores
    razorpass-bench --full                       # every method, larger subset, more steps
    razorpass-bench --workload vit --methods baseline,razor,checkpoint
    razorpass-bench --tiny --methods baseline,razor --out /tmp/smoke   # CI smoke test
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import warnings
from typing import TYPE_CHECKING, Sequence

from .allocator import MALLOC_CHOICES, configure
from .methods import METHODS, resolve_methods
from .workloads import DEFAULT_METHODS, WORKLOADS

if TYPE_CHECKING:
    from .runner import MethodResult
    from .workloads import Workload

# Relative to the current directory, so an installed harness never writes into its
# own package (the repository's `make demo` passes --out bench/results).
DEFAULT_OUT = pathlib.Path("razorpass-results")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="razorpass-bench",
        description="Fine-tune a real model with each memory-saving method; measure accuracy, memory, time, FLOPs.",
    )
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tweets",
                   help="tweets (default), bbc, fashion or vit (memory and speed only)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--full", action="store_true", help="every method, larger subset, more steps")
    scale.add_argument("--tiny", action="store_true", help="smoke test: a few steps on a tiny subset, 2-block model")
    p.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} "
                                     f"(default: {','.join(DEFAULT_METHODS)}; --full: all)")
    p.add_argument("--steps", type=int, help="training steps (default: from the scale's epochs)")
    p.add_argument("--train-size", type=int, help="training examples")
    p.add_argument("--test-size", type=int, help="test examples")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the scale's)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the head and the data order")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--paired-rounds", type=int, default=6, metavar="N",
                   help="pairs of steps (method, baseline) timed back to back after each method's run, for a step-time "
                        "ratio that drift of the machine's speed does not move (default: 6; 0: off; else at least 2)")
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="system",
                   help="what the C allocator does with freed memory, for every method alike: system (default) or "
                        "retain (glibc: no mmap, no trim, so freed memory is reused without page faults; bench/allocator.py)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.paired_rounds < 0 or args.paired_rounds == 1:
        parser.error(f"--paired-rounds must be 0 (off) or at least 2, got {args.paired_rounds}")
    malloc = configure(args.malloc)  # for the whole process ("system" undoes nothing)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from . import outputs
    from .runner import MIN_STEPS, run_methods
    from .workloads import load_workload

    scale = "full" if args.full else "tiny" if args.tiny else "default"
    methods = resolve_methods(args.methods or (list(METHODS) if args.full else list(DEFAULT_METHODS)))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()

    workload = load_workload(args.workload, scale, seed=args.seed, train_size=args.train_size,
                             test_size=args.test_size, steps=args.steps, batch_size=args.batch_size)
    rounds = args.paired_rounds
    if workload.steps < MIN_STEPS:
        raise SystemExit(f"razorpass-bench: --steps must be >= {MIN_STEPS} (2 warm-up, 1 profiled, >= 1 timed)")
    env = outputs.environment(device)
    print(f"razorpass-bench {workload.name} ({scale}) on {env['device']}, torch {env['torch']}, "
          f"commit {env['commit'][:12]}\n  {workload.data.description}\n  {workload.steps} steps, "
          f"methods: {', '.join(m.name for m in methods)}; paired rounds: {rounds}; malloc: {malloc}", flush=True)

    # Cold compiles: compile_s means what a fresh machine pays, and razorpass'
    # partitioner always runs (an AOTAutograd cache hit skips it, and with it the
    # records the memory breakdown needs). Patched, not set: nothing outlives the run.
    with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        results = run_methods(workload, methods, device, args.seed, rounds)
    base = next((r for r in results if r.method == "baseline" and r.ok), None)
    for r in results:
        r.baseline_step_s = base.step_s if base else None
        r.baseline_hits = base.hits if base else None

    print(outputs.format_table(results, workload))
    meta = {**env, "scale": scale, "batch_override": args.batch_size, "malloc": malloc, "paired_rounds": rounds,
            "argv": list(argv) if argv is not None else sys.argv[1:], "wall_s": time.perf_counter() - started,
            **workload.describe()}
    written = _write_outputs(results, workload, scale, env, meta, args.out)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.0f} s")
    return 0


def _write_outputs(results: Sequence[MethodResult], workload: Workload, scale: str, env: dict, meta: dict,
                   out: pathlib.Path) -> list[pathlib.Path]:
    """CSV, JSON and the two plots, named ``<workload>_<scale>[_b<batch>]*`` in ``out``
    (the batch size appears when ``--batch-size`` overrides the scale's)."""
    from . import outputs, plots

    out.mkdir(parents=True, exist_ok=True)
    batch = "" if meta.get("batch_override") is None else f"_b{meta['batch_override']}"
    stem = out / f"{workload.name}_{scale}{batch}"
    outputs.write_csv(outputs.metric_rows(results, workload, scale, env), stem.with_suffix(".csv"))
    outputs.write_json(results, meta, stem.with_suffix(".json"))
    title = f"{workload.name} ({scale}): {workload.model_summary}"
    figures = [plots.plot_tradeoff(results, title, stem.with_name(stem.name + "_tradeoff.png")),
               plots.plot_breakdown(results, title, stem.with_name(stem.name + "_breakdown.png"))]
    return [stem.with_suffix(".csv"), stem.with_suffix(".json"), *(f for f in figures if f)]
