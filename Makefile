# The README's commands. `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# llama.cpp (prebuilt for this CPU) is a test and bench peer; absent elsewhere, its tests skip with the reason.
LLAMA_WHEEL := $(firstword $(wildcard ../shared/wheels/llama_cpp_python-*.whl))
PROMPT ?= Once upon a time
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: install dev run test bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[dev,mlx]'
	$(if $(LLAMA_WHEEL),$(PIP) install -q $(LLAMA_WHEEL))
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

run: install
	$(VENV)/bin/mixlocal generate -p "$(PROMPT)" -n 64 --temp 0
	$(VENV)/bin/mixlocal generate -p "$(PROMPT)" -n 64 --seed 1

test: dev
	$(PY) -m pytest -q

bench: dev
	$(PY) bench/bench_core.py
	$(PY) bench/bench_mixtral_shape.py --types Q4_0 --rounds 5 --startup-runs 2

lint: dev
	$(PY) -m ruff check engine quant tokenizer tests bench tools

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache
