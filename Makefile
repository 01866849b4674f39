PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-scale test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q < /dev/null

demo: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/demo.sh < /dev/null

demo-scale: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/demo_scale.sh < /dev/null
