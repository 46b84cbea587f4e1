# `make test`: create .venv if missing, install punica with its test, bench and cluster (Ray)
# extras (CPU torch), run pytest.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test serve lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "torch==2.13.0" "triton==3.6.0"
	$(PY) -m pip install -q -e ".[test,bench,cluster]"
	touch $(STAMP)

# Two workers (pytest-xdist): the tests are independent; each worker starts its own servers.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=20

# The OpenAI-compatible server on the built-in demo model (built on first use).
serve: $(STAMP)
	$(VENV)/bin/punica serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

bench: $(STAMP)
	$(PY) -m punica.bench.lora_op

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
