"""Throughput of the top-k compress / decompress kernels: ``python -m razorpass.bench.kernels``.

For activations from 1 MB to 1 GB (fp32 and bf16; block granularity 1024 and sample
granularity, one ViT-B sample = 197 * 768 elements), measures on a CUDA GPU:

* ``triton_compress`` / ``triton_decompress`` (the Triton kernels),
* ``torch_compress`` / ``torch_decompress`` (the PyTorch reference, for comparison),
* ``copy``: a device-to-device copy of the input, ``torch.empty_like(x).copy_(x)``,
  the bandwidth roofline of the same run.

Times are medians of ``triton.testing.do_bench``. GB/s counts the bytes each kernel
must read plus write (compress: input + mask + values; decompress: mask + values +
output; copy: 2 x input); ``ratio`` = GB/s / copy GB/s. Before timing, the Triton
kernels are checked bit-exact against the reference at the smallest size.

Prints a table and writes a long-format CSV under ``razorpass-results/`` (or ``--out``). Without CUDA it
exits with a message; ``--interpret-smoke`` instead runs one small size per case
under Triton's CPU interpreter (wall-clock timings, meaningless as throughput) to
prove the script works end to end.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path("razorpass-results")  # under the current directory
COLUMNS = [
    "kernel", "dtype", "granularity", "bytes", "ms", "gbps", "copy_gbps", "ratio",
    "device", "torch_version", "triton_version", "date",
    "group_size", "k", "value_dtype", "numel",
]  # fmt: skip
# One ViT-B/16 sample at 224 px: 197 tokens x 768 channels, 37 tiles of the tiled path (last partial).
SAMPLE_SHAPE = (197, 768)
BLOCK_SIZE = 1024
SIZES_MB = (1, 4, 16, 64, 256, 1024)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def keep_count(group_size: int, sparsity: float) -> int:
    """k of razorpass for one group (RazorConfig.keep_count without the config)."""
    from razorpass import RazorConfig

    return RazorConfig(sparsity=sparsity).keep_count(group_size)


def make_input(nbytes: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A (batch, 197, 768) activation of about ``nbytes`` bytes (at least one sample)."""
    per_sample = SAMPLE_SHAPE[0] * SAMPLE_SHAPE[1] * torch.empty((), dtype=dtype).element_size()
    batch = max(1, round(nbytes / per_sample))
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn((batch, *SAMPLE_SHAPE), dtype=torch.float32, device=device, generator=g).to(dtype)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _timer(interpret: bool) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a callable: do_bench on the GPU, wall clock otherwise."""
    if not interpret:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn: Callable[[], object], reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def _check_exact(tk, x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype) -> None:
    """The Triton kernels equal the PyTorch reference bit for bit on ``x``."""
    from razorpass.kernels.topk_compress import torch_compress, torch_decompress

    mask, values = tk.triton_compress(x, group_size, k, value_dtype)
    ref_mask, ref_values = torch_compress(x, group_size, k, value_dtype)
    dense = tk.triton_decompress(mask, values, list(x.shape), group_size, x.dtype)
    ref_dense = torch_decompress(ref_mask, ref_values, list(x.shape), group_size, x.dtype)
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    ok = (
        torch.equal(mask, ref_mask)
        and torch.equal(values.view(as_int[values.dtype]), ref_values.view(as_int[values.dtype]))
        and torch.equal(dense.view(as_int[dense.dtype]), ref_dense.view(as_int[dense.dtype]))
    )
    if not ok:
        raise SystemExit(f"Triton kernels differ from the reference: {x.dtype}, group_size={group_size}, k={k}")


def measure_case(tk, x: torch.Tensor, granularity: str, sparsity: float, value_dtype: torch.dtype,
                 timer, with_torch: bool) -> list[dict]:
    """Time every kernel on ``x`` (plus the copy roofline); one row per kernel."""
    from razorpass.kernels.topk_compress import torch_compress, torch_decompress

    group_size = BLOCK_SIZE if granularity == "block" else x[0].numel()
    k = keep_count(group_size, sparsity)
    mask, values = tk.triton_compress(x, group_size, k, value_dtype)
    shape, dtype = list(x.shape), x.dtype
    # compress reads x and writes (mask, values); decompress the other way round.
    io_bytes = _nbytes(x, mask, values)
    kernels = {
        "copy": (lambda: torch.empty_like(x).copy_(x), 2 * _nbytes(x)),
        "triton_compress": (lambda: tk.triton_compress(x, group_size, k, value_dtype), io_bytes),
        "triton_decompress": (lambda: tk.triton_decompress(mask, values, shape, group_size, dtype), io_bytes),
    }
    if with_torch:
        kernels["torch_compress"] = (lambda: torch_compress(x, group_size, k, value_dtype), io_bytes)
        kernels["torch_decompress"] = (lambda: torch_decompress(mask, values, shape, group_size, dtype), io_bytes)
    ms = {name: timer(fn) for name, (fn, _) in kernels.items()}
    copy_gbps = kernels["copy"][1] / (ms["copy"] * 1e6)
    case = {
        "dtype": str(dtype).removeprefix("torch."), "granularity": granularity, "group_size": group_size,
        "k": k, "value_dtype": str(value_dtype).removeprefix("torch."), "numel": x.numel(),
    }  # fmt: skip
    rows = []
    for name, (_, nbytes) in kernels.items():
        gbps = nbytes / (ms[name] * 1e6)
        rows.append({
            "kernel": name, "bytes": nbytes, "ms": ms[name], "gbps": gbps,
            "copy_gbps": copy_gbps, "ratio": gbps / copy_gbps, **case,
        })  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every (dtype, granularity, size); return one row per kernel and case."""
    interpret = args.interpret_smoke
    import triton

    from razorpass.kernels import topk_compress_triton as tk

    device = "cpu" if interpret else "cuda"
    common = {
        "device": "triton-interpreter (cpu)" if interpret else torch.cuda.get_device_name(),
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    timer = _timer(interpret)
    sizes_mb = [0.5] if interpret else args.sizes_mb  # smoke: a single (197, 768) sample
    rows: list[dict] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        value_dtype = dtype if args.value_dtype == "same" else DTYPES[args.value_dtype]
        for granularity in args.granularity:
            for i, size_mb in enumerate(sizes_mb):
                x = make_input(int(size_mb * 2**20), dtype, device)
                if i == 0:  # correctness first, at the smallest size
                    group_size = BLOCK_SIZE if granularity == "block" else x[0].numel()
                    _check_exact(tk, x, group_size, keep_count(group_size, args.sparsity), value_dtype)
                with_torch = not args.no_torch and size_mb <= args.torch_max_mb
                for row in measure_case(tk, x, granularity, args.sparsity, value_dtype, timer, with_torch):
                    rows.append({**row, **common})
                    _print_row(row)
                del x
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "header", False):
        print(
            f"{'kernel':<18} {'dtype':<9} {'gran':<6} {'group':>7} {'MB':>9} {'ms':>9} "
            f"{'GB/s':>8} {'copy':>8} {'ratio':>6}"
        )
        _print_row.header = True
    print(
        f"{r['kernel']:<18} {r['dtype']:<9} {r['granularity']:<6} {r['group_size']:>7} "
        f"{r['bytes'] / 2**20:>9.2f} {r['ms']:>9.4f} {r['gbps']:>8.1f} {r['copy_gbps']:>8.1f} {r['ratio']:>6.3f}",
        flush=True,
    )


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m razorpass.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=list(SIZES_MB), help="input sizes in MiB")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--granularity", nargs="+", choices=["block", "sample"], default=["block", "sample"])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--value-dtype", choices=[*DTYPES, "same"], default="bfloat16")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference kernels")
    p.add_argument("--torch-max-mb", type=float, default=1024, help="time the reference only up to this size")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default: razorpass-results/kernels-<date>.csv)")
    p.add_argument(
        "--interpret-smoke", action="store_true",
        help="no GPU needed: one small case per config under TRITON_INTERPRET=1 (checks the script, not speed)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        # Must be set before the kernel module is first imported (its @triton.jit runs then).
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print(
            "bench.kernels: no CUDA device, nothing to measure. The Triton kernels run on CUDA; "
            "use --interpret-smoke to run the script on a small input under Triton's CPU interpreter."
        )
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench.kernels: Triton is not installed (pip install triton).")
        return 0
    rows = run(args)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-interpret" if args.interpret_smoke else ""
    write_csv(rows, args.out or RESULTS_DIR / f"kernels{suffix}-{stamp}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
