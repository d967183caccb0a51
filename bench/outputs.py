"""What a benchmark run leaves behind: the terminal table, a long-format CSV (one row
per workload x method x metric) and a JSON document with the run's metadata (machine,
versions, git commit, date, workload and split description) and every raw
measurement (per-step times and losses, breakdowns, tracebacks of n/a rows)."""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any, Sequence

import torch

from .runner import MethodResult
from .workloads import Workload

__all__ = ["METRICS", "environment", "metric_rows", "write_csv", "write_json", "format_table", "CSV_COLUMNS"]

MiB = 2**20
REPO = pathlib.Path(__file__).resolve().parent.parent

# metric name -> (unit, how to read it off a MethodResult)
METRICS: dict[str, tuple[str, Any]] = {
    "accuracy": ("fraction", lambda r: r.accuracy),
    "accuracy_se": ("fraction", lambda r: r.accuracy_se),
    "test_size": ("examples", lambda r: r.test_size),
    "accuracy_diff": ("fraction", lambda r: r.accuracy_diff and r.accuracy_diff[0]),
    "accuracy_diff_se": ("fraction", lambda r: r.accuracy_diff and r.accuracy_diff[1]),
    "saved_bytes_per_sample": ("bytes", lambda r: r.per_sample(r.saved_bytes)),
    "peak_fwd_bwd_bytes": ("bytes", lambda r: r.peak_fwd_bwd_bytes),
    "peak_step_bytes": ("bytes", lambda r: r.peak_bytes),
    "step_s": ("s", lambda r: r.step_s),
    "step_ratio": ("x baseline", lambda r: r.step_ratio),
    "step_ratio_paired": ("x baseline", lambda r: r.paired_ratio and r.paired_ratio[0]),
    "step_ratio_paired_se": ("x baseline", lambda r: r.paired_ratio and r.paired_ratio[1]),
    "step_min_s": ("s", lambda r: r.step_min_s),
    "step_cpu_s": ("s", lambda r: r.step_cpu_s),
    "compile_s": ("s", lambda r: r.compile_s),
    "flops_per_step": ("FLOP", lambda r: r.flops),
    "flops_per_sample": ("FLOP", lambda r: r.per_sample(r.flops)),
    "trainable_params": ("params", lambda r: r.trainable_params),
    "total_params": ("params", lambda r: r.total_params),
    "final_train_loss": ("nats", lambda r: sum(r.losses[-10:]) / len(r.losses[-10:]) if r.losses else None),
    "batch_size": ("examples", lambda r: r.batch_size),
    "wall_s": ("s", lambda r: r.wall_s),
    "load_avg": ("runnable processes", lambda r: r.load_avg),
}
_ALWAYS = ("batch_size", "wall_s", "load_avg")  # recorded for n/a rows too
CSV_COLUMNS = ("date", "commit", "device", "workload", "scale", "method", "status", "metric", "value", "unit")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)


def _git_commit() -> str:
    """HEAD's hash, "+dirty" when the working tree differs from it (modified or
    untracked files). Read-only: ``--no-optional-locks`` keeps git status from
    refreshing the index."""
    if not (REPO / ".git").exists():  # an installed package, not a checkout
        return "unknown"
    try:
        head = _git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = bool(_git("--no-optional-locks", "status", "--porcelain").stdout.strip())
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, versions, commit and date of this run."""
    import transformers

    import razorpass

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {_cpu_name()}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "razorpass": razorpass.__version__,
    }


def metric_rows(results: Sequence[MethodResult], workload: Workload, scale: str, env: dict[str, Any]) -> list[dict]:
    """Long format: one row per method and metric (empty value where not measured)."""
    rows = []
    for r in results:
        for metric, (unit, read) in METRICS.items():
            rows.append({
                "date": env["date"], "commit": env["commit"], "device": env["device"], "workload": workload.name,
                "scale": scale, "method": r.method, "status": r.status, "metric": metric,
                "value": read(r) if r.ok or metric in _ALWAYS else None, "unit": unit,
            })
    return rows


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def _result_dict(r: MethodResult) -> dict[str, Any]:
    d = {"method": r.method, "summary": r.summary, "status": r.status}
    d.update({metric: read(r) if r.ok or metric in _ALWAYS else None for metric, (_, read) in METRICS.items()})
    d.update(step_times=r.step_times, step_cpu_times=r.step_cpu_times, paired_step_times=r.paired_times,
             losses=r.losses, razor_options=r.razor_options,
             breakdown_bytes_per_sample=r.breakdown, notes=r.notes, error=r.error,
             test_hits=None if r.hits is None else "".join("1" if h else "0" for h in r.hits))
    return d


def write_json(results: Sequence[MethodResult], meta: dict[str, Any], path: pathlib.Path) -> None:
    doc = {"meta": meta, "units": {m: u for m, (u, _) in METRICS.items()},
           "results": [_result_dict(r) for r in results]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def _ratio(mine: float | None, ref: float | None) -> str:
    """'(N.Nx)': how many times less than the baseline (empty without both values)."""
    return f" ({ref / mine:.1f}x)" if mine and ref else ""


def _times(mine: float | None, ref: float | None) -> str:
    """'(N.NNx)': how many times the baseline (empty without both values)."""
    return f" ({mine / ref:.2f}x)" if mine and ref else ""


def _cells(r: MethodResult, base: MethodResult | None) -> list[str]:
    ref = base if base is not None else MethodResult("", "", r.batch_size)
    acc = "n/a (no labels)" if r.accuracy is None else f"{r.accuracy:.3f} ± {r.accuracy_se:.3f}"
    diff = "-" if r.accuracy_diff is None or r.method == "baseline" else (
        f"{100 * r.accuracy_diff[0]:+.1f} ± {100 * r.accuracy_diff[1]:.1f}")
    return [
        r.method,
        acc,
        diff,
        f"{r.per_sample(r.saved_bytes) / MiB:.3f}" + _ratio(r.saved_bytes, ref.saved_bytes),
        f"{r.peak_fwd_bwd_bytes / MiB:.1f}" + _ratio(r.peak_fwd_bwd_bytes, ref.peak_fwd_bwd_bytes),
        f"{r.peak_bytes / MiB:.1f}" + _ratio(r.peak_bytes, ref.peak_bytes),
        f"{r.step_s:.3f}" + _times(r.step_s, ref.step_s),
        "-" if r.paired_ratio is None else f"{r.paired_ratio[0]:.2f} ± {r.paired_ratio[1]:.2f}",
        f"{r.step_min_s:.3f}" + _times(r.step_min_s, ref.step_min_s),
        f"{r.flops / 1e9:.1f}" if r.flops is not None else "-",
        "-" if r.compile_s is None else f"{r.compile_s:.0f}",
        f"{r.trainable_params / 1e6:.2f}M",
    ]


TABLE_HEADER = ("method", "accuracy ± SE", "vs base pts ± paired SE", "saved MiB/sample (less)", "peak fwd+bwd MiB (less)",
                "peak step MiB (less)", "step s (x base)", "paired x base ± SE", "min step s", "GFLOP/step", "compile s", "trained")


def format_table(results: Sequence[MethodResult], workload: Workload) -> str:
    """The terminal table: one line per method; "(N.Nx)" is N.N times less than the
    baseline row (memory) or N.N times the baseline (step time, a ratio of two medians
    timed minutes apart). "paired x base" is the step time against the baseline's
    from steps timed back to back (runner.run_methods), with its SE."""
    base = next((r for r in results if r.method == "baseline" and r.ok), None)
    rows = [_cells(r, base) for r in results if r.ok]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(TABLE_HEADER)]

    def line(cells: Sequence[str]) -> str:  # method left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(TABLE_HEADER), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    cells = iter(rows)
    for r in results:
        lines.append(line(next(cells)) if r.ok else f"{r.method.ljust(widths[0])}  {r.status}")
    lines += [f"note ({r.method}): {note}" for r in results for note in r.notes]
    cores = os.cpu_count() or 1
    busy = [r.method for r in results if r.load_avg and r.load_avg > cores]
    if busy:
        lines.append(f"warning: load average above {cores} cores during {', '.join(busy)}: other processes shared "
                     "the CPU, step times are inflated")
    s = workload.scale
    test = f"test n={len(workload.data.test)}" if workload.measures_accuracy else "no accuracy (random data)"
    lines.append(f"{workload.name}: {workload.model_summary}; {workload.steps} steps x batch {s.batch_size}, "
                 f"train n={len(workload.data.train)}, {test}")
    return "\n".join(lines)
