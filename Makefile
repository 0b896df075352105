# Two set-up commands: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= params/nano.yaml

.PHONY: run test smoke lab install strip clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the nano preset; prints where the report is.
run: $(STAMP)
	$(BIN)/anima run $(PRESET)

# Fast suite (CI). The end-to-end pipeline check is `make smoke`.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

smoke: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# localhost only, token on (jupyter's default); root (common in containers) needs --allow-root or jupyter exits
LAB_UID ?= $(shell id -u)
lab: $(STAMP)
	PYTHONSTARTUP=$(CURDIR)/anima_lib/kernel_startup.py $(BIN)/jupyter lab notebooks/ --ip=127.0.0.1 $(if $(filter 0,$(LAB_UID)),--allow-root)

clean-venv:
	rm -rf $(VENV)

# Notebooks are committed without outputs.
strip: $(STAMP)
	$(BIN)/nbstripout notebooks/*.ipynb
