# Set-up, tests, benchmarks and the demo. Each target creates .venv and
# installs torch and the package on first use.
#   make test    build + every CPU test + a quick kernel benchmark table
#   make bench   the full kernel benchmarks; writes bench/RESULTS.md
#   make bench-peers  a DPO step against TRL's DPOTrainer, a GRPO step against its GRPOTrainer (installs TRL);
#                     writes bench/RESULTS.md
#   make demo    the main job end to end: synthetic data + tokenizer, SFT then DPO
#                of a tiny model on 2 CPU processes (a few minutes)
#   make lint    ruff (lint + format check) and clang-format
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
PYTEST_ARGS ?=

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
	$(PY) -m pytest tests $(PYTEST_ARGS)
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

DEMO_DIR ?= .demo
NPROC ?= 2
# torchrun's launcher (same options), ending a failed run with the worker's message (aligner/launch.py)
LAUNCH := $(PY) -m aligner.launch --standalone --nproc_per_node=$(NPROC)

demo: install
	rm -rf $(DEMO_DIR)/runs
	$(PY) -m aligner.recipes.prepare_demo --out $(DEMO_DIR)
	$(LAUNCH) -m aligner.recipes.sft --config configs/sft_tiny.yaml
	$(LAUNCH) -m aligner.recipes.dpo --config configs/dpo_tiny.yaml

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
