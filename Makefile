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
MINIATURE ?= $(BUILD)/miniature/parents
APT_PACKAGES := espeak-ng sox pocketsphinx-testdata

.PHONY: venv system-deps tiny miniature demo demo-tiny demo-miniature miniature-recipe demo-convert convert merge-lora bench bench-convert bench-loader demo-merge merge merge-grid bench-merge logits test test-slow test-gpu lint format clean vllm-env synth bench-synth eval eval-data eval-model eval-sft eval-grid report demo-eval sft sft-dry-run demo-synth gpu-check

# ---- environment ---------------------------------------------------------------------------------
# The pinned requirements first, then this project editable (--no-deps: torch stays the pinned CPU wheel):
# that installs the megatron-ext-* console scripts and lets tools/*.py import megatron_ext without path edits.
$(VENV)/.installed: requirements.txt requirements-test.txt constraints.txt pyproject.toml
	test -x $(PYTHON) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt -r requirements-test.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP_INSTALL) --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(PYTHON) -c "import torch, megatron.core, mistral_common; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	cd / && $(abspath $(PYTHON)) -c "import megatron_ext.cli; print('megatron_ext installed from', megatron_ext.cli.__file__)"
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

# ---- miniature: trained tiny parents (Voxtral-mini, Devstral-mini) from scratch on CPU, cached by code/config hash ----
miniature: venv
	$(PYTHON) tools/make_miniature.py --output $(MINIATURE)

# ---- demo-miniature: the miniature Devstral Audio that learns (the last stage of make demo). `make miniature`
# trains the tiny parents (cached under $(BUILD)/miniature by code and data hashes); the recipe (examples/miniature/recipe.yaml) aligns, merges, voices, fine-tunes, evaluates and
# writes the report, each stage cached under $(MINIATURE_OUT) by its settings and inputs.
MINIATURE_RECIPE ?= examples/miniature/recipe.yaml
MINIATURE_PARENTS ?= $(MINIATURE)
MINIATURE_OUT ?= $(BUILD)/miniature/recipe
MINIATURE_ARGS ?=
demo-miniature: venv
	$(MAKE) miniature
	$(MAKE) miniature-recipe
	@echo "demo-miniature done: parents $(MINIATURE_PARENTS) | merges $(MINIATURE_OUT)/merge-grid |" \
	  "spoken SFT data $(MINIATURE_OUT)/sft-data | SFT runs $(MINIATURE_OUT)/sft-* | eval $(MINIATURE_OUT)/eval |" \
	  "report $(MINIATURE_OUT)/report/REPORT.md"

miniature-recipe: venv
	$(PYTHON) tools/miniature_recipe.py --recipe $(MINIATURE_RECIPE) --devstral $(MINIATURE_PARENTS)/devstral-mini-hf \
	  --voxtral $(MINIATURE_PARENTS)/voxtral-mini-hf --output $(MINIATURE_OUT) $(MINIATURE_ARGS)

# ---- demo: the whole chain, ending in the miniature Devstral Audio that learns ------------------------
# The published-layout stand-ins (make tiny) through conversion and the Megatron-vs-HF logits check, then the
# miniature: trained parents (cached by code and data hashes) and the recipe on them, report included.
demo: tiny
	@echo "demo: tiny parent models and tokenizers are in $(TINY) (see $(TINY)/MANIFEST.json)"
	$(MAKE) demo-convert
	$(MAKE) logits
	$(MAKE) demo-miniature
	@echo "demo done: stand-ins $(TINY) | torch_dist $(BUILD)/demo/{voxtral,devstral}-torch_dist | logits $(LOGITS_DIR) |" \
	  "miniature parents $(MINIATURE_PARENTS) | recipe $(MINIATURE_OUT) | report $(MINIATURE_OUT)/report/REPORT.md"

# The earlier demo chain on the random tiny stand-ins: every stage on the published layouts (merge on HF and
# torch_dist inputs, synth, SFT at TP=2, eval); its tables read zero (random weights).
demo-tiny: tiny
	$(MAKE) demo-convert
	$(MAKE) demo-merge
	$(MAKE) demo-synth
	$(MAKE) sft SFT_ARGS="data.sources.1.path=$(BUILD)/demo/synth/wds data.sources.1.format=energon"
	$(MAKE) logits
	$(MAKE) demo-eval
	@echo "demo-tiny done: parents $(TINY) | torch_dist $(BUILD)/demo/{voxtral,devstral}-torch_dist |" \
	  "tokenizer map $(BUILD)/demo/tokenizer | merge $(BUILD)/demo/merge-linear-0.1 | spoken data $(BUILD)/demo/synth |" \
	  "SFT checkpoints $(BUILD)/demo/sft (TensorBoard: $(BUILD)/demo/sft/tensorboard) | logits $(LOGITS_DIR) |" \
	  "eval $(BUILD)/demo/eval/results | report $(BUILD)/demo/report/REPORT.md"

# ---- sft: supervised fine-tuning on Megatron-Core; see tools/train.py --help and examples/configs/ ----
# The tiny CPU recipe with 2 processes at TP=2 on the demo merge (linear, alpha 0.1) converted to torch_dist,
# with a small text + real-speech chat set; checkpoints and TensorBoard logs go to build/demo/sft.
SFT_CONFIG ?= examples/configs/tiny_cpu.yaml
SFT_NPROC ?= 2
SFT_ARGS ?=
sft: tiny
	test -f $(BUILD)/demo/merge-linear-0.1/config.json || $(MAKE) demo-merge
	rm -rf $(BUILD)/demo/merged-torch_dist $(BUILD)/demo/sft
	$(PYTHON) tools/convert.py --input $(BUILD)/demo/merge-linear-0.1 --output $(BUILD)/demo/merged-torch_dist --to megatron --tp 2 --no-progress
	$(PYTHON) tools/make_tiny_chats.py --output $(BUILD)/demo/sft-data
	CONFIG=$(SFT_CONFIG) NPROC=$(SFT_NPROC) PYTHON=$(PYTHON) launch_scripts/train_single_node.sh $(SFT_ARGS)

# Validate a config (checkpoint metadata, tokenizer, layout, data) without training: make sft-dry-run SFT_CONFIG=...
sft-dry-run: venv
	CONFIG=$(SFT_CONFIG) NPROC=$(SFT_NPROC) PYTHON=$(PYTHON) DRY_RUN=1 launch_scripts/train_single_node.sh $(SFT_ARGS)

# ---- convert: HF / Mistral-native / torch_dist <-> megatron (torch_dist) | hf | mistral; see tools/convert.py --help ----
IN ?=
OUT ?=
TO ?= megatron
TP ?= 1
PP ?= 1
convert: venv
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "usage: make convert IN=dir OUT=dir [TO=megatron|hf|mistral] [TP=1] [PP=1]"; exit 2; }
	$(PYTHON) tools/convert.py --input $(IN) --output $(OUT) --to $(TO) --tp $(TP) --pp $(PP)

# ---- merge-lora: a LoRA SFT step's adapters merged into its base (W + alpha/rank B A), exported (README: LoRA) ----
LORA ?=
LORA_BASE ?=
LORA_TO ?= hf
merge-lora: venv
	@test -n "$(LORA)" -a -n "$(LORA_BASE)" -a -n "$(OUT)" || { echo "usage: make merge-lora LORA=SAVE_DIR/iter_N LORA_BASE=BASE_CHECKPOINT OUT=dir [LORA_TO=hf|mistral|megatron]"; exit 2; }
	$(PYTHON) tools/convert.py --input $(LORA_BASE) --lora $(LORA) --output $(OUT) --to $(LORA_TO)

# All benchmarks, one after the other (each prints ratios against a baseline measured in the same run).
bench: bench-convert bench-merge bench-synth bench-loader

# Synthetic Mistral-Small-shaped checkpoint (~4.9 GB, 2 layers) in build/bench: ours vs disk floor; deleted afterwards.
bench-convert: venv
	$(PYTHON) tools/bench_convert.py --workdir $(BUILD)/bench/convert

# Demo step: the tiny Voxtral and Devstral (HF) -> Megatron torch_dist under build/demo/.
demo-convert: tiny
	rm -rf $(BUILD)/demo/voxtral-torch_dist $(BUILD)/demo/devstral-torch_dist
	$(PYTHON) tools/convert.py --input $(TINY)/voxtral-hf --output $(BUILD)/demo/voxtral-torch_dist --to megatron --tp 2 --no-progress
	$(PYTHON) tools/convert.py --input $(TINY)/devstral-hf --output $(BUILD)/demo/devstral-torch_dist --to megatron --tp 2 --no-progress

# ---- merge: tokenizer alignment + decoder merge (linear | slerp | della); see tools/merge.py --help ----
MERGE_DEVSTRAL ?= $(TINY)/devstral-hf
MERGE_VOXTRAL ?= $(TINY)/voxtral-hf
MERGE_METHOD ?= linear
MERGE_ALPHA ?= 0.1
MERGE_ROPE_FROM ?= devstral
MERGE_FORMAT ?= hf
MERGE_ARGS ?=
MERGE_OUT ?= $(BUILD)/merge/$(MERGE_METHOD)-$(MERGE_ALPHA)
MERGE_GRID ?= examples/merge_grid.yaml
MERGE_GRID_OUT ?= $(BUILD)/merge-grid
MERGE_COMMON = --devstral $(MERGE_DEVSTRAL) --voxtral $(MERGE_VOXTRAL) --rope-from $(MERGE_ROPE_FROM) --format $(MERGE_FORMAT)
merge: venv
	$(PYTHON) tools/merge.py $(MERGE_COMMON) --method $(MERGE_METHOD) --alpha $(MERGE_ALPHA) --output $(MERGE_OUT) $(MERGE_ARGS)

# The paper's Table 1 grid (8 DELLA, 5 linear, 5 SLERP): one checkpoint per configuration + manifest.json.
merge-grid: venv
	$(PYTHON) tools/merge.py $(MERGE_COMMON) --grid $(MERGE_GRID) --output $(MERGE_GRID_OUT) $(MERGE_ARGS)

# Ours vs mergekit vs disk floor on synthetic Mistral-Small-shaped parents (~3.8 GB each, deleted afterwards).
# DELLA runs on its own pair with a 32k vocabulary (whole float32 tensors: the 131k-row embedding would take 14 GB
# of RSS in ours and over 19 GB in mergekit). BENCH_MERGE_METHODS picks a subset.
BENCH_MERGE_METHODS ?= linear,slerp,della
bench-merge: venv
	$(PYTHON) tools/bench_merge.py --dir $(BUILD)/bench/merge --json $(BUILD)/bench_merge.json --methods $(BENCH_MERGE_METHODS)

# Demo step: align the tiny parents' tokenizers, then merge them (linear, alpha 0.1) under build/demo/
# (HF in, HF out; and torch_dist in, torch_dist out when demo-convert ran first, as in `make demo`).
demo-merge: tiny
	rm -rf $(BUILD)/demo/tokenizer $(BUILD)/demo/merge-linear-0.1
	$(PYTHON) tools/align_tokenizer.py --devstral $(TINY)/devstral-hf --voxtral $(TINY)/voxtral-hf --output $(BUILD)/demo/tokenizer
	$(PYTHON) tools/merge.py --devstral $(TINY)/devstral-hf --voxtral $(TINY)/voxtral-hf --method linear --alpha 0.1 \
	  --rope-from devstral --tokenizer-map $(BUILD)/demo/tokenizer/tokenizer_map.json --output $(BUILD)/demo/merge-linear-0.1 --no-progress
	@# the same merge on the torch_dist checkpoints of demo-convert, written as torch_dist
	rm -rf $(BUILD)/demo/merge-linear-0.1-torch_dist
	test ! -d $(BUILD)/demo/devstral-torch_dist || $(PYTHON) tools/merge.py --devstral $(BUILD)/demo/devstral-torch_dist \
	  --voxtral $(BUILD)/demo/voxtral-torch_dist --method linear --alpha 0.1 --rope-from devstral --format megatron \
	  --output $(BUILD)/demo/merge-linear-0.1-torch_dist --no-progress

# ---- model check: Megatron logits vs HF transformers on the tiny parents (CPU, fp32, real speech clip) ----
LOGITS_DIR ?= $(BUILD)/logits
LOGITS_CLIP ?= /usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0930.wav
logits: tiny
	$(PYTHON) tools/logits.py --checkpoint $(TINY)/voxtral-hf --tokens 1,3,25,24,4,1100,1200 --audio $(LOGITS_CLIP) \
	  --output $(LOGITS_DIR)/voxtral.safetensors --compare-hf
	$(PYTHON) tools/logits.py --checkpoint $(TINY)/devstral2-hf --tokens $$(seq -s, 1000 1063) \
	  --output $(LOGITS_DIR)/devstral2.safetensors --compare-hf

# On one GPU (CUDA torch + requirements-gpu.txt): TE spec BF16 and FP8 on full-width layers, TFLOP/s + peak memory.
gpu-check:
	$(PYTHON) tools/gpu_check.py

# ---- synthetic spoken coding instructions (offline judge + piper TTS on the bundled sample) ------
SYNTH_INPUT ?= examples/data/coding_trajectories.jsonl
synth: venv
	$(PYTHON) tools/synth_audio.py --input $(SYNTH_INPUT) --output $(BUILD)/synth --workers 2

# Demo step: voice the bundled trajectories (offline judge + piper) into Energon shards that the demo SFT reads.
demo-synth: venv
	$(PYTHON) tools/synth_audio.py --input $(SYNTH_INPUT) --output $(BUILD)/demo/synth --workers 2

bench-synth: venv
	$(PYTHON) tools/bench_synth.py --input $(SYNTH_INPUT) --workdir $(BUILD)/bench-synth

# SFT data loader, one training process: packed tokens/s for text chats and real-speech chats (decode + log-mel
# + packing) in-process and with 1 and 2 worker processes, and the margin over one DP rank's need in the paper's run.
bench-loader: venv system-deps
	$(PYTHON) tools/bench_loader.py --workdir $(BUILD)/bench-loader --json $(BUILD)/bench_loader.json

# ---- evaluation and report (tiny models; example benchmarks in examples/eval, voiced with espeak-ng) ----
# `make eval` scores EVAL_MODEL (default: the tiny linear alpha=0.1 merge, built here) on every benchmark,
# plus the tiny parents; `make eval-sft EVAL_SFT_RUN=DIR` scores each DIR/iter_* checkpoint of an SFT run;
# `make report` regenerates all tables and figures from the results store. SWE-Bench is never faked: a
# checkpoint shows "not run" until its own harness report is ingested (README: SWE-Bench).
EVAL_DIR ?= $(BUILD)/eval
EVAL_DATA := $(EVAL_DIR)/data
EVAL_RESULTS ?= $(EVAL_DIR)/results
EVAL_MODEL ?= $(EVAL_DIR)/models/linear-0.1
EVAL_MODEL_LABELS ?=
EVAL_SFT_RUN ?=
EVAL_SFT_LABELS ?=
REPORT_DIR ?= $(BUILD)/report
REPORT_TENSORBOARD ?=
REPORT_SYNTH ?=
EVAL_ARGS ?= --max-new-tokens 32
EVALUATE := $(PYTHON) tools/evaluate.py
EVAL_STORE := --output $(EVAL_RESULTS)/records.jsonl
AUDIO_BENCHES := librispeech fleurs llama_questions mmlu_audio

eval-data: venv
	@mkdir -p $(EVAL_DATA)
	$(PYTHON) tools/voice_benchmark.py fleurs --data examples/eval/fleurs_text.jsonl --output $(EVAL_DATA)/fleurs.jsonl
	$(PYTHON) tools/voice_benchmark.py llama_questions --data examples/eval/llama_questions_text.jsonl --output $(EVAL_DATA)/llama_questions.jsonl
	$(PYTHON) tools/voice_benchmark.py mmlu_audio --data examples/eval/mmlu_text.jsonl --output $(EVAL_DATA)/mmlu_audio.jsonl
	$(PYTHON) tools/voice_benchmark.py toolcall_spoken --data examples/eval/toolcall_text.jsonl --output $(EVAL_DATA)/toolcall_spoken.jsonl
	cp examples/eval/librispeech.jsonl examples/eval/mmlu_text.jsonl $(EVAL_DATA)/
	cp examples/eval/toolcall_text.jsonl $(EVAL_DATA)/toolcall_typed.jsonl

eval-model: tiny
	test -e $(EVAL_MODEL) || $(PYTHON) tools/merge.py --devstral $(TINY)/devstral-hf --voxtral $(TINY)/voxtral-hf \
	  --output $(EVAL_MODEL) --method linear --alpha 0.1 --rope-from devstral --no-progress

eval: eval-data eval-model
	for b in $(AUDIO_BENCHES) mmlu_text; do \
	  $(EVALUATE) $$b --checkpoint $(EVAL_MODEL) $(EVAL_MODEL_LABELS) --data $(EVAL_DATA)/$$b.jsonl $(EVAL_ARGS) \
	    $(EVAL_STORE) || exit 1; done
	for b in $(AUDIO_BENCHES) mmlu_text; do $(EVALUATE) $$b --checkpoint $(TINY)/voxtral-hf --name voxtral \
	  --label role=parent --label "display=Voxtral (tiny)" --data $(EVAL_DATA)/$$b.jsonl $(EVAL_ARGS) $(EVAL_STORE) || exit 1; done
	$(EVALUATE) mmlu_text --checkpoint $(TINY)/devstral-hf --name devstral --label role=parent \
	  --label "display=Devstral (tiny)" --data $(EVAL_DATA)/mmlu_text.jsonl $(EVAL_ARGS) $(EVAL_STORE)
	@echo "eval: records in $(EVAL_RESULTS)/records.jsonl, per-sample predictions in $(EVAL_RESULTS)/predictions/"

eval-sft: eval-data
	test -n "$(EVAL_SFT_RUN)" || { echo "set EVAL_SFT_RUN=DIR (an SFT run with iter_* checkpoints)"; exit 1; }
	for ckpt in $(EVAL_SFT_RUN)/iter_*; do \
	  for b in mmlu_audio llama_questions mmlu_text; do $(EVALUATE) $$b --checkpoint $$ckpt --label role=sft \
	    $(EVAL_SFT_LABELS) --data $(EVAL_DATA)/$$b.jsonl $(EVAL_ARGS) $(EVAL_STORE) || exit 1; done; done

# Every checkpoint of a merge grid (`make merge-grid`'s manifest) plus its two parents on every benchmark
# (labels from each checkpoint's merge.json), then the report (tools/eval_grid.py). Resumable: finished
# predictions are reused, and a checkpoint whose predictions are all there is not even loaded.
GRID_MANIFEST ?= $(MERGE_GRID_OUT)/manifest.json
eval-grid: eval-data
	$(PYTHON) tools/eval_grid.py --manifest $(GRID_MANIFEST) --data $(EVAL_DATA) $(EVAL_STORE) --report $(REPORT_DIR) \
	  $(EVAL_ARGS)

report: venv
	$(PYTHON) tools/report.py --results $(EVAL_RESULTS) --output $(REPORT_DIR) \
	  $(foreach d,$(REPORT_TENSORBOARD),--tensorboard $(d)) $(if $(REPORT_SYNTH),--synth $(REPORT_SYNTH))

# Demo step (keep it last in `demo`): evaluate the demo's merged model (the SFT's torch_dist start point
# when present, else the HF merge) and the parents, then every saved SFT step, then the report with the
# SFT TensorBoard curves. Labels (role, alpha, run, mixture, base) come from the checkpoints' metadata.
DEMO_EVAL := $(BUILD)/demo/eval
demo-eval: tiny
	model=$(BUILD)/demo/merged-torch_dist; test -e $$model || model=$(BUILD)/demo/merge-linear-0.1; \
	  $(MAKE) eval EVAL_MODEL=$$model EVAL_MODEL_LABELS="--label role=merge" EVAL_RESULTS=$(DEMO_EVAL)/results \
	  EVAL_DIR=$(DEMO_EVAL)
	if ls -d $(BUILD)/demo/sft/iter_* >/dev/null 2>&1; then \
	  $(MAKE) eval-sft EVAL_SFT_RUN=$(BUILD)/demo/sft EVAL_RESULTS=$(DEMO_EVAL)/results EVAL_DIR=$(DEMO_EVAL); fi
	$(MAKE) report EVAL_RESULTS=$(DEMO_EVAL)/results REPORT_DIR=$(BUILD)/demo/report \
	  REPORT_TENSORBOARD="$(wildcard $(BUILD)/demo/sft/tensorboard)" \
	  REPORT_SYNTH="$(firstword $(wildcard $(BUILD)/demo/synth $(BUILD)/synth))"
	@echo "demo: eval records $(DEMO_EVAL)/results/records.jsonl (predictions in $(DEMO_EVAL)/results/predictions/);" \
	  "tables + figures $(BUILD)/demo/report (index $(BUILD)/demo/report/REPORT.md)"

# ---- tests ---------------------------------------------------------------------------------------
test: venv
	$(PYTEST) -q -m "not slow and not gpu" tests

test-slow: venv vllm-env
	$(PYTEST) -q -m "slow and not gpu" tests

# vLLM (CPU torch, --no-deps; see requirements-vllm.txt) in its own environment, never in $(VENV): the slow
# export test runs vLLM's Mistral-format config adapter and weight mapping on our Mistral-native export there.
VLLM_VENV ?= .venv-vllm
vllm-env: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: requirements-vllm.txt constraints.txt
	test -x $(VLLM_VENV)/bin/python || python3.11 -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt $(if $(WHEELS),--find-links $(WHEELS)) --no-deps \
	  -r requirements-vllm.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt $(if $(WHEELS),--find-links $(WHEELS)) \
	  $$(grep -v -e '^#' -e '^vllm==' requirements-vllm.txt) 2>&1 | grep -v "^WARNING: Location" || true
	$(VLLM_VENV)/bin/python -c "import torch, vllm.model_executor.models.voxtral; assert '+cpu' in torch.__version__"
	touch $@

# On a GPU machine with a CUDA torch and requirements-gpu.txt. No TF32: the fp32 parity case compares with HF at 1e-4.
test-gpu:
	NVIDIA_TF32_OVERRIDE=0 $(PYTEST) -q -m gpu tests

# Formatting and lint over all Python code (run by .ci/run before the tests), shellcheck over the launch scripts;
# `make format` applies the Python fixes.
LINT_PATHS := megatron_ext benchmarks tools tests
SHELL_SCRIPTS := $(wildcard launch_scripts/*.sh launch_scripts/*.sbatch)
lint: venv
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)

format: venv
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(BUILD)
