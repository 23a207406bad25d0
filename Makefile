# Set-up is part of every target: the first run creates .venv and installs what the target needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# On the CI image this resolves to the CPU build of torch (a local wheel); elsewhere pass the pip arguments that do,
# e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu", or TORCH_SPEC=torch on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv test test-interpret test-gpu lint bench bench-cpu train clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[train,trl,dev,bench,tensorboard,wandb]"
	touch $@

venv: $(VENV)/.installed

# The whole suite on the CPU: Triton kernels through Triton's interpreter (set before triton is imported).
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-interpret: test

# On a GPU machine: the same tests compiled for the card, plus the big shapes marked `gpu`.
test-gpu: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check dpo_kernels tests bench
	$(VENV)/bin/ruff format --check dpo_kernels tests bench

bench: venv
	$(PY) -m bench.bench_logprobs
	$(PY) -m bench.bench_dpo

bench-cpu: venv
	$(PY) -m bench.bench_logprobs --device cpu
	$(PY) -m pytest -q bench/test_cpu_bench.py --benchmark-json=bench/results/cpu-benchmark.json

train: venv
	$(PY) -m dpo_kernels.train

clean:
	rm -rf $(VENV) build *.egg-info
