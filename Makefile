# Set-up and checks. `make run` and `make test` are the two commands the README promises.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: install dev browser run test test-slow lint typecheck fixtures experiment bench clean

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed

run: install
	$(BIN)/wwcli analyze fixtures/keras/seed_mlp.keras fixtures/keras/heavy_tailed_mlp.keras --exit-zero

lint: dev
	$(BIN)/ruff check wwcli tests fixtures benchmarks examples docs
	$(BIN)/ruff format --check wwcli tests fixtures benchmarks examples docs

typecheck: dev
	$(BIN)/mypy

# Debian's Chromium, for the HTML report's browser test (skipped, loudly, where it cannot be had).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "WARNING: could not install chromium: the HTML report's browser test will be skipped"; }

test: lint typecheck browser
	$(BIN)/python -m pytest -q

# The expensive checks (long fuzzing runs, memory bombs, the full experiment's reduced run): not in CI.
test-slow: dev
	$(BIN)/python -m pytest -q -m slow

fixtures: dev
	$(BIN)/python fixtures/make_fixtures.py

experiment: dev
	$(BIN)/python examples/overtraining/experiment.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
