# Two commands do all the set-up on a fresh machine:
#   make book   builds the book (CPU-sized notebooks) into _build/html
#   make test   runs every test: unit tests + pytest --nbval over notebooks/
# Both create the virtual environment .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Triton kernels run on the CPU through the interpreter wherever there is no GPU.
export TRITON_INTERPRET ?= 1

export PYTHONHASHSEED ?= 0
# Property tests draw the same examples on every run of the Makefile's targets (CI, the portability emulations):
# a check must not pass or fail by the luck of the draw. `pytest` alone draws fresh examples (tests/conftest.py).
export HYPOTHESIS_PROFILE ?= ci

.PHONY: all book test test-unit test-notebooks test-portability venv clean gpu-kernels gpu-extrapolation reproduce

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[book,test]"
	touch $(STAMP)

venv: $(STAMP)

# The executions are cached (_build/.jupyter_cache, keyed on the notebooks' code) and Sphinx re-reads only changed
# pages: an unchanged rebuild takes seconds. Neither sees the package or results/, so when those changed since the
# last build the cache and the read pages are cleared and everything is executed again.
BOOK_INPUTS_HASH = $(shell find freeatten_core results -type f \( -name '*.py' -o -name '*.json' \) -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-16)
book: $(STAMP)
	@if [ "$$(cat _build/.book_inputs 2>/dev/null)" != "$(BOOK_INPUTS_HASH)" ]; then rm -rf _build/.jupyter_cache _build/.doctrees; fi
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@mkdir -p _build && echo "$(BOOK_INPUTS_HASH)" > _build/.book_inputs
	@echo "book written to _build/html/index.html"

test: test-unit test-notebooks

test-unit: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# Notebooks are re-executed and checked in nbval's lax mode: only cells marked `# NBVAL_CHECK_OUTPUT` (text that
# is the same on every machine) are compared; float results are asserted inside the cells against the recorded
# run with stated tolerances (freeatten_core/expected.py). See the book's "Contributing" page.
test-notebooks: $(STAMP)
	$(PY) -m pytest -q -p no:randomly --nbval-lax notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg

# Other machines emulated on this one: ATen's kernels for CPUs without AVX-512 (avx2) or without any SIMD
# (default) and the native ones, each with 1 and 2 threads; unit tests and notebook checks for every combination.
CAPABILITIES ?= default avx2 native
THREADS      ?= 1 2
test-portability: $(STAMP)
	@set -e; for cap in $(CAPABILITIES); do for t in $(THREADS); do \
	  echo "=== ATEN_CPU_CAPABILITY=$$cap, $$t thread(s) ==="; \
	  if [ "$$cap" = native ]; then unset ATEN_CPU_CAPABILITY; else export ATEN_CPU_CAPABILITY=$$cap; fi; \
	  OMP_NUM_THREADS=$$t FREEATTEN_TEST_THREADS=$$t $(MAKE) --no-print-directory test-unit test-notebooks; \
	done; done; echo "test-portability: every combination passed"

# On a GPU machine (CUDA build of torch + triton in the active Python): kernel tests in bf16/fp16 on the GPU and
# the benchmark against SDPA / FlexAttention -> results/bench/; the `gpu` training preset -> results/extrapolation/.
gpu-kernels:
	bash scripts/gpu_kernels.sh

gpu-extrapolation:
	bash scripts/gpu_extrapolation.sh

# Every chapter re-executed at one preset (papermill; presets/<name>.yaml) into results/$(PRESET)/, with the
# preset's multi-seed runs (the cpu preset: about 40 minutes of one core). PRESET: ci, cpu, gpu or paper.
PRESET ?= cpu
reproduce: $(STAMP)
	$(PY) -m freeatten_core reproduce --preset $(PRESET)

clean:
	rm -rf _build .pytest_cache .hypothesis
