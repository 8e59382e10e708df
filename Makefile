# Set-up, tests, benchmarks and the demo. Each target creates .venv and
# installs torch and the package on first use.
#   make test    build + every CPU test + a quick kernel benchmark table
#   make bench   the full kernel benchmarks; writes bench/RESULTS.md
#   make bench-peers  a DPO step against TRL's DPOTrainer, a GRPO step against its GRPOTrainer (installs TRL);
#                     writes bench/RESULTS.md
#   make demo    the main job end to end on 2 CPU processes (about 5 minutes): synthetic data + tokenizer,
#                SFT, reward model, GRPO (exact-answer reward), DPO, Hugging Face exports; then a report:
#                held-out accuracy per stage, answers before/after, curves in .demo/demo_curves.png
#   make lint    ruff (lint + format check) and clang-format
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`, each test file on one worker (its module fixtures built once). Most
# slow cases run one single-threaded process (the online learning runs) or wait on spawns and gloo, so two
# workers keep both cores busy; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

.PHONY: install test test-cuda bench bench-peers demo lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and the build requirements first: build isolation is off (a second
# multi-GB torch would be pulled into the build environment otherwise), so
# everything the build reads (torch, CUTLASS/CuTe headers) must be in place.
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0
# The CUDA build of torch and its libraries take about 5.5 GB in the venv, the
# build about 0.5 GB more: check the disk first, rather than let pip fail half
# way with "No space left on device".
MIN_FREE_GB ?= 7
$(VENV)/.torch-installed: | $(PY)
	@avail_kb=$$(df -Pk $(VENV) | awk 'NR==2 {print $$4}'); \
	if [ "$$avail_kb" -lt $$(( $(MIN_FREE_GB) * 1024 * 1024 )) ]; then \
		echo "error: $(VENV) needs about $(MIN_FREE_GB) GB free for torch and the build;" \
			"only $$(( avail_kb / 1024 / 1024 )) GB free on $$(df -P $(VENV) | awk 'NR==2 {print $$6}')" \
			"(free some space, or set MIN_FREE_GB)" >&2; \
		exit 1; \
	fi
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(CUTLASS_SPEC)" "setuptools>=68" wheel "cmake>=3.26" ninja
	touch $@

install: $(VENV)/.torch-installed
	$(PY) -m pip install -q -e ".[dev]" --no-build-isolation

test: install
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	ALIGNER_BENCH_QUICK=1 $(PY) bench/run.py --no-write

test-cuda: install
	$(PY) -m pytest tests/cuda $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py
	$(PY) bench/sft_step_memory.py

# The [peers] extra of pyproject.toml (keep the two in step), installed by name: `pip install -e ".[peers]"`
# would rebuild the package. Both accept the installed torch, so pip keeps it (`pip install --dry-run` shows).
PEERS_SPEC ?= trl==1.16.0 accelerate==1.16.0
bench-peers: install
	$(PY) -m pip install -q $(PEERS_SPEC)
	$(PY) bench/peers_dpo.py
	$(PY) bench/peers_grpo.py

# The demo: each stage of DEMO_STAGES is one run of its recipe on configs/*_tiny.yaml, launched with NPROC
# processes; the overrides put its data, checkpoints, events and export under DEMO_DIR/runs/<stage> (the configs
# name .demo) and chain the stages: the RL stage starts from the SFT export, DPO from the RL stage's. Then
# aligner.demo_report reads every stage's events and exports (held-out accuracy, curves, example answers).
DEMO_DIR ?= .demo
DEMO_RUNS := $(DEMO_DIR)/runs
NPROC ?= 2
# torchrun's launcher (same options), ending a failed run with the worker's message (aligner/launch.py)
LAUNCH := $(PY) -m aligner.launch --standalone --nproc_per_node=$(NPROC)
# A stage's paths: data of kind $(1) from prepare_demo, everything it writes under DEMO_RUNS/$(2)
demo_paths = data.train=$(DEMO_DIR)/data/$(1)/train.jsonl data.val=$(DEMO_DIR)/data/$(1)/val.jsonl \
	data.tokenizer=$(DEMO_DIR)/tokenizer \
	checkpoint.dir=$(DEMO_RUNS)/$(2) logging.tensorboard_dir=$(DEMO_RUNS)/$(2)/tensorboard
# 225 SFT steps: the start of the online learning tests, answering about a third of the held-out problems
DEMO_sft := -m aligner.recipes.sft --config configs/sft_tiny.yaml $(call demo_paths,sft,sft) trainer.max_steps=225
DEMO_rm := -m aligner.recipes.rm --config configs/rm_tiny.yaml $(call demo_paths,preference,rm)
# A small KL coefficient loads the reference, so the KL to it is measured and plotted.
DEMO_grpo := -m aligner.recipes.grpo --config configs/grpo_tiny.yaml $(call demo_paths,rl_prompt,grpo) \
	model.hf_path=$(DEMO_RUNS)/sft/hf grpo.kl_coef=0.01
# PPO against the demo's reward model, which also starts the critic (configs/ppo_tiny.yaml's settings for it): the
# greedy answers take the explained style that model prefers. The exact-answer checker rides along at weight 0, a
# metric only. make demo DEMO_RL=ppo
DEMO_ppo := -m aligner.recipes.ppo --config configs/ppo_tiny.yaml $(call demo_paths,rl_prompt,ppo) \
	model.hf_path=$(DEMO_RUNS)/sft/hf \
	"reward.terms=[{model: '$(DEMO_RUNS)/rm'}, {function: 'aligner.rewards.arithmetic:exact_answer', weight: 0.0}]" \
	trainer.max_steps=150 trainer.val_every=50
# The RL stage (its DEMO_<name> line above): make demo DEMO_RL=<name>
DEMO_RL ?= grpo
# From the RL stage's export. dpo_tiny's beta 0.1 at lr 1e-3 (tuned from SFT) takes the RL model's held-out
# accuracy from 0.56 to 0.03; beta 1 at lr 1e-4 learns the pairs (val accuracy 0.86) and keeps it. Logged every
# 2 of its 40 steps for the curves.
DEMO_dpo := -m aligner.recipes.dpo --config configs/dpo_tiny.yaml $(call demo_paths,preference,dpo) \
	model.hf_path=$(DEMO_RUNS)/$(DEMO_RL)/hf dpo.beta=1.0 optim.lr=1e-4 optim.min_lr=1e-5 trainer.log_every=2
DEMO_STAGES := sft rm $(DEMO_RL) dpo

# one recipe line per stage
define demo_stage
$(LAUNCH) $(DEMO_$(1))

endef

demo: install
	rm -rf $(DEMO_RUNS)
	$(PY) -m aligner.recipes.prepare_demo --out $(DEMO_DIR)
	$(foreach stage,$(DEMO_STAGES),$(call demo_stage,$(stage)))
	$(PY) -m aligner.demo_report --dir $(DEMO_DIR) --stages $(DEMO_STAGES)

lint: install
	$(VENV)/bin/ruff check aligner tests bench setup.py
	$(VENV)/bin/ruff format --check aligner tests bench setup.py
	@if command -v clang-format >/dev/null; then \
		clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* csrc/include/aligner/*; \
	else echo "clang-format not installed: skipped (apt-get install clang-format)"; fi

format: install
	$(VENV)/bin/ruff format aligner tests bench setup.py
	$(VENV)/bin/ruff check --fix aligner tests bench setup.py

clean:
	rm -rf build aligner/_C*.so *.egg-info .demo
