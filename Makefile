# Two commands do all set-up on a fresh machine, in either order:
#   make sweep   creates .venv, installs f2d2-bench, runs the main job on the embedded default (writes runs/,
#                which git ignores: it never touches the committed results/)
#   make test    creates .venv, installs f2d2-bench with its test extra, runs the default test suite
# make results regenerates the committed results/ and README's results section, deliberately (hours on CPU).
# VENV may point elsewhere (CI keeps it outside the clone). VENV_FLAGS=--system-site-packages
# lets the environment reuse a torch you already have instead of installing one.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PIP_FLAGS ?=
STAMP := $(VENV)/.f2d2-bench-$(shell sha256sum pyproject.toml | cut -c1-16)
BIN := $(VENV)/bin
SWEEP_ARGS ?= --dataset checkerboard --nfe 1,2,4,8

.PHONY: install sweep test test-slow bench bench-compare readme results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

sweep: $(STAMP)
	$(BIN)/f2d2-bench sweep $(SWEEP_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Regenerate README.md's "Latest results" section from the files under results/.
readme: $(STAMP)
	$(BIN)/python -m bench.readme

# Regenerate every committed result, each with the command README.md names for it, then the README
# section. Checkpoints are cached under results/checkpoints (ignored by git): a rerun only evaluates.
results: $(STAMP)
	$(BIN)/python -m bench.readme --commands | while read -r cmd; do echo "+ $$cmd"; PATH="$(BIN):$$PATH" sh -c "$$cmd" || exit 1; done
	$(BIN)/python -m bench.readme

clean:
	rm -rf .venv .pytest_cache .benchmarks

# Timing tier: pytest-benchmark over the core kernels. `make bench` saves a run under
# results/benchmarks/; `make bench-compare` compares a fresh run with the committed baseline
# (BENCH_BASELINE, the saved run's id) and fails if a median slowed down by more than 50%.
BENCH_STORAGE := results/benchmarks
BENCH_BASELINE ?= 0001
bench: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks -m benchmark --benchmark-enable \
		--benchmark-storage=$(BENCH_STORAGE) --benchmark-autosave --benchmark-columns=min,median,max,rounds

bench-compare: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks -m benchmark --benchmark-enable \
		--benchmark-storage=$(BENCH_STORAGE) --benchmark-compare=$(BENCH_BASELINE) \
		--benchmark-compare-fail=median:50% --benchmark-columns=min,median,max,rounds
