# The two commands of razorpass: `make demo` (the main benchmark) and `make test`.
# Both create .venv on first use and install everything into it. torch is pinned to
# its CPU build through constraints.txt, so no dependency can pull a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.razorpass-installed
# pytest-xdist workers for `make test`: one per core, at most 4 (each holds its own
# compiled models; more only adds memory on a 2-core CI machine).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m razorpass.bench --out bench/results $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
