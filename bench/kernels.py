"""Throughput of the codec kernels: ``python -m razorpass.bench.kernels``.

For activations from 1 MB to 1 GB (fp32 and bf16), measures on a CUDA GPU, per family
(``--families``):

* ``topk`` (block granularity 1024 and sample granularity, one ViT-B sample = 197 * 768
  elements): ``triton_compress`` / ``triton_decompress`` (the Triton kernels of the mask
  layout), ``triton_mask_to_offsets`` / ``triton_decompress_offsets`` (the offsets
  layout), and ``torch_compress`` / ``torch_decompress`` (the PyTorch reference);
* ``quantize`` (``--quant-bits``): ``triton_quantize_group`` /
  ``triton_dequantize_group`` (groups of ``QUANT_GROUP``), ``triton_quantize_uniform`` /
  ``triton_dequantize_uniform`` (GELU's derivative range), and their PyTorch kernels;
* ``copy``: a device-to-device copy of the input, ``torch.empty_like(x).copy_(x)``,
  the bandwidth roofline of the same run.

Times are medians of ``triton.testing.do_bench``. GB/s counts the bytes each kernel
must read plus write (compress: input + mask + values; decompress: mask + values +
output; the offsets layout: mask + offsets, offsets + values + output; a quantizer:
input + codes (+ bounds), its dequantizer the other way round; copy: 2 x input);
``ratio`` = GB/s / copy GB/s. Before timing, the Triton kernels are checked bit-exact
against the reference at the smallest size.

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
    "group_size", "k", "value_dtype", "numel", "bits",
]  # fmt: skip
# One ViT-B/16 sample at 224 px: 197 tokens x 768 channels, 37 tiles of the tiled path (last partial).
SAMPLE_SHAPE = (197, 768)
BLOCK_SIZE = 1024
SIZES_MB = (1, 4, 16, 64, 256, 1024)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FAMILIES = ("topk", "quantize")
QUANT_GROUP = 256  # RazorConfig's default quant_group_size
QUANT_BITS = (3, 4)
_AS_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


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


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(_AS_INT.get(a.dtype, a.dtype)), b.view(_AS_INT.get(b.dtype, b.dtype)))


def _check_exact(tk, x: torch.Tensor, group_size: int, k: int, value_dtype: torch.dtype) -> None:
    """The Triton kernels equal the PyTorch reference bit for bit on ``x``."""
    from razorpass.kernels.topk_compress import torch_compress, torch_decompress, torch_mask_to_offsets

    mask, values = tk.triton_compress(x, group_size, k, value_dtype)
    ref_mask, ref_values = torch_compress(x, group_size, k, value_dtype)
    dense = tk.triton_decompress(mask, values, list(x.shape), group_size, x.dtype)
    ref_dense = torch_decompress(ref_mask, ref_values, list(x.shape), group_size, x.dtype)
    offsets = tk.triton_mask_to_offsets(ref_mask, group_size, k)
    ok = (
        torch.equal(mask, ref_mask)
        and _same_bits(values, ref_values)
        and _same_bits(dense, ref_dense)
        and torch.equal(offsets, torch_mask_to_offsets(ref_mask, group_size, k))
        and _same_bits(tk.triton_decompress_offsets(offsets, ref_values, list(x.shape), group_size, x.dtype),
                       ref_dense)
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
    offsets = tk.triton_mask_to_offsets(mask, group_size, k)
    shape, dtype = list(x.shape), x.dtype
    # compress reads x and writes (mask, values); decompress the other way round.
    io_bytes = _nbytes(x, mask, values)
    kernels = {
        "copy": (lambda: torch.empty_like(x).copy_(x), 2 * _nbytes(x)),
        "triton_compress": (lambda: tk.triton_compress(x, group_size, k, value_dtype), io_bytes),
        "triton_decompress": (lambda: tk.triton_decompress(mask, values, shape, group_size, dtype), io_bytes),
        "triton_mask_to_offsets": (lambda: tk.triton_mask_to_offsets(mask, group_size, k), _nbytes(mask, offsets)),
        "triton_decompress_offsets": (lambda: tk.triton_decompress_offsets(offsets, values, shape, group_size, dtype),
                                      _nbytes(offsets, values, x)),
    }
    if with_torch:
        kernels["torch_compress"] = (lambda: torch_compress(x, group_size, k, value_dtype), io_bytes)
        kernels["torch_decompress"] = (lambda: torch_decompress(mask, values, shape, group_size, dtype), io_bytes)
    case = {
        "dtype": str(dtype).removeprefix("torch."), "granularity": granularity, "group_size": group_size,
        "k": k, "value_dtype": str(value_dtype).removeprefix("torch."), "numel": x.numel(),
    }  # fmt: skip
    return _time_rows(kernels, timer, case)


def _check_quant_exact(x: torch.Tensor, bits: int) -> None:
    """The Triton quantization kernels equal the PyTorch kernels bit for bit on ``x``."""
    from razorpass.kernels import ops, quantize

    lo, hi = quantize.GELU_DERIVATIVE_RANGE["none"]
    shape = list(x.shape)
    codes, bounds = ops.quantize_group(x, QUANT_GROUP, bits, "triton")
    ref_codes, ref_bounds = ops.quantize_group(x, QUANT_GROUP, bits, "torch")
    ucodes = ops.quantize_uniform(x, bits, lo, hi, "triton")
    ok = (
        torch.equal(codes, ref_codes)
        and _same_bits(bounds, ref_bounds)
        and _same_bits(ops.dequantize_group(codes, bounds, shape, QUANT_GROUP, bits, x.dtype, "triton"),
                       ops.dequantize_group(codes, bounds, shape, QUANT_GROUP, bits, x.dtype, "torch"))
        and torch.equal(ucodes, ops.quantize_uniform(x, bits, lo, hi, "torch"))
        and _same_bits(ops.dequantize_uniform(ucodes, shape, bits, lo, hi, x.dtype, "triton"),
                       ops.dequantize_uniform(ucodes, shape, bits, lo, hi, x.dtype, "torch"))
    )
    if not ok:
        raise SystemExit(f"Triton quantization kernels differ from the reference: {x.dtype}, {bits} bits")


def measure_quant_case(x: torch.Tensor, bits: int, timer, with_torch: bool) -> list[dict]:
    """Time the quantization kernels on ``x`` (per group, and on GELU's fixed range)."""
    from razorpass.kernels import ops, quantize

    lo, hi = quantize.GELU_DERIVATIVE_RANGE["none"]
    shape, dtype, g = list(x.shape), x.dtype, QUANT_GROUP
    codes, bounds = ops.quantize_group(x, g, bits, "triton")
    ucodes = ops.quantize_uniform(x, bits, lo, hi, "triton")
    group_io, uniform_io = _nbytes(x, codes, bounds), _nbytes(x, ucodes)
    backends = ("triton", "torch") if with_torch else ("triton",)
    per_group = {"copy": (lambda: torch.empty_like(x).copy_(x), 2 * _nbytes(x))}
    fixed_range = dict(per_group)
    for b in backends:
        per_group[f"{b}_quantize_group"] = (lambda b=b: ops.quantize_group(x, g, bits, b), group_io)
        per_group[f"{b}_dequantize_group"] = (
            lambda b=b: ops.dequantize_group(codes, bounds, shape, g, bits, dtype, b), group_io)
        fixed_range[f"{b}_quantize_uniform"] = (lambda b=b: ops.quantize_uniform(x, bits, lo, hi, b), uniform_io)
        fixed_range[f"{b}_dequantize_uniform"] = (
            lambda b=b: ops.dequantize_uniform(ucodes, shape, bits, lo, hi, dtype, b), uniform_io)
    case = {"dtype": str(dtype).removeprefix("torch."), "numel": x.numel(), "bits": bits}
    return (_time_rows(per_group, timer, {**case, "granularity": "group", "group_size": g})
            + _time_rows(fixed_range, timer, {**case, "granularity": "range"}))


def _time_rows(kernels: dict, timer, case: dict) -> list[dict]:
    """Time ``kernels`` (name -> (callable, bytes moved), with a ``copy`` roofline); one
    row per kernel."""
    ms = {name: timer(fn) for name, (fn, _) in kernels.items()}
    copy_gbps = kernels["copy"][1] / (ms["copy"] * 1e6)
    rows = []
    for name, (_, nbytes) in kernels.items():
        gbps = nbytes / (ms[name] * 1e6)
        rows.append({
            "kernel": name, "bytes": nbytes, "ms": ms[name], "gbps": gbps,
            "copy_gbps": copy_gbps, "ratio": gbps / copy_gbps, **case,
        })  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every (family, dtype, granularity or bits, size); one row per kernel and case."""
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
    # (dtype, check(x), measure(x, with_torch)) per case; check runs at the smallest size
    cases: list[tuple[torch.dtype, Callable, Callable]] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        value_dtype = dtype if args.value_dtype == "same" else DTYPES[args.value_dtype]
        if "topk" in args.families:
            for gran in args.granularity:
                def check(x, gran=gran):
                    group_size = BLOCK_SIZE if gran == "block" else x[0].numel()
                    _check_exact(tk, x, group_size, keep_count(group_size, args.sparsity), value_dtype)

                def measure(x, with_torch, gran=gran):
                    return measure_case(tk, x, gran, args.sparsity, value_dtype, timer, with_torch)

                cases.append((dtype, check, measure))
        if "quantize" in args.families:
            for bits in args.quant_bits:
                cases.append((dtype, lambda x, bits=bits: _check_quant_exact(x, bits),
                              lambda x, with_torch, bits=bits: measure_quant_case(x, bits, timer, with_torch)))
    rows: list[dict] = []
    for dtype, check, measure in cases:
        for i, size_mb in enumerate(sizes_mb):
            x = make_input(int(size_mb * 2**20), dtype, device)
            if i == 0:  # correctness first, at the smallest size
                check(x)
            for row in measure(x, not args.no_torch and size_mb <= args.torch_max_mb):
                rows.append({**row, **common})
                _print_row(row)
            del x
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "header", False):
        print(
            f"{'kernel':<26} {'dtype':<9} {'gran':<6} {'group':>7} {'MB':>9} {'ms':>9} "
            f"{'GB/s':>8} {'copy':>8} {'ratio':>6}"
        )
        _print_row.header = True
    print(
        f"{r['kernel']:<26} {r['dtype']:<9} {r['granularity']:<6} {r.get('group_size', ''):>7} "
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
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--granularity", nargs="+", choices=["block", "sample"], default=["block", "sample"])
    p.add_argument("--quant-bits", type=int, nargs="+", choices=[2, 3, 4, 8], default=list(QUANT_BITS))
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
