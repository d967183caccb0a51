"""Saved-for-backward accounting of ViT-B/16 per op class: measured vs Back Razor's formula.

    .venv/bin/python -m razorpass.bench.accounting                 # ViT-B/16, batch 2, ~6 min on 2 CPU cores
    .venv/bin/python -m razorpass.bench.accounting --layers 2 --json out.json

For sparsity 0.9 and 0.97, one ``razorpass.memory_report`` per target set (the default
targets, and ``("all",)``) on ``ViTModel(ViTConfig())`` at 224 px (random weights, SDPA
attention, fp32), and next to it ``MemoryReport.backrazor_analytic()``: the paper's own
formula (``numel*4*density*(0.5 if fp16) + numel/8`` per sparse tensor, dense fp16 GELU
input, one input copy per Linear) applied to the same tensors. All figures are MiB per
sample; "dense" is what the same compilation saves with nothing compressed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any, Sequence

MiB = 2**20


def run(layers: int = 12, batch: int = 2, sparsities: Sequence[float] = (0.9, 0.97)) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import ViTConfig, ViTModel

    import razorpass

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(num_hidden_layers=layers), add_pooling_layer=False)
    x = torch.randn(batch, 3, 224, 224)
    out: dict[str, Any] = {"model": f"ViTModel(ViTConfig(num_hidden_layers={layers})), 224 px, fp32, random init",
                           "batch": batch, "runs": []}
    for sparsity in sparsities:
        for name, targets in (("default", None), ("all", ("all",))):
            options = {"sparsity": sparsity} if targets is None else {"sparsity": sparsity, "targets": targets}
            report = razorpass.memory_report(model, x, **options)
            run = {"sparsity": sparsity, "targets": name,
                   "dense_mib": report.baseline_bytes / batch / MiB,
                   "saved_mib": report.saved_bytes / batch / MiB,
                   "by_op_class_mib": {k: (d / batch / MiB, s / batch / MiB) for k, (d, s) in report.by_op_class().items()}}
            if targets is not None:
                run["backrazor_analytic_mib"] = {k: v / batch / MiB for k, v in report.backrazor_analytic().items()}
            out["runs"].append(run)
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']}, batch {result['batch']}; MiB saved for backward per sample",
             f"{'sparsity':>8}  {'targets':<8} {'dense':>8} {'razorpass':>10} {'less':>6} "
             f"{'Back Razor (formula)':>21} {'less':>6}"]
    for r in result["runs"]:
        br = r.get("backrazor_analytic_mib", {}).get("total")
        lines.append(f"{r['sparsity']:>8}  {r['targets']:<8} {r['dense_mib']:>8.2f} {r['saved_mib']:>10.2f} "
                     f"{r['dense_mib'] / r['saved_mib']:>5.1f}x "
                     + (f"{br:>21.2f} {r['dense_mib'] / br:>5.1f}x" if br else f"{'-':>21} {'':>6}"))
    for r in result["runs"]:
        if "backrazor_analytic_mib" not in r:
            continue
        lines.append(f"per op class at sparsity {r['sparsity']} (all targets): class: dense -> razorpass | Back Razor")
        for k, (d, s) in r["by_op_class_mib"].items():
            lines.append(f"  {k:<16} {d:>8.2f} -> {s:>7.2f} | {r['backrazor_analytic_mib'].get(k, s):>7.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m razorpass.bench.accounting", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12, help="ViT blocks (default 12: ViT-B/16)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", type=pathlib.Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.layers < 1 or args.batch < 1:
        raise SystemExit("--layers and --batch must be >= 1")
    result = run(args.layers, args.batch)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
