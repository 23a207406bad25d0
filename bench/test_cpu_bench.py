"""CPU regression timings: pytest-benchmark over the callables `bench_logprobs.py --device cpu` times.

    make bench-cpu      # or: python -m pytest -q bench/test_cpu_bench.py --benchmark-json=out.json

The providers (dpo_kernels, in place, torch, torch.compile, TRL, Liger where installed) and the inputs come from
bench/bench_logprobs.py itself; only the shape is smaller (a few rows of the Llama-2 vocabulary, bf16 as that
script's default), so that the whole file runs in well under a minute on the 2-core CI machine. Fixed rounds (no
calibration) keep the run time predictable; compare runs with `pytest-benchmark compare`.
"""

from __future__ import annotations

import pytest
import torch

from bench import bench_logprobs as B

pytest.importorskip("pytest_benchmark")

N, V = 128, 32000  # rows, the Llama-2 vocabulary of bench_logprobs.CPU_SHAPES
DTYPE = "bf16"
ROUNDS = 5
PROVIDERS = B._providers()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return B._inputs(N, V, B.DTYPES[DTYPE], "cpu", 0.0)


@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_logprobs_cpu(benchmark, inputs, name, pass_name):
    fn = PROVIDERS[name]
    if isinstance(fn, str):
        pytest.skip(fn)
    if pass_name == "fwd" and "inplace" in name:
        pytest.skip("the same forward as dpo_kernels")
    logits, labels, grad = inputs
    # as bench_logprobs.run_case: the in-place variant overwrites its input, so it gets a fresh non-leaf buffer
    x = logits.detach().clone().requires_grad_().clone() if "inplace" in name else logits
    if pass_name == "fwd":

        def call():
            with torch.no_grad():
                return fn(x, labels)

    else:
        x.requires_grad_(True)

        def call():
            return torch.autograd.grad(fn(x, labels), x, grad)

    benchmark.group = f"logps {pass_name} {DTYPE} N={N} V={V}"
    benchmark.extra_info.update(pass_name=pass_name, dtype=DTYPE, N=N, V=V, bytes=N * V * logits.element_size())
    try:
        try:
            call()  # warm-up: compilation, extension build
        except Exception as e:  # as bench_logprobs.run_case: a provider that fails here is skipped, saying why
            pytest.skip(f"{name} fails on this shape or device: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        benchmark.pedantic(call, rounds=ROUNDS)
    finally:
        if x.is_leaf:  # the in-place variant's buffer is not
            x.requires_grad_(False)
