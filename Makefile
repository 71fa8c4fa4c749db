# make setup: create .venv and install requirements.txt
# make demo:  train van_b0 on the built-in digits set on the CPU, then validate the best checkpoint (how long:
#             docs/PERFORMANCE.md)
# make test:  the whole pytest suite (CPU)
# make test-fast: the unit tests only (no subprocess, torchrun or training runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= output
DEMO_EXP := digits-demo-$(shell date +%Y%m%d-%H%M%S)
# The demo recipe is configs/demo.yaml (what `python train.py` with no DATA_DIR runs too).
DEMO_ARGS ?= -c configs/demo.yaml

.PHONY: setup demo demo-args test test-fast clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m vancls.digits data/digits
	$(PY) train.py data/digits $(DEMO_ARGS) --device cpu --output $(DEMO_OUT) --experiment $(DEMO_EXP)
	$(PY) validate.py data/digits --device cpu \
		--checkpoint $(DEMO_OUT)/$(DEMO_EXP)/model_best.pth.tar --results-file $(DEMO_OUT)/$(DEMO_EXP)/validate.json

demo-args:  # the demo recipe, for scripts (benchmarks/cpu_train_runs.sh)
	@echo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" tests $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_OUT)/$(DEMO_EXP)
