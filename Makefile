# The README's commands. `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# llama.cpp is a test and bench peer, prebuilt (never compiled here): the wheel pick-llama-wheel names for this CPU, so
# llama.cpp runs its own best kernels, else the portable root wheel; with neither, its tests skip with the reason.
WHEELS := ../shared/wheels
LLAMA_WHEEL := $(shell w=$$($(WHEELS)/pick-llama-wheel 2>/dev/null) && [ -f "$$w" ] && echo "$$w" || \
	ls $(WHEELS)/llama_cpp_python-*.whl 2>/dev/null | head -n 1)
# The three prompts the README shows, the same the training script samples
PROMPTS := "The meaning of life is" "Python is a programming language that" "Once upon a time,"
# `make run` compiles kernels where the installed command does, ~/.cache/mixlocal/numba (mixlocal/paths.py), so a
# user compiles once; the tests and benches keep their own cache in the checkout.
test bench lint: export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: install dev llama-wheel run test bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[dev,mlx]'
	touch $@

# Both builds are llama-cpp-python 0.3.36 under the same file name, so pip counts either as already installed: the
# stamp names the wheel in place, and a different choice (another CPU, a replaced wheel) is force-reinstalled.
LLAMA_ID = $(if $(LLAMA_WHEEL),$(abspath $(LLAMA_WHEEL)) $(shell cksum < $(LLAMA_WHEEL)))
llama-wheel: $(VENV)/.dev-installed
	@if [ -n "$(LLAMA_ID)" ] && [ "$$(cat $(VENV)/.llama-wheel 2>/dev/null)" != "$(LLAMA_ID)" ]; then \
	  echo "installing llama.cpp: $(LLAMA_WHEEL)"; \
	  $(PIP) install -q $(LLAMA_WHEEL) && $(PIP) install -q --no-deps --force-reinstall $(LLAMA_WHEEL) && \
	  echo "$(LLAMA_ID)" > $(VENV)/.llama-wheel; \
	fi

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed llama-wheel

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
	$(PY) bench/bench_decode_overhead.py --rounds 5
	$(PY) bench/bench_mixtral_shape.py --kernels all --types Q4_0,Q8_0,Q4_K,Q4_K_M --rounds 5 --decode 64 --no-startup
	$(PY) bench/bench_mixtral_shape.py --types Q4_0 --rounds 1 --startup-runs 2 --engines mixlocal --out bench/results/startup.json

lint: dev
	$(PY) -m ruff check mixlocal engine quant tokenizer tests bench tools

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache
