# The README's commands. Every target installs what it needs first (tools/install.sh is a no-op when current).
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds its CPU Adam here once; CI and later runs reuse it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions
PYTEST_ARGS ?=

.PHONY: install test test-multinode test-all demo wheels gpu-check clean

install:
	@VENV=$(VENV) tools/install.sh

test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The slow multi-node tests: a real two-node Slurm on this machine (tests/slurm_cluster.py; root, ~7 min).
test-multinode: install
	$(PY) -m pytest -m slow tests/test_multinode.py $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole pipeline on CPU (mdu_dist/resources/demo.yaml): pre-train, fine-tune, unlearn with MDU and baselines, evaluate, plots.
demo: install
	$(PY) -m mdu_dist.cli demo $(DEMO_ARGS)

# The wheels a GPU machine without network needs (tools/build_wheels.sh; into wheelhouse/, about 50 MiB), and
# the one-command GPU verification that installs them (tools/gpu_check.sh; GPU_CHECK_ARGS=--dry on CPU).
wheels: install
	PYTHON=$(PY) tools/build_wheels.sh

gpu-check:
	tools/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build .pytest_cache
