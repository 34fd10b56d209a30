# Two commands do all set-up on a fresh machine:
#   make demo   -> venv + install, then `maml-ds study`: the CPU study (docs/RESULTS.md)
#   make test   -> venv + install, the default test suite (two pytest workers: 2 cores)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.maml-ds-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation deepspeed
	$(PY) -m pip install -q -e '.[dev,plot]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check maml_ds launcher tests bench
