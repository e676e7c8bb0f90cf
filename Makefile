# `make test` and `make demo` set everything up on a machine that has only Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.labelwatch-installed

.PHONY: install test demo lint clean

install: $(STAMP)

# Reinstall when the dependency set changes; constraints.txt pins a known-good set.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[audio,examples,dev]"
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest

demo: $(STAMP)
	WANDB_MODE=offline $(PY) -m examples.urban_sounds.demo

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
