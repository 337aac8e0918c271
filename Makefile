# The README's commands. `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# llama.cpp (prebuilt for this CPU) is a test and bench peer; absent elsewhere, its tests skip with the reason.
LLAMA_WHEEL := $(firstword $(wildcard ../shared/wheels/llama_cpp_python-*.whl))
# The three prompts the README shows, the same the training script samples
PROMPTS := "The meaning of life is" "Python is a programming language that" "Once upon a time,"
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
	@for p in $(PROMPTS); do \
	  echo "== greedy"; $(VENV)/bin/mixlocal generate -p "$$p" -n 40 --temp 0 || exit 1; \
	  echo "== sampled (temperature 0.7, top_p 0.95, min_p 0.05, seed 1)"; \
	  $(VENV)/bin/mixlocal generate -p "$$p" -n 40 --seed 1 || exit 1; \
	done

test: dev
	$(PY) -m pytest -q

bench: dev
	$(PY) bench/bench_core.py
	$(PY) bench/bench_mixtral_shape.py --types Q4_0 --rounds 5 --startup-runs 2

lint: dev
	$(PY) -m ruff check engine quant tokenizer tests bench tools

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache
