# Two commands on a fresh machine: `make demo` (set up, then the whole pipeline on synthetic data)
# and `make test` (set up, then the test suite). Both create the virtual environment when absent
# (`make demo CPU=1` on a machine without an NVIDIA GPU).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_SCENES ?= 2000

.PHONY: setup test test-slow snippets demo clean-demo submission

# CPU=1 (a machine without an NVIDIA GPU): torch's CPU build first, about 200 MB instead of the CUDA
# build pip picks by default; the requirements then keep it.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

# visdom 0.2.4 is a source package whose setup imports pkg_resources: it needs setuptools<81
# and --no-build-isolation.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "setuptools<81" wheel
	$(if $(CPU),$(PY) -m pip install --quiet torch torchvision --index-url $(TORCH_CPU_INDEX))
	$(PY) -m pip install --quiet --no-build-isolation -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

# Which of the six assignment snippets match the solution's recorded outputs (a table at the end).
snippets: setup
	$(PY) -m pytest -q tests/test_snippets.py

demo: setup
	$(PY) scripts/demo.py --num_scenes $(DEMO_SCENES)

clean-demo:
	rm -rf data/demo experiments/demo

# The hand-in: checks the four files, the snippets and the report of CFG's experiment, then writes
# submission.zip (FORCE=1 writes it although something is missing).
CFG ?= configs/dynamic/transformer_quick.yaml
submission: setup
	$(PY) scripts/make_submission.py --cfg $(CFG) $(if $(FORCE),--force)
