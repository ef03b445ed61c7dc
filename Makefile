# Two commands do everything on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Exact versions of everything, in one file: torch 2.14.1 + torchvision 0.29.1 (the pair that imports together).
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=

.PHONY: install demo test test-deps test-fast fuzz bench lint format clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --out demo_out

# Tools the tests run: cfitsio's fitsverify on the outputs, `hey` for Serve under HTTP load (Debian packages;
# installed when missing and we are root).
TEST_TOOLS := fitsverify hey
test-deps:
	@missing=$$(for t in $(TEST_TOOLS); do command -v $$t >/dev/null || echo $$t; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; } \
	|| echo "missing test tools (not root?): install the Debian packages $$missing, or their tests fail"

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

# The default `make test` fuzzes read_fits for a minute (tests/test_fuzz.py); this runs it for FUZZ_SECONDS.
FUZZ_SECONDS ?= 1800
fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check ray_hrc jobs tests bench
	$(BIN)/ruff format --check ray_hrc jobs tests bench

format: $(STAMP)
	$(BIN)/ruff format ray_hrc jobs tests bench
	$(BIN)/ruff check --fix ray_hrc jobs tests bench

clean:
	rm -rf $(VENV) demo_out .pytest_cache
