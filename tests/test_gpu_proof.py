"""The GPU proof (``python -m razorpass.bench.gpu``) on the CPU: its smoke mode runs every
section on tiny sizes and writes real rows, so that the first run on a lent GPU does
not die on a mistake of the script; without CUDA and without ``--smoke`` it stops at
once with one line. The batch search and the report parsers are checked alone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch

from razorpass.bench import gpu
from razorpass.bench.gpu import largest_fitting, parse_junit, parse_verbose

CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _gpu(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "razorpass.bench.gpu", *args], env=CPU_ONLY, capture_output=True,
                          text=True, timeout=timeout)


def _rows(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_smoke_writes_every_file_with_real_rows(tmp_path):
    done = _gpu("--smoke", "--out", str(tmp_path), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu.json", "gpu.png", "gpu_codecs.csv", "gpu_maxbatch.csv", "gpu_steps.csv", "gpu_tests.csv", "gpu_tests.xml"]

    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["meta"]["smoke"] is True and doc["meta"]["torch"] and doc["meta"]["commit"]
    assert {n: s["status"] for n, s in doc["sections"].items()} == {"tests": "ok", "codecs": "ok", "models": "ok"}

    tests = _rows(tmp_path / "gpu_tests.csv")  # no CUDA: every test of the tier collected, and skipped
    assert tests and {r["outcome"] for r in tests} == {"skipped"}
    assert any("test_compiled_gradients_equal_the_reference_on_cuda" in r["test"] for r in tests)

    codecs = _rows(tmp_path / "gpu_codecs.csv")
    ops = {r["op"] for r in codecs if r["status"] == "ok" and float(r["gbps"]) > 0}
    assert ops == {"copy", "quantize_group", "quantize_group_centered", "quantize_group_stochastic", "dequantize_group",
                   "quantize_normal", "dequantize_normal", "quantize_uniform",
                   "dequantize_uniform", "compress", "decompress", "compress_offsets", "decompress_offsets",
                   "pack_bits", "unpack_bits"}
    # the generated forms beside the kernels (float32 values, and the masks), equal to them bit for bit
    generated = {(r["op"], r["dtype"]): r["exact"] for r in codecs if r["backend"] == "generated"}
    assert {op for op, _ in generated} == {"quantize_group", "quantize_group_centered", "dequantize_group",
                                          "quantize_uniform", "dequantize_uniform", "pack_bits", "unpack_bits"}
    assert {dtype for _, dtype in generated} == {"float32", "bool"} and set(generated.values()) == {"True"}

    steps = _rows(tmp_path / "gpu_steps.csv")
    assert {(r["model"], r["method"]) for r in steps if r["status"] == "ok"} == {
        (m, k) for m in ("vit-b16", "minilm") for k in ("baseline", "razor", "checkpoint", "checkpoint-eager", "budget0.5")}
    for r in steps:
        assert float(r["peak_step_bytes"]) > 0 and float(r["saved_bytes"]) > 0 and float(r["step_s"]) > 0
        if r["method"] != "baseline":
            assert float(r["step_ratio_paired"]) > 0 and r["step_ratio_paired_se"] != ""

    search = _rows(tmp_path / "gpu_maxbatch.csv")
    assert [r["method"] for r in search] == ["baseline", "razor", "checkpoint", "checkpoint-eager", "budget0.5"]
    assert all(r["status"] == "ok" and int(r["max_batch"]) >= 1 for r in search)


def test_without_cuda_it_stops_with_one_line(tmp_path):
    done = _gpu("--out", str(tmp_path), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr and "--smoke" in done.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("answer", [1, 5, 63, 64, 65, 100, 1000, 4096])
def test_largest_fitting_finds_the_largest_batch(answer):
    best, tries = largest_fitting(lambda n: n <= answer, start=64, limit=4096, max_tries=30, resolution=0)
    assert best == answer
    assert all(ok == (n <= answer) for n, ok in tries)


def test_largest_fitting_is_bounded():
    best, tries = largest_fitting(lambda n: n <= 3000, start=64, limit=8192, max_tries=8, resolution=0)
    assert len(tries) == 8 and best <= 3000 and best >= 2048
    best, tries = largest_fitting(lambda n: True, start=64, limit=100, max_tries=30)
    assert best == 100 and tries[-1] == (100, True)
    best, tries = largest_fitting(lambda n: False, start=8, limit=100, max_tries=30)
    assert best == 0 and [n for n, _ in tries] == [8, 4, 2, 1]


def test_largest_fitting_stops_within_its_resolution():
    best, tries = largest_fitting(lambda n: n <= 1500, start=64, limit=8192, max_tries=30, resolution=1 / 64)
    assert 1500 - 1500 // 64 <= best <= 1500 and len(tries) <= 14


def test_reports_of_pytest_are_read(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_cuda" name="test_a" time="1.5"/>'
                   '<testcase classname="tests.test_cuda" name="test_b[x]" time="0.1"><failure message="boom&#10;more">'
                   'tb</failure></testcase><testcase classname="tests.test_cuda" name="test_c" time="0">'
                   '<skipped message="needs a CUDA device"/></testcase></testsuite></testsuites>')
    assert [(r["test"], r["outcome"], r["message"]) for r in parse_junit(xml)] == [
        ("tests.test_cuda::test_a", "passed", ""), ("tests.test_cuda::test_b[x]", "failed", "boom"),
        ("tests.test_cuda::test_c", "skipped", "needs a CUDA device")]
    text = ("tests/test_cuda.py::test_a PASSED [ 10%]\n"
            "[gw1] [ 20%] FAILED tests/test_cuda.py::test_b[x]\n"
            "collecting ... collected 3 items\n")
    assert [(r["test"], r["outcome"]) for r in parse_verbose(text)] == [
        ("tests/test_cuda.py::test_a", "passed"), ("tests/test_cuda.py::test_b[x]", "failed")]


def test_the_cuda_only_lines_run_with_torch_cuda_stood_in_for(monkeypatch):
    """The lines of the proof that only a GPU runs (event timing, the memory cap, the
    machine's description), with torch.cuda's calls replaced: a mistake in them would
    otherwise first show on the GPU."""
    class Event:
        def __init__(self, enable_timing: bool):
            assert enable_timing

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end) -> float:
            return 2.0

    fractions = []
    props = SimpleNamespace(total_memory=80 * 2**30, multi_processor_count=132, major=9, minor=0)
    for name, value in {"Event": Event, "synchronize": lambda device=None: None, "empty_cache": lambda: None,
                        "get_device_properties": lambda device=None: props, "get_device_name": lambda device=None: "GPU",
                        "set_per_process_memory_fraction": lambda f, device=None: fractions.append(f)}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    cuda = torch.device("cuda")
    assert gpu.median_ms(lambda: None, cuda, target_s=0.01) == 2.0
    with gpu._Cap(16 * 2**30, cuda):
        assert fractions == [0.2]
    assert fractions == [0.2, 1.0]
    meta = gpu._machine(cuda)
    assert (meta["device"], meta["gpu_memory_bytes"], meta["gpu_sms"], meta["gpu_capability"]) == (
        "GPU", 80 * 2**30, 132, "9.0")
    assert gpu._is_oom(torch.OutOfMemoryError("CUDA out of memory")) and not gpu._is_oom(RuntimeError("shape"))
