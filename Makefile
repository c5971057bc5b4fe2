# Development tasks. test, test-all, lint and demo install what is missing first: .venv with the torch that
# TORCH_SPEC names (a CPU or a CUDA build), lorakit in editable mode and its test tools. The stamp $(STAMP)
# marks an install newer than pyproject.toml, so a second `make test` does not reinstall; `make install`
# always does.
PY_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-all lint bench bench-quick bench-serve bench-quality demo

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

# bench_overload.py and bench_generation_serve.py run their own `lorakit serve` processes and re-render
# RESULTS.md with the sections above.
bench: $(STAMP)
	$(PY) scripts/bench.py --out benchmarks
	$(PY) scripts/bench_overload.py --out benchmarks
	$(PY) scripts/bench_generation_serve.py --out benchmarks

bench-quick: $(STAMP)
	$(PY) scripts/bench.py --quick --out benchmarks

bench-serve: $(STAMP)
	$(PY) scripts/bench.py --only serve --out benchmarks
	$(PY) scripts/bench_overload.py --out benchmarks
	$(PY) scripts/bench_generation_serve.py --out benchmarks

# Quality at real training budgets (issue 26): the real MiniLM-L6 on five GLUE tasks, lorakit LoRA, full
# fine-tuning and PEFT + Trainer, learning rates from grids on held-out training rows, all lorakit runs
# through `lorakit sweep` (configs/sweeps/minilm-quality*.yaml). About 2 hours on 2 cores; resumable: the
# finished points' metrics under benchmarks/quality/ are kept in git and a rerun trains only what is missing.
# Writes benchmarks/quality.json and renders RESULTS.md. STAGE=grid|main|quant|report runs one stage.
bench-quality: $(STAMP)
	$(PY) scripts/bench_quality.py --out benchmarks --stage $(or $(STAGE),all)

# The quick start: LoRA on the real pretrained MiniLM for SST-2, offline (see configs/demo.yaml).
# OUT=DIR writes the run elsewhere; ARGS="--set KEY=VALUE ..." passes more options to `lorakit train`.
demo: $(STAMP)
	$(VENV)/bin/lorakit train configs/demo.yaml --output-dir $(or $(OUT),runs/demo) $(ARGS)

# The default test suite on the lowest versions pyproject.toml admits, in a venv of its own ($(FLOORS_VENV),
# made anew each time; its .gitignore keeps it out of git): $(TORCH_SPEC) first (the only torch here, so
# the torch floor itself is not tested), then every other dependency of [project] and of the test extra
# pinned at its floor, each `>=X` read from pyproject.toml as `==X` (so the pins cannot drift from it),
# then lorakit with --no-deps, so that nothing is resolved again; pip check proves the set consistent, and
# tests/test_versions.py that the run had the floors (LORAKIT_FLOORS names the pins).
FLOORS_VENV ?= .venv-floors
FLOOR_PINS = import re, sys; \
  toml = __import__("tomllib" if sys.version_info >= (3, 11) else "pip._vendor.tomli", fromlist=["loads"]); \
  p = toml.loads(open("pyproject.toml").read())["project"]; \
  reqs = [r for r in p["dependencies"] + p["optional-dependencies"]["test"] if not re.match(r"torch\W", r)]; \
  pins = [re.sub(r"\s*>=\s*", "==", r) for r in reqs]; \
  assert all("==" in r for r in pins), pins; \
  print(*pins, sep="\n")

.PHONY: test-floors
test-floors:
	rm -rf $(FLOORS_VENV)
	$(PY_BOOT) -m venv $(FLOORS_VENV)
	echo '*' > $(FLOORS_VENV)/.gitignore
	$(FLOORS_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOORS_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(FLOORS_VENV)/bin/python -c '$(FLOOR_PINS)' > $(FLOORS_VENV)/floors.txt
	cat $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" -r $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install -q --no-deps -e .
	$(FLOORS_VENV)/bin/python -m pip check
	LORAKIT_FLOORS=$(FLOORS_VENV)/floors.txt $(FLOORS_VENV)/bin/python -m pytest -q
