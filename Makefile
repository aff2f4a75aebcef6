# Devstral Audio toolchain. A fresh machine needs only `make demo` and `make test`:
# both create the Python 3.11 environment (.venv) and system packages when missing.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST := $(PYTHON) -m pytest
WHEELS := $(wildcard /opt/wheels)
PIP_INSTALL := $(VENV)/bin/pip install -q -c constraints.txt $(if $(WHEELS),--find-links $(WHEELS))
BUILD ?= build
TINY ?= $(BUILD)/tiny
APT_PACKAGES := espeak-ng sox pocketsphinx-testdata

.PHONY: venv system-deps tiny demo test test-slow test-gpu lint clean synth bench-synth

# ---- environment ---------------------------------------------------------------------------------
$(VENV)/.installed: requirements.txt requirements-test.txt constraints.txt
	test -x $(PYTHON) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt -r requirements-test.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PYTHON) -c "import torch, megatron.core, mistral_common; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

venv: $(VENV)/.installed system-deps

# Debian packages used by the data pipeline and audio tests (TTS voice, real LibriVox reference clips).
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# ---- tiny parent models --------------------------------------------------------------------------
tiny: venv
	$(PYTHON) tools/make_tiny_models.py --output $(TINY)

# ---- demo: the whole chain built so far, on the tiny models ----------------------------------------
demo: tiny
	@echo "demo: tiny parent models and tokenizers are in $(TINY) (see $(TINY)/MANIFEST.json)"

# ---- synthetic spoken coding instructions (offline judge + piper TTS on the bundled sample) ------
SYNTH_INPUT ?= examples/data/coding_trajectories.jsonl
synth: venv
	$(PYTHON) tools/synth_audio.py --input $(SYNTH_INPUT) --output $(BUILD)/synth --workers 2

bench-synth: venv
	$(PYTHON) tools/bench_synth.py --input $(SYNTH_INPUT) --workdir $(BUILD)/bench-synth

# ---- tests ---------------------------------------------------------------------------------------
test: venv
	$(PYTEST) -q -m "not slow and not gpu" tests

test-slow: venv
	$(PYTEST) -q -m "slow and not gpu" tests

# On a GPU machine with a CUDA torch and `pip install -r requirements-gpu.txt`.
test-gpu:
	$(PYTEST) -q -m gpu tests

lint: venv
	$(VENV)/bin/ruff check megatron_ext tools tests

clean:
	rm -rf $(BUILD)
