# Set-up and entry points. `make demo` and `make test` install what they need first.
#
# If $(PYTHON) already has torch (say a CUDA build), paro is installed into that environment and
# torch is left alone. The test suite runs real diffusers pipelines, so the `pipelines` extra
# (the newest transformers and accelerate) comes with it. Otherwise a local .venv gets the CPU build of torch 2.13.0 and triton 3.9.0
# (whose interpreter runs the kernels on CPU).
PYTHON ?= python3
HAS_TORCH := $(shell $(PYTHON) -c "import torch" 2>/dev/null && echo yes)
ifeq ($(HAS_TORCH),yes)
PY := $(PYTHON)
else
PY := .venv/bin/python
endif
STAMP := .paro-installed
OUT := out

.PHONY: install demo train-demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
ifneq ($(HAS_TORCH),yes)
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 triton==3.9.0
endif
	$(PY) -m pip install -q -e '.[test,pipelines]'
	touch $(STAMP)

demo: install
	mkdir -p $(OUT)
	$(PY) -m paro_cli calibrate --recipe tiny --out $(OUT)/plan.safetensors
	$(PY) -m paro_cli generate --recipe tiny --plan $(OUT)/plan.safetensors --prompt "a red circle moving left on a striped background" --seed 0 --out $(OUT)/demo.mp4
	$(PY) -m paro_cli bench quality --recipe tiny --prompts 2 --plan $(OUT)/plan.safetensors \
		--video $(OUT)/dense_vs_paro.mp4 --heatmaps $(OUT)/heatmaps
	@echo "video: $(OUT)/demo.mp4   dense | paro: $(OUT)/dense_vs_paro.mp4   heat maps: $(OUT)/heatmaps   plan: $(OUT)/plan.safetensors"

# Retrain the embedded demo model (needs a CUDA GPU; about 13 minutes on an H100, in runs of at most 9 that resume).
train-demo: install
	until $(PY) -m paro_cli.demo.train --work runs/demo --steps 12500 --batch 32 --lr 3e-4 --seed 0 --max-minutes 9; \
	do s=$$?; test $$s -eq 75 || exit $$s; done  # 75: stopped at --max-minutes after some progress: resume
	$(PY) -m paro_cli.demo.train --work runs/demo --export paro_cli/demo/weights

test: install
	$(PY) -m pytest -q --durations=15

# ruff's rules and format, configured in pyproject.toml (line length 120)
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(OUT) $(STAMP) .pytest_cache
