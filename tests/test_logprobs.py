"""ops/logprobs.py launchers against the float64 reference (dpo_kernels.reference.token_logps).

All kernel calls of a test run first, then the asserts. Triton 3.9's interpreter runs fp32, bf16
and fp16, so no dtype is skipped; shapes stay tiny there, the real vocabularies are under `gpu`.
"""

import math

import pytest
import torch
from conftest import DEVICE, DTYPES, GRAD_TOL, assert_grad_close, assert_out_close

from dpo_kernels import reference
from dpo_kernels.ops import logprobs as ops

IGNORE = -100
STAT_NAMES = ("entropy", "mean_logit", "is_top1", "log_sum_sq_probs")


def _labels(N: int, V: int, *, ignored: int = 1) -> torch.Tensor:
    """Random labels with the edges: row 0 → column 0, row 1 → column V - 1, the last `ignored` rows
    ignored."""
    labels = torch.randint(0, V, (N,))
    labels[0] = 0
    if N > 1:
        labels[1] = V - 1
    if ignored and N > 2:
        labels[-ignored:] = IGNORE
    return labels.to(DEVICE)


def _logits(N: int, V: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(N, V, device=DEVICE) * scale).to(dtype)


def _run(
    logits,
    labels,
    grad_logps,
    grad_entropy=None,
    *,
    temperature=1.0,
    stats=False,
    inplace=False,
):
    """Forward then backward through the launchers: (logps, lse, stats, dlogits)."""
    logps, lse, st = ops.logprobs_fwd(
        logits,
        labels,
        ignore_index=IGNORE,
        temperature=temperature,
        return_stats=stats or grad_entropy is not None,
    )
    dlogits = ops.logprobs_bwd(
        logits,
        labels,
        lse,
        grad_logps,
        ignore_index=IGNORE,
        temperature=temperature,
        grad_entropy=grad_entropy,
        entropy=None if grad_entropy is None else st[0],
        inplace=inplace,
    )
    return logps, lse, st, dlogits


def _oracle(
    logits,
    labels,
    grad_logps,
    grad_entropy=None,
    *,
    temperature=1.0,
    upcast=torch.float64,
):
    """The reference on `logits` upcast to `upcast` (float64: the oracle; None: plain torch in the
    logits' dtype, which computes in fp32 inside): (logps, lse, stats, dlogits in that dtype)."""
    x = (logits.detach() if upcast is None else logits.detach().to(upcast)).requires_grad_()
    logps, st = reference.token_logps(
        x,
        labels,
        ignore_index=IGNORE,
        temperature=temperature,
        return_stats=True,
    )
    lse = torch.logsumexp(x.detach().double() / temperature, dim=-1)
    loss = (logps * grad_logps.to(logps.dtype)).sum()
    if grad_entropy is not None:
        loss = loss + (st.entropy * grad_entropy.to(logps.dtype)).sum()
    (dlogits,) = torch.autograd.grad(loss, x)
    return logps.detach(), lse, st, dlogits


def _assert_stats_close(st, st_ref):
    """Kernel stats [4, N] against the reference TokenStats (float64)."""
    for k, name in enumerate(STAT_NAMES):
        ref = getattr(st_ref, name).detach().double()
        assert_out_close(st[k], ref, msg=lambda m, name=name: f"stats.{name}: {m}")


# V = 7: a block far smaller than a warp's reach; 100: not a multiple of 16 (no vector loads);
# 1001: odd, spans most of a 1024 block.
SHAPES = [(5, 7), (6, 100), (4, 1001)]
CASES = [pytest.param(N, V, dt, id=f"N{N}-V{V}-{dt}") for N, V in SHAPES for dt in DTYPES]


@pytest.mark.triton
@pytest.mark.parametrize("N, V, dtype", CASES)
def test_logprobs_fwd(N, V, dtype):
    logits, labels = _logits(N, V, DTYPES[dtype]), _labels(N, V)
    logps, lse, st = ops.logprobs_fwd(logits, labels, ignore_index=IGNORE, return_stats=True)
    logps_plain, _, st_none = ops.logprobs_fwd(logits, labels, ignore_index=IGNORE)
    logps_ref, lse_ref, st_ref = _oracle(logits, labels, torch.ones(N, device=DEVICE))[:3]
    scored = labels != IGNORE
    assert logps.dtype == lse.dtype == st.dtype == torch.float32
    assert st.shape == (4, N) and st_none is None
    assert_out_close(logps, logps_ref)
    assert_out_close(logps_plain, logps_ref)
    assert_out_close(lse[scored], lse_ref[scored])
    _assert_stats_close(st, st_ref)
    assert (logps[~scored] == 0).all() and (st[:, ~scored] == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logps", "logps+entropy"])
@pytest.mark.parametrize("N, V, dtype", CASES)
def test_logprobs_bwd(N, V, dtype, entropy_grad):
    logits, labels = _logits(N, V, DTYPES[dtype]), _labels(N, V)
    g = torch.randn(N, device=DEVICE)
    g_h = torch.randn(N, device=DEVICE) if entropy_grad else None
    dlogits = _run(logits, labels, g, g_h)[3]
    d_ref = _oracle(logits, labels, g, g_h)[3]
    d_pt = _oracle(logits, labels, g, g_h, upcast=None)[3]
    assert dlogits.dtype == logits.dtype and dlogits.shape == logits.shape
    assert_grad_close(dlogits, d_ref, d_pt)
    assert (dlogits[labels == IGNORE] == 0).all()


@pytest.mark.triton
def test_logprobs_bwd_entropy_only():
    """grad_logps=None with an entropy gradient (only the entropy is used downstream)."""
    N, V = 4, 100
    logits, labels = _logits(N, V, torch.float32), _labels(N, V)
    g_h = torch.randn(N, device=DEVICE)
    dlogits = _run(logits, labels, None, g_h)[3]
    d_ref = _oracle(logits, labels, torch.zeros(N, device=DEVICE), g_h)[3]
    assert_grad_close(dlogits, d_ref)


@pytest.mark.triton
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_temperature(dtype, temperature):
    N, V = 4, 100
    logits, labels = _logits(N, V, DTYPES[dtype]), _labels(N, V)
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, lse, st, dlogits = _run(logits, labels, g, g_h, temperature=temperature)
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h, temperature=temperature)
    d_pt = _oracle(logits, labels, g, g_h, temperature=temperature, upcast=None)[3]
    scored = labels != IGNORE
    assert_out_close(logps, logps_ref)
    assert_out_close(lse[scored], lse_ref[scored])
    _assert_stats_close(st, st_ref)
    assert_grad_close(dlogits, d_ref, d_pt)


def _small_blocks(block: int):
    """A launch config with BLOCK_V = `block`: many loop iterations over a cheap vocabulary."""

    def config(V, dtype, *, backward=False, stats=False):
        return min(block, 1 << (V - 1).bit_length()), 2

    return config


@pytest.mark.triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("V", [1001, 5000], ids=["V1001-tail", "V5000"])
def test_logprobs_many_blocks(monkeypatch, V, dtype):
    """Rows longer than one block: the online max moves between blocks, the last block is partial,
    and the first argmax must prefer an earlier block on a tie."""
    monkeypatch.setattr(ops, "logprobs_launch_config", _small_blocks(256))
    N = 4
    logits, labels = _logits(N, V, DTYPES[dtype]), _labels(N, V, ignored=0)
    logits[0, :256] -= 30.0  # the first block is far below the rest: its sums get rescaled to ~0
    logits[2, V - 3] = 50.0  # the maximum sits in the partial last block
    labels[2] = V - 3
    # a tie between two blocks: the earlier index is the argmax
    logits[3, 300] = logits[3, 4000 % V] = 40.0
    labels[3] = 4000 % V
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, lse, st, dlogits = _run(logits, labels, g, g_h)
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    _assert_stats_close(st, st_ref)
    assert st[2, 2] == 1.0 and st[2, 3] == 0.0
    assert_grad_close(dlogits, d_ref)


@pytest.mark.triton
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_logprobs_strided_rows(inplace):
    """Rows of a wider tensor (stride(0) != V), as logits[:, :-1] of a [B, T, V] output gives."""
    N, V, pad = 5, 100, 37
    wide = _logits(N, V + pad, torch.bfloat16)
    untouched = wide.clone()
    logits, labels = wide[:, 5 : 5 + V], _labels(N, V)
    assert logits.stride(0) == V + pad
    g = torch.randn(N, device=DEVICE)
    logps_ref, _, _, d_ref = _oracle(logits, labels, g)
    d_pt = _oracle(logits, labels, g, upcast=None)[3]
    logps, _, _, dlogits = _run(logits, labels, g, inplace=inplace)
    assert_out_close(logps, logps_ref)
    assert_grad_close(dlogits, d_ref, d_pt)
    if inplace:
        assert dlogits.data_ptr() == logits.data_ptr() and dlogits.stride() == logits.stride()
        torch.testing.assert_close(wide[:, :5], untouched[:, :5], rtol=0, atol=0)
        torch.testing.assert_close(wide[:, 5 + V :], untouched[:, 5 + V :], rtol=0, atol=0)
    else:
        assert dlogits.is_contiguous()


@pytest.mark.triton
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_inplace(dtype):
    """inplace=True writes the same gradient into the logits' storage and returns the logits."""
    N, V = 4, 100
    logits, labels = _logits(N, V, DTYPES[dtype]), _labels(N, V)
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    dlogits = _run(logits, labels, g, g_h)[3]
    work = logits.clone()
    dlogits_inplace = _run(work, labels, g, g_h, inplace=True)[3]
    assert dlogits_inplace is work
    torch.testing.assert_close(dlogits_inplace, dlogits, rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_logprobs_empty(stats):
    """N = 0 returns empty outputs without launching."""
    logits, labels = (
        _logits(0, 100, torch.bfloat16),
        torch.zeros(0, dtype=torch.long, device=DEVICE),
    )
    logps, lse, st, dlogits = _run(logits, labels, torch.zeros(0, device=DEVICE), stats=stats)
    assert logps.shape == lse.shape == (0,)
    assert dlogits.shape == (0, 100) and dlogits.dtype == torch.bfloat16
    assert (st is None) if not stats else st.shape == (4, 0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_single_row(dtype):
    logits, labels = _logits(1, 1001, DTYPES[dtype]), _labels(1, 1001)
    g, g_h = torch.randn(1, device=DEVICE), torch.randn(1, device=DEVICE)
    logps, lse, st, dlogits = _run(logits, labels, g, g_h)
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    _assert_stats_close(st, st_ref)
    assert_grad_close(dlogits, d_ref)


@pytest.mark.triton
def test_logprobs_all_ignored():
    """Every row ignored: zeros everywhere, the gradient too (written, not left as poison)."""
    N, V = 3, 100
    logits, labels = _logits(N, V, torch.bfloat16), torch.full((N,), IGNORE, device=DEVICE)
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, _, st, dlogits = _run(logits, labels, g, g_h)
    assert (logps == 0).all() and (st == 0).all() and (dlogits == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("ignore_index", [-1, 0], ids=["ignore-1", "ignore0"])
def test_logprobs_ignore_index(ignore_index):
    """Another ignore_index: that label is skipped; -100 is then an out-of-range label (NaN)."""
    N, V = 3, 100
    logits = _logits(N, V, torch.float32)
    labels = torch.tensor([ignore_index, 5, IGNORE], device=DEVICE)
    logps, _, st = ops.logprobs_fwd(logits, labels, ignore_index=ignore_index, return_stats=True)
    ref = torch.log_softmax(logits.double(), -1)[1, 5]
    assert logps[0] == 0 and (st[:, 0] == 0).all()
    assert_out_close(logps[1], ref)
    assert logps[2].isnan() and st[2, 2].isnan()


@pytest.mark.triton
@pytest.mark.parametrize("V", [7, 1001])
def test_logprobs_equal_logits(V):
    """Equal logits: log p = -log V, entropy = log V, log sum p^2 = -log V; only label 0 is the
    first argmax."""
    N = 3
    logits = torch.full((N, V), 2.5, device=DEVICE, dtype=torch.bfloat16)
    labels = torch.tensor([0, V - 1, V // 2], device=DEVICE)
    logps, _, st = ops.logprobs_fwd(logits, labels, return_stats=True)
    log_v = torch.full((N,), math.log(V), dtype=torch.float64)
    assert_out_close(logps, -log_v)
    assert_out_close(st[0], log_v)
    assert_out_close(st[1], torch.full((N,), 2.5, dtype=torch.float64))
    assert st[2].tolist() == [1.0, 0.0, 0.0]
    assert_out_close(st[3], -log_v)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_shift_invariance(dtype):
    """Adding a constant to a row changes nothing. The logits sit on a grid of 1/4 below 16 in
    magnitude, so that they and the shifted ones are exact in every dtype: only the kernel's
    arithmetic differs."""
    N, V = 4, 1001
    logits = ((torch.randn(N, V, device=DEVICE) * 4).round() / 4).clamp(-15, 15)
    shifted = logits + torch.tensor([[32.0], [-48.0], [0.0], [2.0]], device=DEVICE)
    logits, shifted = logits.to(DTYPES[dtype]), shifted.to(DTYPES[dtype])
    labels = _labels(N, V, ignored=0)
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, lse, st, dlogits = _run(logits, labels, g, g_h)
    logps_s, lse_s, st_s, dlogits_s = _run(shifted, labels, g, g_h)
    assert_out_close(logps_s, logps)
    assert_out_close(lse_s - lse, (shifted.double() - logits.double())[:, 0])
    assert_out_close(st_s[[0, 2, 3]], st[[0, 2, 3]])
    assert_grad_close(dlogits_s, dlogits.double())


@pytest.mark.triton
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_extreme_logits(dtype):
    """Logits at ±1e4 (within fp16's range too) and -inf entries, against the float64 oracle."""
    N, V = 5, 100
    logits = torch.randn(N, V, device=DEVICE)
    logits[0] += 1e4  # all near +1e4: log p is small, a difference of numbers near 1e4
    logits[1] -= 1e4
    logits[2, ::2] = 1e4  # half at +1e4, half at -1e4: the latter have p = 0 exactly
    logits[2, 1::2] = -1e4
    logits[3, ::3] = -float("inf")  # -inf entries: p = 0, no NaN in the sums
    logits[4] = -float("inf")  # all -inf but the label: log p = 0, entropy 0
    logits[4, 17] = 3.0
    logits = logits.to(DTYPES[dtype])
    labels = torch.tensor([3, 50, 4, 1, 17], device=DEVICE)
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, lse, st, dlogits = _run(logits, labels, g, stats=True)
    dlogits_h = _run(logits, labels, g, g_h)[3]
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    d_ref_lp = _oracle(logits, labels, g)[3]
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    for k, name in enumerate(STAT_NAMES):
        ref = getattr(st_ref, name).double()
        if name == "mean_logit":  # rows 3 and 4 hold -inf: the mean is -inf there
            assert st[k, 3:].eq(-float("inf")).all()
            ref, st_k = ref[:3], st[k, :3]
        else:
            st_k = st[k]
        assert_out_close(st_k, ref, msg=lambda m, name=name: f"stats.{name}: {m}")
    # The backward recomputes p = exp(z - lse) from the fp32 lse: at |lse| ≈ 1e4 its rounding (half
    # an ulp, 2^-11) is a relative error of p, above fp32's table entry (bf16/fp16 round coarser
    # than that anyway). The entropy term p (z - E z) takes E z = lse - entropy, whose fp32
    # rounding there (2^-10) is an absolute error of z - E z: up to 2^-10 · |g_H| · p in dx.
    tol, tol_h = GRAD_TOL[logits.dtype], GRAD_TOL[logits.dtype]
    if logits.dtype == torch.float32:
        tol = {"atol": tol["atol"], "rtol": 2.0**-11}
        tol_h = {"atol": 2.0**-10 * g_h.abs().max().item(), "rtol": 2.0**-11}
    torch.testing.assert_close(dlogits, d_ref_lp.to(logits.dtype), **tol)
    torch.testing.assert_close(dlogits_h, d_ref.to(logits.dtype), **tol_h)


# The NaN and inf rows make numpy (the interpreter) warn about the very arithmetic under test.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_nan_rows(dtype):
    """A NaN logit, a +inf logit, or a row of -inf only: that row's outputs and gradient are NaN,
    the rows around it are exact."""
    N, V = 6, 100
    logits, labels = _logits(N, V, DTYPES[dtype]), _labels(N, V, ignored=0)
    logits[1, 40] = float("nan")
    logits[2, 70] = float("inf")
    logits[3] = -float("inf")
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, _, st, dlogits = _run(logits, labels, g, g_h)
    good = torch.tensor([0, 4, 5], device=DEVICE)
    logps_ref, _, st_ref, d_ref = _oracle(logits[good], labels[good], g[good], g_h[good])
    bad = torch.tensor([1, 2, 3], device=DEVICE)
    assert logps[bad].isnan().all()
    for k in (0, 2, 3):  # entropy, is_top1, log sum p^2 (the mean of a row with ±inf is ±inf)
        assert st[k, bad].isnan().all(), STAT_NAMES[k]
    assert dlogits[bad].isnan().all()
    assert_out_close(logps[good], logps_ref)
    for k, name in enumerate(STAT_NAMES):
        assert_out_close(st[k, good], getattr(st_ref, name).double())
    assert_grad_close(dlogits[good], d_ref)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_bad_label(dtype):
    """A label outside [0, V) that is not ignore_index: NaN log-prob, is_top1 and gradient row (no
    host sync, no out-of-bounds read); the other rows are exact."""
    N, V = 4, 100
    logits = _logits(N, V, DTYPES[dtype])
    labels = torch.tensor([V, 3, -1, V - 1], device=DEVICE)
    g = torch.randn(N, device=DEVICE)
    logps, _, st, dlogits = _run(logits, labels, g, stats=True)
    good = torch.tensor([1, 3], device=DEVICE)
    logps_ref, _, _, d_ref = _oracle(logits[good], labels[good], g[good])
    assert logps[[0, 2]].isnan().all() and st[2, [0, 2]].isnan().all()
    assert dlogits[[0, 2]].isnan().all()
    assert_out_close(logps[good], logps_ref)
    assert_grad_close(dlogits[good], d_ref)


@pytest.mark.triton
def test_logprobs_top1_ties():
    """TRL's tie rule: the label is top-1 only if no earlier column reaches its logit."""
    V = 100
    logits = torch.zeros(4, V, device=DEVICE)
    logits[:, 10] = logits[:, 60] = 5.0
    labels = torch.tensor([10, 60, 11, IGNORE], device=DEVICE)
    st = ops.logprobs_fwd(logits, labels, return_stats=True)[2]
    assert st[2].tolist() == [1.0, 0.0, 0.0, 0.0]


# GPU only: real vocabularies, a row count that is not a multiple of anything, N·V past 2^31.

GPU_CASES = [
    pytest.param(257, V, dt, id=f"N257-V{V}-{dt}")
    for V in (32000, 128256, 151936)  # Llama-2 / Mistral, Llama-3, Qwen-2
    for dt in ("bf16", "fp32")
]


@pytest.mark.gpu
@pytest.mark.parametrize("N, V, dtype", GPU_CASES)
def test_logprobs_gpu_vocab(N, V, dtype):
    logits, labels = _logits(N, V, DTYPES[dtype]), _labels(N, V, ignored=7)
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, lse, st, dlogits = _run(logits, labels, g, g_h)
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    d_pt = _oracle(logits, labels, g, g_h, upcast=None)[3]
    assert_out_close(logps, logps_ref)
    _assert_stats_close(st, st_ref)
    assert_grad_close(dlogits, d_ref, d_pt)


@pytest.mark.gpu
def test_logprobs_gpu_past_int32_offsets():
    """N·V > 2^31 elements: the last rows start past 2^31 (int64 row offsets)."""
    V = 128256
    N = (1 << 31) // V + 64
    need = N * V * 2 + (2 << 30)  # bf16 logits, gradient in place, slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU")
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    tail = slice(N - 8, N)
    tail_logits = logits[tail].clone()
    logps, lse, _ = ops.logprobs_fwd(logits, labels)
    dlogits = ops.logprobs_bwd(logits, labels, lse, g, inplace=True)
    logps_ref, _, _, d_ref = _oracle(tail_logits, labels[tail], g[tail])
    assert_out_close(logps[tail], logps_ref)
    assert_grad_close(dlogits[tail], d_ref)
