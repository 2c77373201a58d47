# `make demo` segments the bundled example frames with the shipped checkpoint; `make test` runs the whole suite.
# Both create .venv and install the pinned requirements first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	$(BIN)/python predict.py examples/ --model . --output_dir outputs/demo

test: install
	$(BIN)/python -m pytest tests -q
