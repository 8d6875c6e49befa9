# srppo-trl developer targets. `make demo` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch (it lies on this kind of machine's disk); on a GPU machine: `make install TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,eval,gguf]"
	touch $@

install: $(VENV)/.installed

demo: install  ## SFT -> SRPPO on SmolLM2-135M-Instruct and the shipped demo data, offline, CPU
	HF_HUB_OFFLINE=1 $(PY) recipes/smollm2_demo.py --config recipes/configs/smollm2_demo.yaml

test: install  ## the default test suite (slow tests excluded)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

test-slow: install  ## the slow tests (real SmolLM2, notebook, distributed)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m slow

lint: install
	$(VENV)/bin/ruff check src tests recipes benchmarks scripts
	$(VENV)/bin/ruff format --check src tests recipes benchmarks scripts

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_update.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
