# Two entry points for a fresh machine: `make demo` (the main job on an embedded dataset)
# and `make test` (the test suite). Both create .venv and install requirements.txt when needed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
# The optional diffusers integration (integrations/, export.py --format=diffusers): the tests install and test it.
DIFFUSERS_STAMP := $(VENV)/.installed-requirements-diffusers

.PHONY: demo test venv bench clean-venv

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

$(DIFFUSERS_STAMP): requirements-diffusers.txt $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-diffusers.txt
	touch $(DIFFUSERS_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m demo.run $(DEMO_ARGS)

test: $(STAMP) $(DIFFUSERS_STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.run --quick

clean-venv:
	rm -rf $(VENV)
