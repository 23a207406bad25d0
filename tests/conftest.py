"""Everything global to the tests: the one tolerance table, NaN poisoning, offline hub, the device fixture.

The Triton tests run on the CPU through Triton's interpreter: `TRITON_INTERPRET=1` must be in the environment of
the pytest process before triton is first imported (the Makefile sets it); it is not set from here.
"""

import math
import os
import zlib

# Outputs the kernels forget to write come out NaN instead of stale memory (see ops/_config.empty_f32).
os.environ.setdefault("DPO_KERNELS_POISON", "1")
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
# Triton kernels run where there is a GPU, or on the CPU under the interpreter.
TRITON_AVAILABLE = HAS_CUDA or INTERPRET
DEVICE = "cuda" if HAS_CUDA else "cpu"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# --- The tolerance table (STYLE.md §6). Loosening an entry needs a comment that says why. ---
# fp32 outputs (log-probs, lse, sequence sums, losses, metrics) against the float64 reference on the same inputs
# (bf16/fp16 inputs upcast exactly), whatever the input dtype.
OUT_TOL = {"atol": 1e-5, "rtol": 1e-5}
# Gradients, in the input dtype, against the float64 reference gradient rounded to that dtype: one rounding of
# each side apart at most, so the dtype's machine epsilon.
GRAD_TOL = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-6, "rtol": torch.finfo(torch.bfloat16).eps},
    torch.float16: {"atol": 1e-7, "rtol": torch.finfo(torch.float16).eps},
    torch.float64: {"atol": 1e-12, "rtol": 1e-10},
}


def tile_out_tol(dtype: torch.dtype, z_absmax: float) -> dict:
    """OUT_TOL for the tile head's outputs from `dtype` hidden states: its GEMM writes the logits in that dtype, and a
    logit rounded by half an ulp moves a log-prob (and each stat) by at most that much: eps(dtype) · max|z| more
    atol for bf16 / fp16 tiles, nothing more for fp32."""
    if dtype in (torch.float32, torch.float64):
        return OUT_TOL
    return {**OUT_TOL, "atol": OUT_TOL["atol"] + torch.finfo(dtype).eps * z_absmax}


def assert_out_close(out: torch.Tensor, ref: torch.Tensor, **override) -> None:
    """fp32 output vs the float64 reference (OUT_TOL)."""
    tol = {**OUT_TOL, **override}
    torch.testing.assert_close(out.double(), ref.double(), equal_nan=True, **tol)


def lse_rounding_atol(z: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """Elementwise atol to add to GRAD_TOL for a log-prob / entropy gradient of float64 rows z = logits / T.

    The backward recomputes p from the fp32 lse and the entropy term reads the fp32 entropy (README "Numerics"): both
    are off by a few ulps of values up to max|z| + log V, so a gradient entry g · p · (…) / T moves by up to
    |g| · p · eps32 · (max|z| + log V) / T before its rounding to the dtype. That is absolute: where the entry is
    small by cancellation, it is more than an ulp of bf16 or fp16 too. Measured: at most 0.23 of this over 300 draws
    of test_nan_policy's rows; 2× is allowed. `g`: per row, the sum of the |weights| of the log-prob and entropy
    terms."""
    finite = z.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    scale = finite.abs().amax(-1, keepdim=True) + math.log(z.shape[-1])
    p = torch.softmax(z, -1).nan_to_num(0.0)
    return 2 * torch.finfo(torch.float32).eps * g.double().abs()[:, None] * p * scale / temperature


def assert_grad_close(
    out: torch.Tensor, ref: torch.Tensor, out_pt: torch.Tensor | None = None, extra_atol: torch.Tensor | None = None
) -> None:
    """Gradient in its own dtype vs the float64 reference gradient rounded to that dtype (GRAD_TOL, plus the
    elementwise `extra_atol` where given: lse_rounding_atol); with `out_pt` (plain torch in the same dtype) also
    flash-attn's rule: error ≤ 2 · torch's error + atol."""
    tol = GRAD_TOL[out.dtype]
    if extra_atol is None:
        torch.testing.assert_close(out, ref.to(out.dtype), equal_nan=True, **tol)
    else:
        ref_r = ref.to(out.dtype).double()
        err = (out.double() - ref_r).abs()
        allowed = tol["atol"] + tol["rtol"] * ref_r.abs() + extra_atol
        bad = ~((err <= allowed) | (out.isnan() & ref_r.isnan()))
        assert not bad.any(), f"{int(bad.sum())} entries off, worst error / allowed {(err / allowed)[bad].max():.3g}"
    if out_pt is not None:
        err = (out.double() - ref.double()).abs().max().item()
        err_pt = (out_pt.double() - ref.double()).abs().max().item()
        assert err <= 2 * err_pt + tol["atol"], f"max error {err:.3g} > 2 × torch's {err_pt:.3g} + atol"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; `triton` tests need CUDA or the interpreter. Skips say why, never silently."""
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh)"))
        elif "triton" in item.keywords and not TRITON_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU or TRITON_INTERPRET=1"))


@pytest.fixture
def device() -> str:
    return DEVICE


# Fresh random inputs on every run; DPO_KERNELS_SEED=<the seed in the header> replays a run.
RUN_SEED = int(os.environ.get("DPO_KERNELS_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"dpo_kernels: DPO_KERNELS_SEED={RUN_SEED} TRITON_INTERPRET={int(INTERPRET)} cuda={HAS_CUDA}"


def pytest_terminal_summary(terminalreporter):
    """The seed again at the end, where `pytest -q` (make test, CI) shows it: DPO_KERNELS_SEED=<it> replays the run."""
    terminalreporter.write_line(f"dpo_kernels: DPO_KERNELS_SEED={RUN_SEED} replays this run's random inputs")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))


# --- Interpreter workarounds (all of them, here) ---------------------------------------------------------------


def _interpreter_rounds_bf16() -> None:
    """Triton 3.9's interpreter truncates fp32 → bf16 (`.to(tl.bfloat16)`) where the GPU rounds to nearest even;
    make it round like the GPU, so that bf16 outputs are checked as the compiled kernels compute them."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def rounding_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(np.shape(src.data)), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = rounding_cast_impl


def _interpreter_bf16_dot() -> None:
    """Triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits (numpy has no bf16).
    Widen them to fp32 first: exact, like the GPU's bf16 products, summed in fp32."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def bf16_create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), acc, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = bf16_create_dot


if INTERPRET:
    _interpreter_rounds_bf16()
    _interpreter_bf16_dot()


def tile_linear_token_logps(hidden, weight, labels, *, backend="cpu", bias=None, return_stats=False, rows=0,
                            keep_logits=False, deterministic=False, **transform):  # fmt: skip
    """The tile head (chunked.py) through its custom op's autograd on `backend`'s row kernels, with `rows` rows per
    chunk when asked (several chunks at test sizes): (logps, stats [4, N] or None)."""
    from dpo_kernels.custom_ops import linear_logps

    head = dict(rows=rows, keep_logits=keep_logits, deterministic=deterministic)
    logps, stats = linear_logps(hidden, weight, bias, labels, backend, **transform, **head, return_stats=return_stats)
    return logps, (stats if return_stats else None)


@pytest.fixture
def one_thread():
    """One torch thread, as `python -m dpo_kernels.train` does on the CPU (--cpu-threads 1): the tiny model's ops are
    too small to gain from more threads, and lose much when the cores are shared. Files that train use it for every
    test (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
