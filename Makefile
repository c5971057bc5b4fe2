# Development tasks. test, test-all, lint and demo install what is missing first: .venv with the torch that
# TORCH_SPEC names (a CPU or a CUDA build), lorakit in editable mode and its test tools. The stamp $(STAMP)
# marks an install newer than pyproject.toml, so a second `make test` does not reinstall; `make install`
# always does.
PY_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-all lint bench bench-quick bench-serve bench-tune demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,dev]"
	touch $@

install:
	rm -f $(STAMP)
	$(MAKE) --no-print-directory $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check lorakit tests scripts
	$(VENV)/bin/ruff format --check lorakit tests scripts

bench: $(STAMP)
	$(PY) scripts/bench.py --out benchmarks

bench-quick: $(STAMP)
	$(PY) scripts/bench.py --quick --out benchmarks

bench-serve: $(STAMP)
	$(PY) scripts/bench.py --only serve --out benchmarks

# The learning-rate sweep whose picks `make bench`'s quality section trains with, each method at four
# rates on held-out training rows, through `lorakit train`. Run before `make bench` when the quality
# section changes (a long job: 3 tasks x 8 runs on 2 cores).
bench-tune: $(STAMP)
	$(PY) scripts/bench.py --only lr-sweep --out benchmarks

# The quick start: LoRA on the real pretrained MiniLM for SST-2, offline (see configs/demo.yaml).
# OUT=DIR writes the run elsewhere; ARGS="--set KEY=VALUE ..." passes more options to `lorakit train`.
demo: $(STAMP)
	$(VENV)/bin/lorakit train configs/demo.yaml --output-dir $(or $(OUT),runs/demo) $(ARGS)
