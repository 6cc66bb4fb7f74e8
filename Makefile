# Two commands on a fresh machine: `make demo` runs the default recipe, `make test` runs the tests.
# Each creates .venv and installs everything the project needs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 here is the CPU build; a GPU machine may install its CUDA build of torch beforehand
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lathe run

test: $(STAMP) browser
	$(BIN)/python -m pytest

# Debian's Chromium for the web chat page's browser test (Playwright drives it; no browser download)
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "could not install chromium: the browser test will skip (and fail under CI=true)"

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
