# embps: `make demo` runs the main job, `make test` runs every check.
# Both create .venv (with python3) and install what they need on first use.
PYTHON ?= python3
# PyTorch for the trainer modules: pinned to a CPU build so that the [torch]
# extra's range needs no further download (override for a CUDA build).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test lint unit integration demo demo-quick bench protos clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[dev,torch,demo]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q tests

unit: venv
	$(PY) -m pytest -q tests/unit

integration: venv
	$(PY) -m pytest -q tests/integration

demo: venv
	$(VENV)/bin/embps demo

demo-quick: venv
	$(VENV)/bin/embps demo --quick

bench: venv
	mkdir -p bench-results
	$(VENV)/bin/embps bench engine --json bench-results/engine.json
	$(VENV)/bin/embps bench service --json bench-results/service.json
	$(VENV)/bin/embps bench checkpoint --json bench-results/checkpoint.json

protos: venv
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos \
		--pyi_out=protos protos/embps/v1/embps.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results
