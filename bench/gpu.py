"""The GPU proof: ``python -m razorpass.bench.gpu`` (``make gpu``), one command on one
CUDA GPU, within a time budget (default 7.5 minutes).

Sections, in this order unless ``--sections`` picks others; each writes its files as
soon as it ends (the models section after every method), and a section that fails is
recorded with its error while the next one runs:

=======  ==========================================================================
tests    the CUDA test tier, ``pytest -m cuda tests/`` in a subprocess with a time
         limit: ``gpu_tests.csv`` (one row per test) and ``gpu_tests.xml`` (JUnit)
codecs   every ``razor::`` codec op on 64 MiB, 256 MiB and 1 GiB activations (fp32,
         bf16): median time (CUDA events), GB/s of the bytes it reads and writes,
         beside ``Tensor.copy_`` of the same input (the memory-bound limit):
         ``gpu_codecs.csv``. Ops that take ``backend=`` are timed with their default
         and with ``backend="torch"`` (the PyTorch kernel); a codec with a generated
         form (``codec_form="generated"``) also in that form, compiled alone by
         Inductor, float32 only (what razorpass generates), with ``exact``: whether it
         equals the kernel's output bit for bit
models   ViT-B/16 (224 px) and a MiniLM-shaped BERT (seq 128), random init, bf16
         autocast, at batches 64 and 128, for plain compile, per-block
         checkpointing compiled and eager (HF's own switch), ``activation_memory_budget=0.5``
         and razorpass's defaults:
         step peak (``torch.cuda.max_memory_allocated``), bytes saved for backward and
         the step time paired with plain compile's (``gpu_steps.csv``); on ViT-B/16
         also the largest batch each method trains under one memory cap
         (``torch.cuda.set_per_process_memory_fraction``, 16 GiB): ``gpu_maxbatch.csv``
=======  ==========================================================================

``gpu.json`` holds the machine (device, torch / Triton / CUDA versions, commit, date),
each section's status, time and error, and every row; ``gpu.png`` plots codec GB/s
against the copy, and peak, step time and largest batch per method. Seven files in
``--out``: a folder that keeps eight holds the log too.

Every method of a model is compiled once, with the batch marked dynamic, and that one
compiled step serves both batches and the batch search. Plain compile stays compiled
(its parameters and optimizer state moved to the CPU while another method searches
under the cap), so every other method's steps are timed in pairs against it
(``measure.paired_ratio``).

Without a CUDA device the command stops with one line and a non-zero exit, unless
``--smoke``: tiny models and sizes on the CPU, compiled steps and generated codec
forms run eagerly (``torch.compiler.set_stance("force_eager")``; the suite compiles
the generated forms in tests/test_generated_codecs.py), the cap emulated on the measured peak,
and the CUDA tests skipping: a check of the script itself, run by ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import gc
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["Codec", "CODECS", "accepts_backend", "codec_outputs", "largest_fitting", "parse_junit", "main"]

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = pathlib.Path("bench/results/gpu")
SMOKE_OUT = pathlib.Path("razorpass-results/gpu-smoke")  # ignored by git: smoke results are never committed
MiB, GiB = 2**20, 2**30

# Share of the time budget each section may use; what one leaves is the next one's.
# ``--sections`` picks some and their order (the shares of the chosen ones scaled to 1).
SHARES = {"tests": 0.22, "codecs": 0.12, "models": 0.66}


# ------------------------------------------------------------------ the codec ops
@dataclasses.dataclass(frozen=True)
class Codec:
    """One ``razor::`` op and how to call it on an activation ``x`` of shape
    (rows, channels), with razorpass's default options; decoders get the codes of
    ``x`` (encoded once, with the default backend)."""

    op: str
    args: Callable[[torch.Tensor], tuple]
    reads_mask: bool = False  # reads ``x > 0`` (a boolean mask), whatever the dtype of x


def _razor(op: str):
    importlib.import_module("razorpass.kernels.ops")  # registers the razor:: ops
    return getattr(torch.ops.razor, op)


def _defaults():
    from razorpass import RazorConfig

    return RazorConfig()


def _quant(x):  # (x, group_size, bits) of the accurate policy's quantized classes
    cfg = _defaults()
    return x, cfg.quant_group_size, cfg.quant_bits


def _centered(x):  # a BatchNorm input: x - mean of each channel (dim 1), in groups of batchnorm_group_size
    cfg = _defaults()
    return x, x.float().mean(0).to(x.dtype), cfg.batchnorm_group_size, cfg.quant_bits


def _gelu_deriv(x):  # the GELU derivative's 3-bit code on its fixed range
    from razorpass.config import GELU_DERIVATIVE_RANGE

    lo, hi = GELU_DERIVATIVE_RANGE["none"]
    return x, _defaults().gelu_derivative_bits, lo, hi


def _topk(x, sparsity: float = 0.9):  # block top-k (the softmax class; Back Razor's rule), bf16 values
    cfg = dataclasses.replace(_defaults(), sparsity=sparsity)
    return x, cfg.block_size, cfg.keep_count(cfg.block_size), torch.bfloat16


def _offsets(x):  # sparsity 0.97, where the offsets layout is the smaller one
    return _topk(x, 0.97)


CODECS: tuple[Codec, ...] = (
    Codec("quantize_group", _quant),
    Codec("quantize_group_centered", _centered),
    Codec("quantize_group_stochastic", lambda x: (x, torch.tensor(20261207, device=x.device), *_quant(x)[1:])),
    Codec("dequantize_group", lambda x: (*_razor("quantize_group")(*_quant(x)), list(x.shape), *_quant(x)[1:], x.dtype)),
    Codec("quantize_normal", lambda x: (x, _quant(x)[1], 2)),
    Codec("dequantize_normal", lambda x: (*_razor("quantize_normal")(x, _quant(x)[1], 2), list(x.shape),
                                          _quant(x)[1], 2, x.dtype)),
    Codec("quantize_uniform", _gelu_deriv),
    Codec("dequantize_uniform", lambda x: (_razor("quantize_uniform")(*_gelu_deriv(x)), list(x.shape),
                                           *_gelu_deriv(x)[1:], x.dtype)),
    Codec("compress", _topk),
    Codec("decompress", lambda x: (*_razor("compress")(*_topk(x)), list(x.shape), _topk(x)[1], x.dtype)),
    Codec("compress_offsets", _offsets),
    Codec("decompress_offsets", lambda x: (*_razor("compress_offsets")(*_offsets(x)), list(x.shape),
                                           _offsets(x)[1], x.dtype)),
    Codec("pack_bits", lambda x: (x > 0,), reads_mask=True),
    Codec("unpack_bits", lambda x: (_razor("pack_bits")(x > 0), list(x.shape)), reads_mask=True),
)


def accepts_backend(op: str) -> bool:
    """Whether ``razor::<op>`` takes a ``backend`` argument (read off its schema)."""
    return any(a.name == "backend" for a in _razor(op).default._schema.arguments)


def codec_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """An op's result as a tuple of tensors."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _nbytes(tensors: Sequence[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------ timing and memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, target_s: float = 0.25, most: int = 50) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call: CUDA events around each
    call on a GPU, the wall clock on the CPU; as many calls as fit ``target_s`` (3 to
    ``most``)."""
    def once() -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    fn()
    _sync(device)
    first = once()
    reps = max(3, min(most, int(target_s * 1e3 / max(first, 1e-3))))
    return statistics.median([first, *(once() for _ in range(reps - 1))])


def _free(device: torch.device, collect: bool = True) -> None:
    """Give the caching allocator's free blocks back to the device (a collection of
    cycles first with ``collect``: a third of a second with torch and transformers
    loaded, so not after every call)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    """A CUDA allocation failure, raised by the caching allocator or by a library
    workspace (cuBLAS) under the memory cap."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "ALLOC_FAILED" in str(e)))


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, max_tries: int,
                    resolution: float = 1 / 64) -> tuple[int, list[tuple[int, bool]]]:
    """(the largest n in [1, limit] with ``fits(n)``, every (n, fits) tried), for a
    ``fits`` that holds up to some n and fails above it: doubling from ``start`` (halving
    if ``start`` fails) until the answer is bracketed, then bisection until the bracket
    is within ``resolution`` of the answer; at most ``max_tries`` calls. 0 if nothing
    fits."""
    tries: list[tuple[int, bool]] = []

    def attempt(n: int) -> bool:
        ok = fits(n)
        tries.append((n, ok))
        return ok

    lo, hi = 0, limit + 1  # lo fits (0: nothing known to), hi does not
    n = max(1, min(start, limit))
    while len(tries) < max_tries and hi - lo > 1:
        if attempt(n):
            lo = n
            if hi > limit:  # still climbing
                n = min(2 * n, limit) if n < limit else n
                if n == lo:
                    break
                continue
        else:
            hi = n
        if lo == 0:  # descending from a start that did not fit
            n = max(1, n // 2)
            if n >= hi:
                break
            continue
        if hi - lo <= max(1, int(lo * resolution)):
            break
        n = (lo + hi) // 2
    return lo, tries


# ------------------------------------------------------------------ a run and its files
class OutOfTime(BaseException):
    """The time budget ran out (raised by SIGALRM). A BaseException, so that no
    ``except Exception`` inside torch takes it for a compile error and carries on."""


@dataclasses.dataclass
class Section:
    name: str
    status: str = "not run"  # ok, failures, error, stopped (time budget), skipped (reason)
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    tables: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # file name -> rows

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[{self.name}] {text}", flush=True)


class Run:
    """The output folder, the time budget and what every section left."""

    FILES = ("gpu_tests.csv", "gpu_codecs.csv", "gpu_steps.csv", "gpu_maxbatch.csv")

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.smoke = args, device, args.smoke
        self.out: pathlib.Path = args.out
        self.started = time.monotonic()
        self.budget_s: float = args.budget_s
        self.sections: dict[str, Section] = {}
        self.meta: dict[str, Any] = {}
        self.order = args.sections.split(",")
        cum, self.ends = 0.0, {}
        for name in self.order:
            cum += SHARES[name] / sum(SHARES[n] for n in self.order)
            self.ends[name] = self.started + cum * self.budget_s

    def left(self, section: str | None = None) -> float:
        """Seconds left to ``section`` (what it and the sections before it may use), or
        to the whole run."""
        end = self.ends[section] if section else self.started + self.budget_s
        return min(end, self.started + self.budget_s) - time.monotonic()

    def write(self, plot: bool = False) -> None:
        """Every table, gpu.json and (``plot``) gpu.png, from what the sections hold now."""
        self.out.mkdir(parents=True, exist_ok=True)
        tables = {f: rows for s in self.sections.values() for f, rows in s.tables.items()}
        for name, rows in tables.items():
            _write_csv(self.out / name, rows)
        doc = {"meta": {**self.meta, "elapsed_s": round(time.monotonic() - self.started, 1)},
               "sections": {n: {k: v for k, v in dataclasses.asdict(s).items() if k != "tables"}
                            for n, s in self.sections.items()},
               "tables": tables}
        (self.out / "gpu.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        if plot:
            try:
                _plot(tables, self.out / "gpu.png", self.meta.get("device", ""))
            except Exception as e:  # noqa: BLE001 - a figure must not sink the numbers
                print(f"gpu.png not written: {type(e).__name__}: {e}", flush=True)

    def section(self, name: str, body: Callable[[Section], None]) -> None:
        """Run ``body`` as section ``name``: its status, time and error recorded whatever
        happens, every file written after it."""
        sec = self.sections[name] = Section(name)
        t0 = time.monotonic()
        print(f"== {name} ({max(0.0, self.left(name)):.0f} s of the budget)", flush=True)
        try:
            if self.left(name) <= 0:
                sec.status = "skipped (no time left in the budget)"
            else:
                body(sec)
                if sec.status == "not run":
                    sec.status = "ok"
        except OutOfTime:
            sec.status = "stopped (time budget)"
        except Exception as e:  # noqa: BLE001 - one failing section must not sink the others
            sec.status = "error"
            sec.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            print(sec.error, flush=True)
        finally:
            sec.seconds = round(time.monotonic() - t0, 1)
            print(f"== {name}: {sec.status} in {sec.seconds:.0f} s", flush=True)
            self.write(plot=True)


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["status"])
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _code_hash() -> str:
    """sha256 of the razorpass sources that shape a compiled graph (the partitioner's
    cache key, without paths): which code ran, where no git checkout travels."""
    from razorpass.partitioner import code_files

    h = hashlib.sha256()
    for f in code_files():
        h.update(pathlib.Path(f).read_bytes())
    return h.hexdigest()[:16]


def _machine(device: torch.device) -> dict[str, Any]:
    """Machine, versions, commit and date; importing every razorpass module a compile
    needs on the way, so that a torch without an API razorpass uses stops the run here."""
    for module in ("razorpass.backend", "razorpass.passes.pipeline", "razorpass.kernels.ops", "razorpass.reference"):
        importlib.import_module(module)
    from .outputs import environment

    meta = environment(device)
    meta["code_hash"] = _code_hash()
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta["cuda"] = torch.version.cuda
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(gpu_memory_bytes=p.total_memory, gpu_sms=p.multi_processor_count,
                    gpu_capability=f"{p.major}.{p.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            meta["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            meta["driver"] = None
    return meta


# ------------------------------------------------------------------ section: tests
_OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_junit(path: pathlib.Path) -> list[dict]:
    """One row per test case of a JUnit XML report: test, outcome, seconds, message."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        rows.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                     "seconds": float(case.get("time") or 0.0), "message": message})
    return rows


def parse_verbose(text: str) -> list[dict]:
    """The outcomes pytest -v printed before it was stopped (no JUnit report then)."""
    rows = {}
    for line in text.splitlines():
        m, node = _OUTCOME.search(line), next((w for w in line.split() if "::" in w), None)
        if m and node:
            rows[node] = {"test": node, "outcome": m.group(1).lower(), "seconds": None, "message": ""}
    return list(rows.values())


def _tests(run: Run, sec: Section) -> None:
    target = REPO / ("tests/test_cuda.py" if run.smoke else "tests")
    if not target.exists():
        sec.status = f"skipped ({target.relative_to(REPO)} not found: run from a razorpass checkout)"
        return
    xml = run.out / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    # a module that cannot be collected (a package this machine lacks) must not stop the tier
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", str(run.args.test_timeout_s)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if run.args.test_workers > 1 and importlib.util.find_spec("xdist"):
        cmd += ["-n", str(run.args.test_workers)]
        # each worker's Inductor starts a pool of compile processes: share the cores
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // run.args.test_workers)))
    cmd.append(str(target.relative_to(REPO)))
    limit = max(10.0, min(run.left("tests"), run.left()))
    sec.note(f"{' '.join(cmd[1:])} (limit {limit:.0f} s)")
    if run.device.type == "cuda":  # the tests' conftest interprets Triton where it sees no /dev/nvidia0
        env["TRITON_INTERPRET"] = "0"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    output, stopped = "", None
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stopped = f"stopped (after {limit:.0f} s)"
    except OutOfTime:
        stopped = "stopped (time budget)"
    finally:
        if proc.poll() is None:  # out of time: end pytest and its workers, keep what they printed
            os.killpg(proc.pid, signal.SIGKILL)
            output = (output or "") + proc.communicate()[0]
    print("\n".join(output.splitlines()[-15:]), flush=True)
    rows = parse_junit(xml) if xml.exists() else parse_verbose(output)
    sec.tables["gpu_tests.csv"] = rows
    counts = {o: sum(r["outcome"] == o for r in rows) for o in dict.fromkeys(r["outcome"] for r in rows)}
    sec.note(f"pytest exit {proc.returncode}: " + (", ".join(f"{n} {o}" for o, n in counts.items()) or "no test ran"))
    if stopped:
        sec.status = f"{stopped}; {len(rows)} tests reported"
    elif proc.returncode not in (0, 5):  # 5: nothing collected
        sec.status = "failures"


# ------------------------------------------------------------------ section: codecs
SIZES_MIB = (64, 256, 1024)
SMOKE_SIZES_MIB = (1 / 16,)
CHANNELS = 768  # activations as (rows, 768): a ViT-B / BERT-base hidden state
TORCH_MAX_MIB = 256  # the PyTorch kernels are timed up to this size (slow beyond, and not the point)


def _activation(size_mib: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rows = max(1, round(size_mib * MiB / (CHANNELS * torch.empty((), dtype=dtype).element_size())))
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn((rows, CHANNELS), generator=g, device=device).to(dtype)


def _codecs(run: Run, sec: Section) -> None:
    rows = sec.tables.setdefault("gpu_codecs.csv", [])
    with_backend = {c.op: accepts_backend(c.op) for c in CODECS}
    sec.note("ops with backend=: " + (", ".join(op for op, b in with_backend.items() if b) or "none"))
    for size, dtype in itertools.product(SMOKE_SIZES_MIB if run.smoke else SIZES_MIB, (torch.float32, torch.bfloat16)):
        if run.left("codecs") <= 0:
            sec.note(f"out of the section's time before {size:g} MiB {dtype}")
            sec.status = "stopped (time budget)"
            break
        with _stance(run.smoke):  # smoke: the generated forms run as their plain ops, uncompiled
            new = _codecs_at(size, dtype, with_backend, run.device, 0.01 if run.smoke else 0.25)
        _free(run.device)
        rows += new
        sec.note(f"{size:g} MiB {new[0]['dtype']}: copy {new[0]['gbps']:.0f} GB/s; " + ", ".join(
            f"{r['op']}{'' if r['backend'] == 'default' else '/' + r['backend']} "
            + (f"{r['pct_of_copy']:.0f}%" if r["status"] == "ok" else "error") for r in new[1:]))
        run.write()


def _copy_ms(x: torch.Tensor, device: torch.device, target_s: float) -> float:
    """Median ms of ``Tensor.copy_`` of ``x`` into a tensor like it: the memory-bound
    limit of any op that reads and writes that many bytes."""
    dst = torch.empty_like(x)
    return median_ms(lambda: dst.copy_(x), device, target_s)


def _codecs_at(size: float, dtype: torch.dtype, with_backend: dict[str, bool], device: torch.device,
               target_s: float) -> list[dict]:
    """The rows of one activation size and dtype: the copy first, then every op, each
    timed for about ``target_s``."""
    x = _activation(size, dtype, device)
    copy_ms = _copy_ms(x, device, target_s)
    copy_gbps = 2 * _nbytes([x]) / (copy_ms * 1e6)
    case = {"dtype": str(dtype).removeprefix("torch."), "size_mib": size, "numel": x.numel()}
    rows = [{"op": "copy", "backend": "", **case, "io_bytes": 2 * _nbytes([x]), "ms": copy_ms, "gbps": copy_gbps,
             "copy_gbps": copy_gbps, "pct_of_copy": 100.0, "status": "ok"}]
    for codec in CODECS:
        if codec.reads_mask and dtype != torch.float32:
            continue  # a boolean mask has no dtype: once per size
        for backend in [None] + (["torch"] if with_backend[codec.op] and size <= TORCH_MAX_MIB else []):
            rows.append({"op": codec.op, "backend": backend or "default",
                         **{**case, "dtype": "bool" if codec.reads_mask else case["dtype"]},
                         **_time_codec(codec, x, backend, copy_gbps, device, target_s)})
        if generated_form(codec.op) is not None and dtype == torch.float32:  # razorpass generates float32 only
            rows.append({"op": codec.op, "backend": "generated",
                         **{**case, "dtype": "bool" if codec.reads_mask else case["dtype"]},
                         **_time_generated(codec, x, copy_gbps, device, target_s)})
    return rows


def generated_form(op: str) -> Callable | None:
    """The plain-op form of ``razor::<op>`` that ``codec_form="generated"`` gives Inductor
    (the codec registry's ``inline_encode`` / ``inline_decode``; a test holds this table
    to it), or None: top-k has none."""
    from razorpass.kernels import fused_quantize as fq
    from razorpass.kernels import ops

    return {"quantize_group": fq.fused_quantize_group, "quantize_group_centered": fq.fused_quantize_group_centered,
            "dequantize_group": fq.fused_dequantize_group, "quantize_uniform": fq.fused_quantize_uniform,
            "dequantize_uniform": fq.fused_dequantize_uniform, "pack_bits": ops.fused_pack_bits,
            "unpack_bits": ops.fused_unpack_bits}.get(op)


_COMPILED: dict[str, Callable] = {}


def _time_generated(codec: Codec, x: torch.Tensor, copy_gbps: float, device: torch.device, target_s: float) -> dict:
    """The generated form alone, compiled by Inductor (one compile per op, the sizes
    marked dynamic), timed like the op and compared with the op's default kernel bit
    for bit: ``exact`` says whether the generated form is the kernel's rule on this
    device (on CPU it is, by test; the default per device follows from this column)."""
    try:
        args = codec.args(x)
        fn = _COMPILED.setdefault(codec.op, torch.compile(generated_form(codec.op), dynamic=True))
        got, want = codec_outputs(fn(*args)), codec_outputs(_razor(codec.op)(*args))
        exact = len(got) == len(want) and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))
            for a, b in zip(got, want))
        io = _nbytes(args) + _nbytes(got)
        del got, want
        ms = median_ms(lambda: fn(*args), device, target_s)
        gbps = io / (ms * 1e6)
        return {"io_bytes": io, "ms": ms, "gbps": gbps, "copy_gbps": copy_gbps,
                "pct_of_copy": 100 * gbps / copy_gbps, "status": "ok", "exact": exact}
    except Exception as e:  # noqa: BLE001 - one form failing must not hide the others
        return {"status": f"error: {_reason(e)}"}
    finally:
        _free(device, collect=False)


def _time_codec(codec: Codec, x: torch.Tensor, backend: str | None, copy_gbps: float, device: torch.device,
                target_s: float) -> dict:
    op = _razor(codec.op)
    try:
        args = codec.args(x)
        kwargs = {} if backend is None else {"backend": backend}
        out = codec_outputs(op(*args, **kwargs))
        io = _nbytes(args) + _nbytes(out)
        del out
        ms = median_ms(lambda: op(*args, **kwargs), device, target_s)
        gbps = io / (ms * 1e6)
        return {"io_bytes": io, "ms": ms, "gbps": gbps, "copy_gbps": copy_gbps,
                "pct_of_copy": 100 * gbps / copy_gbps, "status": "ok"}
    except Exception as e:  # noqa: BLE001 - one op failing must not hide the others
        return {"status": f"error: {_reason(e)}"}
    finally:
        _free(device, collect=False)


# ------------------------------------------------------------------ section: models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    build: Callable[[bool], nn.Module]  # smoke -> the model (CPU, random init)
    batch: Callable[[int, torch.device, bool], tuple[tuple[torch.Tensor, ...], torch.Tensor]]
    batches: tuple[int, ...]
    search_batch: bool  # find the largest batch under the memory cap
    autocast: torch.dtype | None = torch.bfloat16


METHOD_NAMES = ("baseline", "razor", "checkpoint", "checkpoint-eager", "budget0.5")  # plain compile first: the others pair with it
IMAGE, SEQ, VOCAB = 224, 128, 30522


def _vit(smoke: bool) -> nn.Module:
    from .workloads import _vit as vit

    return vit(32 if smoke else IMAGE, 10, smoke)


def _image_batch(n: int, device: torch.device, smoke: bool):
    size = 32 if smoke else IMAGE
    return (torch.randn(n, 3, size, size, device=device),), torch.randint(0, 10, (n,), device=device)


def _minilm(smoke: bool) -> nn.Module:
    from transformers import BertConfig, BertModel

    from .workloads import TextClassifier

    sizes = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                  max_position_embeddings=32) if smoke else
             dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                  vocab_size=VOCAB, max_position_embeddings=512))
    cfg = BertConfig(**sizes)
    return TextClassifier(BertModel(cfg, add_pooling_layer=False), cfg.hidden_size, 3)


def _text_batch(n: int, device: torch.device, smoke: bool):
    seq, vocab = (16, 64) if smoke else (SEQ, VOCAB)
    ids = torch.randint(0, vocab, (n, seq), device=device)
    lengths = torch.randint(seq // 2, seq + 1, (n, 1), device=device)  # padded to seq, as a tokenizer does
    mask = (torch.arange(seq, device=device) < lengths).long()
    return (ids, mask), torch.randint(0, 3, (n,), device=device)


MODELS = (
    ModelSpec("vit-b16", f"ViT-B/16 at {IMAGE} px, random init, bf16 autocast", _vit, _image_batch, (64, 128), True),
    ModelSpec("minilm", f"MiniLM-shaped BERT (6 x 384, seq {SEQ}), random init, bf16 autocast, masked mean pooling",
              _minilm, _text_batch, (64, 128), False),
)
SMOKE_BATCHES = (2,)


@dataclasses.dataclass
class _Trainee:
    """One method's compiled training step on its own copy of the model."""

    method: Any  # methods.Method
    model: nn.Module
    step: Any  # measure.StepRunner

    def park(self, device: torch.device) -> None:
        """Move parameters, buffers and optimizer state to ``device`` (the CPU while
        another method searches under the cap; back before its next step)."""
        self.step.optimizer.zero_grad(set_to_none=True)
        for t in itertools.chain(self.model.parameters(), self.model.buffers()):
            t.data = t.data.to(device)
        for state in self.step.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device)


def _batch(spec: ModelSpec, n: int, device: torch.device, smoke: bool):
    inputs, labels = spec.batch(n, device, smoke)
    for t in inputs:  # one compiled graph for every batch size
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return inputs, labels


def _prepare(spec: ModelSpec, name: str, model: nn.Module, device: torch.device) -> _Trainee:
    from . import measure
    from .methods import METHODS, prepare

    method = dataclasses.replace(METHODS[name], autocast=spec.autocast)
    model = copy.deepcopy(model).to(device).train()
    prepared = prepare(method, model, lr=1e-4, head_lr=1e-4, bsr_options={}, device_type=device.type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=prepared.lr, fused=True)  # as the harness: no temporaries
    scheduler = measure.linear_warmup_decay(optimizer, 10_000, 0.0)
    return _Trainee(method, model, measure.StepRunner(prepared, optimizer, scheduler, device))


def _first_step(trainee: _Trainee, batch, smoke: bool) -> tuple[float, dict]:
    """Seconds of the step that compiles, and (razorpass methods) what its records say.
    A step that compiles nothing ran graphs compiled for another method of this process
    (or eagerly, past Dynamo's recompile limit): refused, as the harness refuses it."""
    from . import measure, runner

    graphs = runner._graphs_compiled()
    if not trainee.method.uses_razor:
        seconds = measure.timed(lambda: trainee.step(batch), trainee.step.device)[1]
        records = []
    else:
        import razorpass

        with razorpass.record_compiles() as records:
            seconds = measure.timed(lambda: trainee.step(batch), trainee.step.device)[1]
    if not smoke:  # smoke steps run eagerly: nothing compiles
        runner._check_compiled(trainee.method, runner._graphs_compiled() - graphs)
    if not trainee.method.uses_razor:
        return seconds, {}
    return seconds, {"razor_graphs": len(records),
                     "razor_fallbacks": "; ".join(r.fallback for r in records if r.fallback) or None,
                     "razor_encoded": sum(len(r.encoded) for r in records),
                     "razor_classes": " ".join(sorted({c for r in records for e in r.encoded for c in e.op_classes}))}


def _measure(run: Run, spec: ModelSpec, trainee: _Trainee, n: int, base: _Trainee | None,
             compile_s: dict[str, float]) -> dict:
    """One row of gpu_steps.csv: ``trainee`` at batch ``n``."""
    from . import measure, runner

    device, step = run.device, trainee.step
    batch = _batch(spec, n, device, run.smoke)
    row: dict[str, Any] = {}
    first = None
    if trainee.method.name not in compile_s:
        first, row = _first_step(trainee, batch, run.smoke)
    step(batch)
    with measure.PeakMemory(device) as peak:
        step(batch, after_backward=peak.mark)
    inputs, labels = batch
    saved = measure.saved_bytes(lambda: step.forward(inputs, labels),
                                [*trainee.model.parameters(), *trainee.model.buffers(), *inputs])
    times = [measure.timed(lambda: step(batch), device)[1] for _ in range(2 if run.smoke else 5)]
    step_s = statistics.median(times)
    if first is not None:
        compile_s[trainee.method.name] = first - step_s
    paired = None
    if base is not None and base is not trainee:
        pairs = runner._paired_rounds(runner._Live(step, batch), runner._Live(base.step, batch),
                                      2 if run.smoke else 6)
        paired = measure.paired_ratio(pairs)
    return {"model": spec.name, "batch": n, "method": trainee.method.name, "status": "ok",
            "peak_step_bytes": peak.peak, "peak_fwd_bwd_bytes": peak.peak_at_mark, "saved_bytes": saved,
            "saved_bytes_per_sample": saved / n, "step_s": step_s,
            "step_ratio_paired": paired[0] if paired else (1.0 if base is trainee else None),
            "step_ratio_paired_se": paired[1] if paired else None,
            "compile_s": compile_s.get(trainee.method.name), **row}


@dataclasses.dataclass
class _Cap:
    """The memory cap of the batch search: on CUDA set as the process's memory
    fraction; on the CPU (smoke) compared with the measured step peak."""

    nbytes: int
    device: torch.device

    def __enter__(self) -> "_Cap":
        if self.device.type == "cuda":
            _free(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.nbytes / total), self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            _free(self.device)


def _fits(run: Run, spec: ModelSpec, trainee: _Trainee, n: int, cap: _Cap, peaks: dict[int, int]) -> bool:
    """Whether a training step at batch ``n`` runs under the cap."""
    from . import measure

    device = run.device
    trainee.step.optimizer.zero_grad(set_to_none=True)
    fits = False
    try:
        batch = _batch(spec, n, device, run.smoke)
        with measure.PeakMemory(device) as peak:
            trainee.step(batch)
        _sync(device)
        total = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak.peak
        peaks[n] = total
        fits = device.type == "cuda" or total <= cap.nbytes
    except Exception as e:  # noqa: BLE001 - only an allocation failure means "does not fit"
        if not _is_oom(e):
            raise
    finally:
        batch = None
        trainee.step.optimizer.zero_grad(set_to_none=True)
        _free(device, collect=not fits)  # what a failed step left behind may sit in cycles
    return fits


def _search(run: Run, spec: ModelSpec, trainee: _Trainee, start: int, others: list[_Trainee]) -> dict:
    """One row of gpu_maxbatch.csv: the largest batch ``trainee`` trains under the cap,
    from ``start`` on, with every other live model parked on the CPU."""
    device, cap_bytes = run.device, int(run.args.cap_gib * GiB)
    limit = 16 if run.smoke else 8192
    for other in others:
        other.park(torch.device("cpu"))
    peaks: dict[int, int] = {}
    try:
        with _Cap(cap_bytes, device) as cap:
            best, tries = largest_fitting(lambda n: _fits(run, spec, trainee, n, cap, peaks), start, limit,
                                          max_tries=run.args.search_tries)
    finally:
        for other in others:
            other.park(device)
    return {"model": spec.name, "method": trainee.method.name, "status": "ok", "cap_bytes": cap_bytes,
            "max_batch": best, "at_limit": best == limit, "peak_bytes_at_max": peaks.get(best),
            "tries": " ".join(f"{n}:{'ok' if ok else 'oom'}" for n, ok in tries)}


def _models(run: Run, sec: Section) -> None:
    steps = sec.tables.setdefault("gpu_steps.csv", [])
    searches = sec.tables.setdefault("gpu_maxbatch.csv", [])
    specs = [m for m in MODELS if m.name in run.args.models.split(",")]
    # Every method's graphs stay on the models' code objects while plain compile lives:
    # each method gets Dynamo's limits of one model (as the harness's runner does).
    dynamo = torch._dynamo.config
    limits = dict(recompile_limit=dynamo.recompile_limit * len(METHOD_NAMES),
                  accumulated_recompile_limit=dynamo.accumulated_recompile_limit * len(METHOD_NAMES))
    with _stance(run.smoke), dynamo.patch(**limits), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dynamo_pgo force disabled.*")
        if run.smoke:  # compiled steps run eagerly: razorpass says so once per model
            warnings.filterwarnings("ignore", category=RuntimeWarning, message="razorpass:.*")
        for i, spec in enumerate(specs):
            # of what is left of the section, ViT-B/16 (first) may start methods in the
            # first 70%, the last model in all of it
            left = run.ends["models"] - time.monotonic()
            _run_model(run, sec, spec, steps, searches, time.monotonic() + left * (0.7 if i < len(specs) - 1 else 1.0))


def _stance(smoke: bool):
    """``torch.compiler.set_stance("force_eager")`` in smoke mode: every compiled step
    runs its original module (the script's logic is checked, not the compiler)."""
    return torch.compiler.set_stance("force_eager") if smoke else contextlib.nullcontext()


def _run_model(run: Run, sec: Section, spec: ModelSpec, steps: list[dict], searches: list[dict], end: float) -> None:
    """Every method on ``spec``: its rows of gpu_steps.csv (and gpu_maxbatch.csv), written
    after each method. Plain compile runs first and stays compiled for the paired steps."""
    device = run.device
    batches = SMOKE_BATCHES if run.smoke else spec.batches
    torch.manual_seed(0)
    model = spec.build(run.smoke).train()
    sec.note(f"{spec.name}: {'a tiny stand-in for ' if run.smoke else ''}{spec.summary}, "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    base: _Trainee | None = None
    compile_s: dict[str, float] = {}
    for name in METHOD_NAMES:
        if time.monotonic() >= end or run.left("models") <= 0:
            steps.append({"model": spec.name, "method": name, "status": "skipped (time budget)"})
            if sec.status == "not run":
                sec.status = "stopped (time budget)"
            continue
        t0, trainee = time.monotonic(), None
        try:
            trainee = _prepare(spec, name, model, device)
            for n in batches:
                steps.append(_measure(run, spec, trainee, n, base if name != "baseline" else trainee, compile_s))
                _note_step(sec, steps[-1])
                run.write()
            if name == "baseline":
                base = trainee
            if spec.search_batch:
                try:
                    searches.append(_search(run, spec, trainee, batches[0], [base] if base not in (None, trainee) else []))
                except Exception as e:  # noqa: BLE001 - the step rows stand without the search
                    searches.append({"model": spec.name, "method": name, "status": f"error: {_reason(e)}",
                                     "error": traceback.format_exc()[-4000:]})
                r = searches[-1]
                sec.note(f"{spec.name} {name}: largest batch under {run.args.cap_gib:g} GiB: {r.get('max_batch')} "
                         f"({r.get('tries', r['status'])})")
                run.write()
        except OutOfTime:
            steps.append({"model": spec.name, "method": name, "status": "stopped (time budget)"})
            raise
        except Exception as e:  # noqa: BLE001 - one failing method must not sink the others
            steps.append({"model": spec.name, "method": name, "status": f"error: {_reason(e)}",
                          "error": traceback.format_exc()[-4000:]})
            sec.note(f"{spec.name} {name}: {_reason(e)}")
            sec.status = "errors"
            run.write()
        finally:
            print(f"[models] {spec.name} {name}: {time.monotonic() - t0:.0f} s", flush=True)
            trainee = None
            _free(device)
    base = None
    _free(device)


def _note_step(sec: Section, r: dict) -> None:
    paired = r["step_ratio_paired_se"]
    sec.note(f"{r['model']} {r['method']} batch {r['batch']}: peak {r['peak_step_bytes'] / MiB:.0f} MiB, saved "
             f"{r['saved_bytes'] / MiB:.0f} MiB, step {r['step_s'] * 1e3:.1f} ms"
             + (f", paired {r['step_ratio_paired']:.2f} ± {paired:.2f} of plain" if paired is not None else "")
             + (f" [fallbacks: {r['razor_fallbacks']}]" if r.get("razor_fallbacks") else ""))


# ------------------------------------------------------------------ the figure
def _plot(tables: dict[str, list[dict]], path: pathlib.Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    codecs = [r for r in tables.get("gpu_codecs.csv", []) if r.get("status") == "ok"]
    ax = axes[0][0]
    if codecs:
        size = max(r["size_mib"] for r in codecs)
        sel = [r for r in codecs if r["size_mib"] == size and r["dtype"] in ("float32", "bool") and r["op"] != "copy"]
        copy_gbps = next(r["gbps"] for r in codecs if r["op"] == "copy" and r["size_mib"] == size
                         and r["dtype"] == "float32")
        labels = [r["op"] + ("" if r["backend"] == "default" else f" ({r['backend']})") for r in sel]
        ax.barh(labels, [r["gbps"] for r in sel], color=["C0" if r["backend"] == "default" else "C7" for r in sel])
        ax.axvline(copy_gbps, color="C3", linestyle="--", label=f"Tensor.copy_: {copy_gbps:.0f} GB/s")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        ax.set_title(f"codec ops on {size:g} MiB fp32 activations", fontsize=10)
        ax.set_xlabel("GB/s (bytes read + written)")
    _empty(ax, codecs, "codec ops")
    steps = [r for r in tables.get("gpu_steps.csv", []) if r.get("status") == "ok"]
    groups = list(dict.fromkeys((r["model"], r["batch"]) for r in steps))
    methods = list(dict.fromkeys(r["method"] for r in steps))
    for ax, key, scale, label in ((axes[0][1], "peak_step_bytes", GiB, "step peak (GiB)"),
                                  (axes[1][0], "step_ratio_paired", 1, "step time (x plain compile, paired ± SE)")):
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            by = {(r["model"], r["batch"]): r for r in steps if r["method"] == m}
            xs = [i + j * width for i, g in enumerate(groups) if g in by and by[g].get(key) is not None]
            ys = [by[g][key] / scale for g in groups if g in by and by[g].get(key) is not None]
            err = [by[g].get(key + "_se") or 0 for g in groups if g in by and by[g].get(key) is not None]
            ax.bar(xs, ys, width, yerr=err if key == "step_ratio_paired" else None, label=m, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{m}\nbatch {b}" for m, b in groups],
                      fontsize=8)
        ax.set_ylabel(label)
        if methods:
            ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        _empty(ax, steps, label)
    searches = [r for r in tables.get("gpu_maxbatch.csv", []) if r.get("status") == "ok"]
    ax = axes[1][1]
    if searches:
        ax.bar([r["method"] for r in searches], [r["max_batch"] for r in searches], color="C2")
        ax.set_title(f"largest {searches[0]['model']} batch under {searches[0]['cap_bytes'] / GiB:g} GiB", fontsize=10)
        ax.set_ylabel("batch")
    _empty(ax, searches, "largest batch under the cap")
    fig.suptitle(f"razorpass GPU proof: {device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _empty(ax, rows: list, what: str) -> None:
    if not rows:
        ax.text(0.5, 0.5, f"{what}: no data", ha="center", va="center", transform=ax.transAxes)


# ------------------------------------------------------------------ entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m razorpass.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (or GPU): checks the script in seconds")
    p.add_argument("--out", type=pathlib.Path, help=f"output folder (default {DEFAULT_OUT}; --smoke: {SMOKE_OUT})")
    p.add_argument("--budget-s", type=float, default=450.0, help="time budget of the whole run, seconds (default 450)")
    p.add_argument("--sections", default=",".join(SHARES),
                   help=f"the sections to run, in this order (default {','.join(SHARES)})")
    p.add_argument("--models", default=",".join(m.name for m in MODELS),
                   help="comma-separated models of the models section (default: all of them)")
    p.add_argument("--cap-gib", type=float, help="memory cap of the batch search (default 16; --smoke 0.0012)")
    p.add_argument("--search-tries", type=int, default=14, help="training steps the batch search may try per method")
    p.add_argument("--test-workers", type=int, help="pytest-xdist workers of the tests section (default 4; --smoke 1)")
    p.add_argument("--test-timeout-s", type=int, default=240, help="pytest-timeout limit per test (default 240)")
    return p


def _alarm(signum, frame) -> None:
    raise OutOfTime()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    chosen = args.sections.split(",")
    if set(chosen) - set(SHARES) or len(set(chosen)) != len(chosen):
        _parser().error(f"--sections takes each of {','.join(SHARES)} at most once, got {args.sections}")
    if not args.smoke and not torch.cuda.is_available():
        print("razorpass.bench.gpu: no CUDA device (torch.cuda.is_available() is False); "
              "--smoke runs the tiny CPU check instead", file=sys.stderr)
        return 2
    args.out = args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)
    args.cap_gib = args.cap_gib if args.cap_gib is not None else (0.0012 if args.smoke else 16.0)
    args.test_workers = args.test_workers if args.test_workers is not None else (1 if args.smoke else 4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke and device.type == "cpu":
        # the native CPU kernels build on first use (minutes), and tiny ops on threads that
        # wait for each other crawl on a busy machine: neither is what a smoke checks
        os.environ.setdefault("RAZORPASS_CPU_KERNEL", "torch")
        torch.set_num_threads(1)
    run = Run(args, device)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s)
    try:
        try:
            run.meta = {**_machine(device), "argv": list(sys.argv[1:] if argv is None else argv), "smoke": args.smoke,
                        "budget_s": args.budget_s, "cap_bytes": int(args.cap_gib * GiB), "out": str(args.out)}
        except ImportError as e:  # razorpass does not import on this torch (or a module is missing): stop here
            run.meta = {"torch": torch.__version__, "error": f"{type(e).__name__}: {e}"}
            run.write()
            print(f"razorpass.bench.gpu: razorpass does not import on torch {torch.__version__}: {e}", file=sys.stderr)
            return 3
        print(f"razorpass GPU proof on {run.meta['device']}: torch {torch.__version__}, Triton {run.meta['triton']}, "
              f"CUDA {run.meta['cuda']}, commit {run.meta['commit'][:12]}, code {run.meta['code_hash']}; "
              f"budget {args.budget_s:.0f} s -> {args.out}", flush=True)
        bodies = {"tests": _tests, "codecs": _codecs, "models": _models}
        for name in run.order:
            run.section(name, lambda sec, b=bodies[name]: b(run, sec))
    except OutOfTime:
        print("time budget spent", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    run.write(plot=True)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out} in "
          f"{time.monotonic() - run.started:.0f} s", flush=True)
    summary = {n: s.status for n, s in run.sections.items()}
    print("sections: " + ", ".join(f"{n} {s}" for n, s in summary.items()), flush=True)
    code = 0 if all(s == "ok" for s in summary.values()) else 1
    if any(s.startswith("stopped") for s in summary.values()):
        # stopped inside a compile, maybe: Inductor's compile workers may still be busy, and
        # the interpreter's exit would wait for them; every file is written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
