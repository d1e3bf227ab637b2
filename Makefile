# The two commands of the README, on a fresh machine:
#   make book   -- create .venv if missing, install, build the course website into _build/html
#   make test   -- create .venv if missing, install, run the package tests, the notebooks
#                  (smoke profile, nbval, Colab-like: without the book's packages) and the book build
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The torch this project is tested with; the package itself only asks for ranges.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# Where torch comes from. Empty: PyPI (with CUDA libraries, about 3 GB of the environment's 6).
# On a CPU-only machine that can reach it: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
export MINIDISTILL_DATA ?= $(CURDIR)/_build/data
# nbval's limit per notebook cell, in seconds. A smoke notebook takes under a minute on 2 quiet
# cores, so a cell that reaches it is starved, not slow: the failure says what to do (fewer CPU
# jobs, MINIDISTILL_THREADS=1); on a slow machine, `make test CELL_TIMEOUT=900`.
CELL_TIMEOUT ?= 300
# The notebooks run as Colab runs them: a folder first on PYTHONPATH whose myst_nb, jupyter_book,
# myst_parser and sphinx raise ImportError (tools/colab_like.py), so a notebook that needs a
# book package fails here, not on a student's Colab.
COLAB_LIKE = _build/colab-like

.PHONY: book test test-package test-notebooks status publish plan bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PY) -m pip install -q -e ".[dev,book]"
	touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

test-package: $(VENV)/.installed
	MINIDISTILL_PROFILE=smoke MINIDISTILL_PROGRESS=0 $(PY) -m pytest -q tests

$(COLAB_LIKE)/.made: tools/colab_like.py $(VENV)/.installed
	$(PY) tools/colab_like.py $(COLAB_LIKE)
	touch $@

test-notebooks: $(VENV)/.installed $(COLAB_LIKE)/.made
	PYTHONPATH=$(CURDIR)/$(COLAB_LIKE):$(CURDIR)/tools MINIDISTILL_PROFILE=smoke MINIDISTILL_PROGRESS=0 \
		$(PY) -m pytest -q -p colab_like --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
		-p no:cacheprovider notebooks book/write_your_own.ipynb

test: test-package test-notebooks book

# Re-execute notebooks in place (course profile on a GPU; PROFILE=smoke without one).
# BUDGET=540: stalest first, only what fits in 540 s. `make plan` prints that plan, on any machine.
PROFILE ?= course
# Then the README's status block is rewritten from the notebooks just published (make status),
# also when a notebook failed: the ones that finished were written back.
publish: $(VENV)/.installed
	$(PY) -m minidistill.publish --profile $(PROFILE) $(if $(BUDGET),--budget $(BUDGET)) $(NOTEBOOKS); \
		status=$$?; $(PY) tools/status.py --write; exit $$status

plan: $(VENV)/.installed
	$(PY) -m minidistill.publish --plan --budget $(or $(BUDGET),540) --profile $(PROFILE) $(NOTEBOOKS)

# Rewrite the README's chapter-status block from the notebooks' metadata (tools/status.py).
status: $(VENV)/.installed
	$(PY) tools/status.py --write

bench: $(VENV)/.installed
	$(PY) benchmarks/kd_throughput.py

clean:
	rm -rf _build
