# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install reproduce-quick

$(BIN)/stairscale: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned in the same command so deepspeed does not pull a CUDA build of torch.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet torch==2.13.0 -e '.[test]'
	touch $(BIN)/stairscale

install: $(BIN)/stairscale

demo: install
	$(BIN)/stairscale train

test: install
	$(BIN)/python -m pytest -q

reproduce-quick: install
	$(BIN)/stairscale reproduce tracking --quick
