# embps: `make demo` runs the main job, `make test` runs every check.
# Both create .venv (with python3) and install what they need on first use.
PYTHON ?= python3
# PyTorch for the trainer modules: pinned to a CPU build so that the [torch]
# extra's range needs no further download (override for a CUDA build).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Exact versions of the development toolchain (pyproject.toml keeps ranges for
# users). PIP_CONSTRAINT also reaches pip's isolated build environments.
CONSTRAINTS := requirements/constraints-dev.txt
PIP := PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PY) -m pip

.PHONY: venv test lint unit integration demo demo-quick bench protos upgrade-deps clean image

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip
	$(PIP) install -q '$(TORCH_SPEC)'
	$(PIP) install -q -e '.[dev,torch,demo]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m mypy docs/experiments docs/examples
	$(VENV)/bin/lint-imports

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

# The server image (podman, or docker where its daemon runs): on the pinned base,
# or on a Debian stand-in where no registry is reachable; prints its size.
# Needs no venv. EMBPS_IMAGE_BASE=standin skips the pull attempt.
image:
	$(PYTHON) deploy/image/build.py

protos: venv
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos \
		--pyi_out=protos protos/embps/v1/embps.proto

# Move the toolchain forward in one command: resolve the newest versions within
# pyproject.toml's ranges in a scratch venv, write them as the new pins,
# reinstall, regenerate the protos with the new grpcio-tools, run every check.
upgrade-deps:
	rm -rf .venv-upgrade
	$(PYTHON) -m venv .venv-upgrade
	.venv-upgrade/bin/pip install -q --upgrade pip setuptools wheel
	.venv-upgrade/bin/pip install -q '$(TORCH_SPEC)'
	.venv-upgrade/bin/pip install -q -e '.[dev,torch,demo]'
	$(PYTHON) requirements/write_constraints.py .venv-upgrade/bin/python $(CONSTRAINTS)
	rm -rf .venv-upgrade
	$(MAKE) venv protos test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results
