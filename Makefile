# The two commands of the README, on a fresh machine:
#   make book   -- create .venv if missing, install, build the course website into _build/html
#   make test   -- create .venv if missing, install, run the package tests, the notebooks
#                  (smoke profile, nbval) and the book build
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The torch this project is tested with; the package itself only asks for ranges.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
export MINIDISTILL_DATA ?= $(CURDIR)/_build/data

.PHONY: book test test-package test-notebooks publish plan bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,book]"
	touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

test-package: $(VENV)/.installed
	MINIDISTILL_PROFILE=smoke MINIDISTILL_PROGRESS=0 $(PY) -m pytest -q tests

test-notebooks: $(VENV)/.installed
	MINIDISTILL_PROFILE=smoke MINIDISTILL_PROGRESS=0 $(PY) -m pytest -q --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=300 -p no:cacheprovider notebooks book/write_your_own.ipynb

test: test-package test-notebooks book

# Re-execute notebooks in place (course profile on a GPU; PROFILE=smoke without one).
# BUDGET=540: stalest first, only what fits in 540 s. `make plan` prints that plan, on any machine.
PROFILE ?= course
publish: $(VENV)/.installed
	$(PY) -m minidistill.publish --profile $(PROFILE) $(if $(BUDGET),--budget $(BUDGET)) $(NOTEBOOKS)

plan: $(VENV)/.installed
	$(PY) -m minidistill.publish --plan --budget $(or $(BUDGET),540) --profile $(PROFILE) $(NOTEBOOKS)

bench: $(VENV)/.installed
	$(PY) benchmarks/kd_throughput.py

clean:
	rm -rf _build
