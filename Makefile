# The two commands of razorpass: `make demo` (the main benchmark) and `make test`.
# Both create .venv on first use and install everything into it. torch is pinned to
# its CPU build through constraints.txt, so no dependency can pull a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.razorpass-installed
# pytest-xdist workers for `make test`: one per core, at most 4 (each holds its own
# compiled models; more only adds memory on a 2-core CI machine). Work stealing: a worker
# that runs out takes queued tests from the other, so no core idles at the end.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test install clean gpu

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench]"
	# build the native CPU kernels now (C++, a minute or two), not inside the first test
	$(PY) -c "from razorpass.kernels import quantize_cpu, topk_compress_cpu; quantize_cpu.load(); topk_compress_cpu.load()"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m razorpass.bench --out bench/results $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# The GPU proof (bench/README.md, "GPU proof"), on a CUDA machine whose python already
# has torch, Triton, transformers and pytest: no venv, razorpass installed without its
# dependencies and without the network, then every section within the time budget.
# `make gpu GPU_ARGS="--out DIR"` writes there instead of bench/results/gpu.
GPU_PYTHON ?= python3
GPU_ARGS   ?=

gpu:
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	$(GPU_PYTHON) -m razorpass.bench.gpu $(GPU_ARGS)
