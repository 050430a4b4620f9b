# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the offline CapFilt example
#   make test   installs into .venv and runs the tests
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE := disabled
DEMO_DIR ?= demo

.PHONY: setup demo test lint docs clean

setup: $(VENV)/.installed

# torch is pinned in its own step: a looser requirement pulls a multi-GB CUDA build here.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/capfilt demo $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check capfilt tests
	$(VENV)/bin/ruff format --check capfilt tests

docs: setup
	$(PY) -m capfilt.cli.reference --write README.md

clean:
	rm -rf $(VENV) $(DEMO_DIR)
