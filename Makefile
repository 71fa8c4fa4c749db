# make setup: create .venv and install requirements.txt
# make demo:  train van_b0 on the built-in digits set on the CPU (a few minutes), then validate the best checkpoint
# make test:  the whole pytest suite (CPU)
# make test-fast: the unit tests only (no subprocess, torchrun or training runs: under 2 minutes)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= output
DEMO_EXP := digits-demo-$(shell date +%Y%m%d-%H%M%S)
# The demo recipe: the reference's AdamW/cosine schedule, with augmentations that suit 8x8 digits at 32 px
# (no flips, mild crops, no RandAugment/mixup/erasing) so that van_b0 reaches >= 97% top-1 in a few minutes.
DEMO_ARGS ?= --model van_b0 --img-size 32 -b 32 --lr 2e-3 --epochs 10 --cooldown-epochs 0 --warmup-epochs 0 --aa none --reprob 0 \
	--mixup 0 --cutmix 0 --smoothing 0 --hflip 0 --scale 0.6 1 --drop-path 0 --workers 2 --log-interval 20

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
	$(PY) validate.py data/digits --model van_b0 --img-size 32 --device cpu -j 2 \
		--checkpoint $(DEMO_OUT)/$(DEMO_EXP)/model_best.pth.tar --results-file $(DEMO_OUT)/$(DEMO_EXP)/validate.json

demo-args:  # the demo recipe, for scripts (benchmarks/cpu_train_runs.sh)
	@echo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" tests $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_OUT)/$(DEMO_EXP)
