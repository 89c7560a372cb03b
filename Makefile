# The README's commands. Every target sets itself up (idempotently) first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# DeepSpeed JIT-builds a small CPU comm op on first use; keep the build cache in the repo.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/re2tal train --config configs/debug.yaml

test: setup
	$(PY) -m pytest tests

bench: setup
	$(VENV)/bin/re2tal bench all --out bench-results

clean:
	rm -rf $(VENV) .cache .pytest_cache
