"""The per-token log-prob launchers (`logprobs_fwd`, `logprobs_bwd`) against the float64 reference
(dpo_kernels.reference.token_logps), for both implementations of that interface:

- `triton`: the Triton kernels of ops/logprobs.py (on the CPU through Triton's interpreter, marked `triton`);
- `cpu`: the native C++ backend of dpo_kernels.cpu (csrc/), which must build: if it does not, its cases fail.

Every test takes the `kernels` fixture (one of the two modules) and the `device` its tensors live on. All kernel
calls of a test run first, then the asserts. Triton 3.9's interpreter runs fp32, bf16 and fp16, so no dtype is
skipped; shapes stay tiny there, the real vocabularies are under `gpu` for Triton (`slow` for the native backend).
What only the native backend has (its build, fallback, operators, threads) is in test_cpu.py.
"""

import math
import sys

import pytest
import torch
from conftest import DEVICE, DTYPES, GRAD_TOL, assert_grad_close, assert_out_close, lse_rounding_atol

from dpo_kernels import cpu, reference
from dpo_kernels.ops import logprobs as triton_ops

IGNORE = -100
STAT_NAMES = ("entropy", "mean_logit", "is_top1", "log_sum_sq_probs")
NAN, INF = float("nan"), float("inf")

TRITON = pytest.param(triton_ops, id="triton", marks=pytest.mark.triton)
CPU = pytest.param(cpu, id="cpu")


@pytest.fixture(params=[TRITON, CPU])
def kernels(request):
    """The launcher module under test. The native backend is built (or loaded from its cache) on first use; a
    failed build fails its cases here rather than testing the reference fallback or skipping."""
    if request.param is cpu and not cpu.available():
        pytest.fail(
            "the native CPU backend is not available: the build failed (see the RuntimeWarning) or "
            "DPO_KERNELS_CPU_BACKEND=reference is set"
        )
    return request.param


@pytest.fixture
def device(kernels) -> str:
    """The native backend takes CPU tensors; Triton runs where conftest says (CUDA, else the interpreter)."""
    return "cpu" if kernels is cpu else DEVICE


# The NaN policy is one for every backend (tests/test_nan_policy.py holds all of it): is_top1 is 0 wherever the
# log-prob is NaN (a bad label, a NaN or +inf logit, a row of -inf only), and mean_logit is NaN there.
TOP1_WHERE_LOGP_NAN = 0.0
MEAN_WHERE_LOGP_NAN = NAN


def _assert_dlogits(dlogits, d_ref, d_pt, logits, g, g_h, temperature=1.0) -> None:
    """The logits' gradient vs the float64 one: GRAD_TOL plus the rounding of the forward's fp32 lse (and entropy)
    that the backward reads (conftest.lse_rounding_atol); for 16-bit logits also flash-attn's rule against plain
    torch in the same dtype (error ≤ 2 · torch's error + atol).

    Not for fp32: there the kernels' error is that fp32 lse's, which torch's autograd does not go through, so a
    draw where torch happens to be very close breaks the rule. It broke for the entropy gradient (6 of 1500 cases
    on the native backend) and for the log-prob gradient alone (seed 303, Triton, N = 1, V = 7: 1.34e-6 against
    2 · 1.5e-7 + 1e-6)."""
    weights = g.abs() + (g_h.abs() if g_h is not None else 0)
    extra = lse_rounding_atol(logits.double() / temperature, weights, temperature)
    assert_grad_close(dlogits, d_ref, None if dlogits.dtype == torch.float32 else d_pt, extra_atol=extra)


def _assert_all(values: torch.Tensor, expected: float, what: str) -> None:
    """Every entry equals `expected` (NaN included)."""
    torch.testing.assert_close(
        values, torch.full_like(values, expected), rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _labels(N: int, V: int, device, *, ignored: int = 1, p_ignore: float = 0.0) -> torch.Tensor:
    """Random labels with the edges: row 0 → column 0, row 1 → column V - 1, the last `ignored` rows ignored and,
    with `p_ignore`, others ignored at random in between."""
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < p_ignore] = IGNORE
    if N > 0:
        labels[0] = 0
    if N > 1:
        labels[1] = V - 1
    if ignored and N > 2:
        labels[-ignored:] = IGNORE
    return labels.to(device)


def _logits(N: int, V: int, dtype: torch.dtype, device, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(N, V, device=device) * scale).to(dtype)


def _run(
    kernels,
    logits,
    labels,
    grad_logps,
    grad_entropy=None,
    *,
    temperature=1.0,
    stats=False,
    inplace=False,
    ignore_index=IGNORE,
):
    """Forward then backward through the launchers: (logps, lse, stats, dlogits)."""
    logps, lse, st = kernels.logprobs_fwd(
        logits,
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        return_stats=stats or grad_entropy is not None,
    )
    dlogits = kernels.logprobs_bwd(
        logits,
        labels,
        lse,
        grad_logps,
        ignore_index=ignore_index,
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
    ignore_index=IGNORE,
):
    """The reference on `logits` upcast to `upcast` (float64: the oracle; None: plain torch in the
    logits' dtype, which computes in fp32 inside): (logps, lse, stats, dlogits in that dtype)."""
    x = (logits.detach() if upcast is None else logits.detach().to(upcast)).requires_grad_()
    logps, st = reference.token_logps(
        x,
        labels,
        ignore_index=ignore_index,
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
    """Kernel stats [4, N] against the reference TokenStats (float64); is_top1 exactly."""
    for k, name in enumerate(STAT_NAMES):
        ref = getattr(st_ref, name).detach().double()
        tol = {"rtol": 0, "atol": 0} if name == "is_top1" else {}
        assert_out_close(st[k], ref, msg=lambda m, name=name: f"stats.{name}: {m}", **tol)


# V = 7: a block far smaller than a warp's reach or a vector (N = 1: one row); 100: not a multiple of 16 (no vector
# loads); 1001: odd, spans most of a 1024 block; 2049: one past a 2048-value block (the native chunk, Triton's fp32
# backward block); 5000: several blocks and a ragged last one, and 9 rows make two native tasks of 6 and 3 rows
# (csrc/logprobs.cpp: at least 32768 // V rows per task).
SHAPES = [(1, 7), (5, 7), (6, 100), (7, 1001), (5, 2049), (9, 5000)]
CASES = [pytest.param(N, V, dt, id=f"N{N}-V{V}-{dt}") for N, V in SHAPES for dt in DTYPES]


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("N, V, dtype", CASES)
def test_logprobs_fwd(kernels, device, N, V, dtype, temperature):
    logits, labels = _logits(N, V, DTYPES[dtype], device), _labels(N, V, device, p_ignore=0.25)
    opts = dict(ignore_index=IGNORE, temperature=temperature)
    logps, lse, st = kernels.logprobs_fwd(logits, labels, return_stats=True, **opts)
    logps_plain, lse_plain, st_none = kernels.logprobs_fwd(logits, labels, **opts)
    logps_ref, lse_ref, st_ref = _oracle(logits, labels, torch.ones(N, device=device), temperature=temperature)[:3]
    scored = labels != IGNORE
    assert logps.dtype == lse.dtype == st.dtype == torch.float32
    assert st.shape == (4, N) and st_none is None
    assert_out_close(logps, logps_ref)
    assert_out_close(logps_plain, logps_ref)
    assert_out_close(lse[scored], lse_ref[scored])
    assert_out_close(lse_plain[scored], lse_ref[scored])
    _assert_stats_close(st, st_ref)
    assert (logps[~scored] == 0).all() and (st[:, ~scored] == 0).all()
    if kernels is cpu:
        # The native forward runs the same loop with or without stats; Triton picks a narrower block with stats
        # (another summation order, e.g. fp16 at V = 5000), so there the two only agree within OUT_TOL.
        assert torch.equal(logps_plain, logps) and torch.equal(lse_plain[scored], lse[scored])


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logps", "logps+entropy"])
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
@pytest.mark.parametrize("N, V, dtype", CASES)
def test_logprobs_bwd(kernels, device, N, V, dtype, temperature, entropy_grad):
    logits, labels = _logits(N, V, DTYPES[dtype], device), _labels(N, V, device, p_ignore=0.25)
    g = torch.randn(N, device=device)
    g_h = torch.randn(N, device=device) if entropy_grad else None
    dlogits = _run(kernels, logits, labels, g, g_h, temperature=temperature)[3]
    d_ref = _oracle(logits, labels, g, g_h, temperature=temperature)[3]
    d_pt = _oracle(logits, labels, g, g_h, temperature=temperature, upcast=None)[3]
    assert dlogits.dtype == logits.dtype and dlogits.shape == logits.shape and dlogits.is_contiguous()
    _assert_dlogits(dlogits, d_ref, d_pt, logits, g, g_h, temperature)
    assert (dlogits[labels == IGNORE] == 0).all()


def test_logprobs_bwd_partial_grads(kernels, device):
    """grad_logps=None with an entropy gradient (only the entropy is used downstream), and neither: zeros (written,
    not left as poison)."""
    N, V = 7, 300
    logits, labels = _logits(N, V, torch.float32, device), _labels(N, V, device)
    g_h = torch.randn(N, device=device)
    dlogits = _run(kernels, logits, labels, None, g_h)[3]
    _, lse, _ = kernels.logprobs_fwd(logits, labels)
    zeros = kernels.logprobs_bwd(logits, labels, lse, None)
    d_ref = _oracle(logits, labels, torch.zeros(N, device=device), g_h)[3]
    assert_grad_close(dlogits, d_ref)
    assert (zeros == 0).all()


def _bwd_on_saved(logits, labels, lse, entropy, grad_logps, grad_entropy, temperature):
    """The backward's formula in float64 on the forward's own fp32 lse and entropy: the backward alone, exactly.
    (Against the float64 lse, half an fp32 ulp of an lse of 16-20 at T = 0.5 is a 1e-6 relative error of p that
    reaches dx above GRAD_TOL's fp32 atol for about one seed in ten: an error of the interface's fp32 lse, which
    the forward tests bound, not of the backward.)"""
    scored = labels != IGNORE
    z = logits.double() / temperature
    p = torch.exp(z - lse.double()[:, None])
    onehot = torch.zeros_like(p)
    onehot[scored, labels[scored]] = 1.0
    d = grad_logps.double()[:, None] * (onehot - p)
    d -= grad_entropy.double()[:, None] * p * (z - (lse.double() - entropy.double())[:, None])
    return (d / temperature).masked_fill(~scored[:, None], 0.0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_temperature(kernels, device, dtype, temperature):
    N, V = 4, 100
    logits, labels = _logits(N, V, DTYPES[dtype], device), _labels(N, V, device)
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, g_h, temperature=temperature)
    logps_ref, lse_ref, st_ref, _ = _oracle(logits, labels, g, g_h, temperature=temperature)
    scored = labels != IGNORE
    assert_out_close(logps, logps_ref)
    assert_out_close(lse[scored], lse_ref[scored])
    _assert_stats_close(st, st_ref)
    d_saved = _bwd_on_saved(logits, labels, lse, st[0], g, g_h, temperature)
    # the fp32 arithmetic of the backward itself (z − E z with E z ≈ |z|) carries the same kind of error
    extra = lse_rounding_atol(logits.double() / temperature, g.abs() + g_h.abs(), temperature)
    assert_grad_close(dlogits, d_saved, extra_atol=extra)


def _small_blocks(block: int):
    """A Triton launch config with BLOCK_V = `block`: many loop iterations over a cheap vocabulary."""

    def config(V, dtype, *, backward=False, stats=False):
        return min(block, 1 << (V - 1).bit_length()), 2

    return config


NATIVE_CHUNK = 2048  # csrc/logprobs.cpp CHUNK: the native forward's rows go in pieces of this many values


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("V", [1001, 2049, 5000], ids=["V1001", "V2049", "V5000"])
def test_logprobs_many_blocks(kernels, device, monkeypatch, V, dtype):
    """Rows longer than one block (Triton: forced to 256 columns; native: its 2048-value chunks): the online max
    moves between blocks, the last block is partial, and the first argmax must prefer an earlier block on a tie."""
    if kernels is triton_ops:
        monkeypatch.setattr(triton_ops, "logprobs_launch_config", _small_blocks(256))
    block = 256 if kernels is triton_ops else NATIVE_CHUNK
    N = 4
    logits, labels = _logits(N, V, DTYPES[dtype], device), _labels(N, V, device, ignored=0)
    logits[0, :block] -= 30.0  # the first block is far below the rest: its sums get rescaled to ~0
    top = max(V - 3, (V - 1) // block * block)  # the maximum sits in the partial last block
    logits[2, top] = 50.0
    labels[2] = top
    # a tie between two blocks: the earlier index is the argmax
    logits[3, 300] = logits[3, 4000 % V] = 40.0
    labels[3] = 4000 % V
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, g_h)
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    _assert_stats_close(st, st_ref)
    assert st[2, 2] == 1.0 and st[2, 3] == 0.0
    assert_grad_close(dlogits, d_ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_strided_rows(kernels, device, dtype):
    """Rows of a wider tensor (stride(0) != V), as logits[:, :-1] of a [B, T, V] output gives: read where they
    are (the same bits as a contiguous copy), and the in-place gradient lands in the view without touching the
    columns on either side."""
    N, V, pad = 11, 1001, 37
    wide = _logits(N, V + pad, DTYPES[dtype], device)
    untouched = wide.clone()
    logits, labels = wide[:, 5 : 5 + V], _labels(N, V, device)
    assert logits.stride(0) == V + pad
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps_ref, _, _, d_ref = _oracle(logits, labels, g)
    d_pt = _oracle(logits, labels, g, upcast=None)[3]
    logps, lse, st, dlogits = strided = _run(kernels, logits, labels, g, stats=True)
    contiguous = _run(kernels, logits.contiguous(), labels, g, stats=True)
    dlogits_h = kernels.logprobs_bwd(logits, labels, lse, g, grad_entropy=g_h, entropy=st[0])
    inplace = {}  # each gradient in place, into a fresh copy of the wide buffer
    for name, grad_entropy, out in (("logps", None, dlogits), ("logps+entropy", g_h, dlogits_h)):
        buffer = untouched.clone()
        view = buffer[:, 5 : 5 + V]
        opts = dict(grad_entropy=grad_entropy, entropy=None if grad_entropy is None else st[0], inplace=True)
        inplace[name] = (out, buffer, view, kernels.logprobs_bwd(view, labels, lse, g, **opts))
    assert_out_close(logps, logps_ref)
    assert_grad_close(dlogits, d_ref, d_pt)
    assert dlogits.is_contiguous()
    for name, out, out_c in zip(("logps", "lse", "stats", "dlogits"), strided, contiguous):
        assert torch.equal(out, out_c), name
    for name, (out, buffer, view, out_inplace) in inplace.items():
        assert out_inplace.data_ptr() == view.data_ptr() and out_inplace.stride() == view.stride(), name
        assert torch.equal(out_inplace, out), name
        torch.testing.assert_close(buffer[:, :5], untouched[:, :5], rtol=0, atol=0)
        torch.testing.assert_close(buffer[:, 5 + V :], untouched[:, 5 + V :], rtol=0, atol=0)


@pytest.mark.parametrize("V", [100, 5000])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_inplace(kernels, device, dtype, V):
    """inplace=True writes the same gradient (bit for bit) into the logits' storage and returns the logits."""
    N = 8
    logits, labels = _logits(N, V, DTYPES[dtype], device), _labels(N, V, device)
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    _, lse, st = kernels.logprobs_fwd(logits, labels, return_stats=True)
    outputs = []
    for grad_entropy in (None, g_h):
        opts = dict(grad_entropy=grad_entropy, entropy=None if grad_entropy is None else st[0])
        work = logits.clone()
        dlogits = kernels.logprobs_bwd(logits, labels, lse, g, **opts)
        outputs.append((dlogits, work, kernels.logprobs_bwd(work, labels, lse, g, inplace=True, **opts)))
    for dlogits, work, dlogits_inplace in outputs:
        assert dlogits_inplace is work
        torch.testing.assert_close(dlogits_inplace, dlogits, rtol=0, atol=0)


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_logprobs_empty(kernels, device, stats):
    """N = 0 returns empty outputs without launching."""
    logits, labels = _logits(0, 100, torch.bfloat16, device), torch.zeros(0, dtype=torch.long, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, torch.zeros(0, device=device), stats=stats)
    assert logps.shape == lse.shape == (0,)
    assert dlogits.shape == (0, 100) and dlogits.dtype == torch.bfloat16
    assert (st is None) if not stats else st.shape == (4, 0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_single_row(kernels, device, dtype):
    logits, labels = _logits(1, 1001, DTYPES[dtype], device), _labels(1, 1001, device)
    g, g_h = torch.randn(1, device=device), torch.randn(1, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, g_h)
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    _assert_stats_close(st, st_ref)
    assert_grad_close(dlogits, d_ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_all_ignored(kernels, device, dtype):
    """Every row ignored: zeros everywhere, the gradient too (written, not left as poison)."""
    N, V = 3, 100
    logits, labels = _logits(N, V, DTYPES[dtype], device), torch.full((N,), IGNORE, device=device)
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, _, st, dlogits = _run(kernels, logits, labels, g, g_h)
    dlogits_plain = _run(kernels, logits, labels, g)[3]
    assert (logps == 0).all() and (st == 0).all() and (dlogits == 0).all() and (dlogits_plain == 0).all()


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 5], ids=lambda i: f"ignore{i}")
def test_logprobs_ignore_index(kernels, device, ignore_index):
    """Any ignore_index, also one that is a valid class: those rows are skipped (zeros, zero gradient); -100 is
    then an out-of-range label (NaN log-prob and gradient row)."""
    N, V = 12, 100
    logits = _logits(N, V, torch.float32, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[::3] = ignore_index
    labels[1] = IGNORE
    g = torch.randn(N, device=device)
    opts = dict(ignore_index=ignore_index)
    logps, _, st, dlogits = _run(kernels, logits, labels, g, stats=True, **opts)
    bad = (labels == IGNORE) & (labels != ignore_index)
    ok = ~bad
    logps_ref, _, st_ref, d_ref = _oracle(logits[ok], labels[ok], g[ok], **opts)
    ignored = labels == ignore_index
    assert (logps[ignored] == 0).all() and (st[:, ignored] == 0).all() and (dlogits[ignored] == 0).all()
    assert_out_close(logps[ok], logps_ref)
    _assert_stats_close(st[:, ok], st_ref)
    assert_grad_close(dlogits[ok], d_ref)
    assert bad.sum() == (0 if ignore_index == IGNORE else 1)
    assert logps[bad].isnan().all() and dlogits[bad].isnan().all()
    _assert_all(st[2, bad], TOP1_WHERE_LOGP_NAN, "is_top1 at a bad label")
    _assert_all(st[[0, 1, 3]][:, bad], NAN, "entropy, mean_logit, log_sum_sq_probs at a bad label")


@pytest.mark.parametrize("V", [7, 1001, 3000])
def test_logprobs_equal_logits(kernels, device, V):
    """Equal logits: log p = -log V, entropy = log V, log sum p^2 = -log V; only label 0 is the
    first argmax."""
    N = 3
    logits = torch.full((N, V), 2.5, device=device, dtype=torch.bfloat16)
    labels = torch.tensor([0, V - 1, V // 2], device=device)
    logps, _, st = kernels.logprobs_fwd(logits, labels, return_stats=True)
    log_v = torch.full((N,), math.log(V), dtype=torch.float64, device=device)
    assert_out_close(logps, -log_v, atol=1e-6, rtol=0)  # a sum of V ones is exact: log V within an fp32 ulp
    assert_out_close(st[0], log_v)
    assert_out_close(st[1], torch.full((N,), 2.5, dtype=torch.float64, device=device))
    assert st[2].tolist() == [1.0, 0.0, 0.0]
    assert_out_close(st[3], -log_v)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_shift_invariance(kernels, device, dtype):
    """Adding a constant to a row changes nothing. The logits sit on a grid of 1/4 below 16 in
    magnitude, so that they and the shifted ones are exact in every dtype: only the kernel's
    arithmetic differs."""
    N, V = 4, 1001
    logits = ((torch.randn(N, V, device=device) * 4).round() / 4).clamp(-15, 15)
    shifted = logits + torch.tensor([[32.0], [-48.0], [0.0], [2.0]], device=device)
    logits, shifted = logits.to(DTYPES[dtype]), shifted.to(DTYPES[dtype])
    labels = _labels(N, V, device, ignored=0)
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, g_h)
    logps_s, lse_s, st_s, dlogits_s = _run(kernels, shifted, labels, g, g_h)
    assert_out_close(logps_s, logps)
    assert_out_close(lse_s - lse, (shifted.double() - logits.double())[:, 0])
    assert_out_close(st_s[[0, 2, 3]], st[[0, 2, 3]])
    assert_grad_close(dlogits_s, dlogits.double())


@pytest.mark.parametrize("V", [100, 3000])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_extreme_logits(kernels, device, dtype, V):
    """Logits at ±1e4 (within fp16's range too) and -inf entries (a masked vocabulary), against the float64
    oracle; -inf entries get exactly zero gradient."""
    N = 6
    logits = torch.randn(N, V, device=device)
    logits[0] += 1e4  # all near +1e4: log p is small, a difference of numbers near 1e4
    logits[1] -= 1e4
    logits[2, ::2] = 1e4  # half at +1e4, half at -1e4: the latter have p = 0 exactly
    logits[2, 1::2] = -1e4
    logits[3, ::3] = -INF  # -inf entries: p = 0, no NaN in the sums
    logits[4] = -INF  # all -inf but the label: log p = 0, entropy 0
    logits[4, 17] = 3.0
    logits[5] = 1e4  # all equal at 1e4: log p = -log V
    logits = logits.to(DTYPES[dtype])
    labels = torch.tensor([3, 50, 4, 1, 17, V - 1], device=device)
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, stats=True)
    dlogits_h = _run(kernels, logits, labels, g, g_h)[3]
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    d_ref_lp = _oracle(logits, labels, g)[3]
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    for k, name in enumerate(STAT_NAMES):
        ref = getattr(st_ref, name).double()
        if name == "mean_logit":  # rows 3 and 4 hold -inf: the mean is -inf there
            assert st[k, 3:5].eq(-INF).all()
            ref, st_k = ref[[0, 1, 2, 5]], st[k, [0, 1, 2, 5]]
        else:
            st_k = st[k]
        assert_out_close(st_k, ref, msg=lambda m, name=name: f"stats.{name}: {m}")
    # The backward recomputes p = exp(z - lse) from the fp32 lse: at |lse| ≈ 1e4 its rounding (half
    # an ulp, 2^-11) is a relative error of p, above fp32's table entry (bf16/fp16 round coarser
    # than that anyway). The entropy term p (z - E z) takes E z = lse - entropy, whose fp32
    # rounding there (2^-10) is an absolute error of z - E z: up to 2^-10 · |g_H| · p in dx.
    # The interface's fp32 lse and entropy set this limit for both backends alike (csrc/README.md).
    tol, tol_h = GRAD_TOL[logits.dtype], GRAD_TOL[logits.dtype]
    if logits.dtype == torch.float32:
        tol = {"atol": tol["atol"], "rtol": 2.0**-11}
        tol_h = {"atol": 2.0**-10 * g_h.abs().max().item(), "rtol": 2.0**-11}
    torch.testing.assert_close(dlogits, d_ref_lp.to(logits.dtype), **tol)
    torch.testing.assert_close(dlogits_h, d_ref.to(logits.dtype), **tol_h)
    masked = torch.isinf(logits) & (logits < 0)
    assert torch.isfinite(dlogits).all() and torch.isfinite(dlogits_h).all()
    assert (dlogits[masked] == 0).all() and (dlogits_h[masked] == 0).all()


# The NaN and inf rows make numpy (the interpreter) warn about the very arithmetic under test.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("V", [100, 3000])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_nan_rows(kernels, device, dtype, V):
    """A NaN logit, a +inf logit, or a row of -inf only: that row's outputs and gradient are NaN,
    the rows around it are exact. At V = 3000 the NaN sits in the native backend's second chunk."""
    N = 6
    logits, labels = _logits(N, V, DTYPES[dtype], device), _labels(N, V, device, ignored=0)
    logits[1, V * 5 // 6] = NAN
    logits[2, V * 7 // 10] = INF
    logits[3] = -INF
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, g_h)
    good = torch.tensor([0, 4, 5], device=device)
    logps_ref, _, st_ref, d_ref = _oracle(logits[good], labels[good], g[good], g_h[good])
    bad = torch.tensor([1, 2, 3], device=device)
    assert logps[bad].isnan().all() and lse[bad].isnan().all()
    for k in (0, 3):  # entropy, log sum p^2
        assert st[k, bad].isnan().all(), STAT_NAMES[k]
    _assert_all(st[2, bad], TOP1_WHERE_LOGP_NAN, "is_top1 of a NaN row")
    _assert_all(st[1, bad], MEAN_WHERE_LOGP_NAN, "mean_logit of a NaN row")
    assert dlogits[bad].isnan().all()
    assert_out_close(logps[good], logps_ref)
    for k, name in enumerate(STAT_NAMES):
        assert_out_close(st[k, good], getattr(st_ref, name).double())
    assert_grad_close(dlogits[good], d_ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_bad_label(kernels, device, dtype):
    """A label outside [0, V) that is not ignore_index: NaN log-prob and gradient row (no host sync, no
    out-of-bounds read); the other rows are exact."""
    N, V = 5, 100
    logits = _logits(N, V, DTYPES[dtype], device)
    labels = torch.tensor([V, 3, -1, V - 1, -5], device=device)
    g = torch.randn(N, device=device)
    logps, _, st, dlogits = _run(kernels, logits, labels, g, stats=True)
    good, bad = torch.tensor([1, 3], device=device), torch.tensor([0, 2, 4], device=device)
    logps_ref, _, _, d_ref = _oracle(logits[good], labels[good], g[good])
    assert logps[bad].isnan().all() and dlogits[bad].isnan().all()
    _assert_all(st[2, bad], TOP1_WHERE_LOGP_NAN, "is_top1 at a bad label")
    _assert_all(st[[0, 1, 3]][:, bad], NAN, "entropy, mean_logit, log_sum_sq_probs at a bad label")
    assert_out_close(logps[good], logps_ref)
    assert_grad_close(dlogits[good], d_ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logprobs_inf_label_entropy_grad(kernels, device, dtype):
    """A -inf logit at the label of a finite row, with a differentiated entropy: log-prob -inf, a finite gradient
    (g (1 - 0) at the label, no 0 · -inf from the entropy term), exact against the oracle."""
    N, V = 3, 100
    logits = _logits(N, V, DTYPES[dtype], device)
    labels = torch.tensor([7, 0, V - 1], device=device)
    logits[0, 7] = -INF
    logits[2, ::4] = -INF
    logits[2, V - 1] = -INF
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, _, st, dlogits = _run(kernels, logits, labels, g, g_h)
    logps_ref, _, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    assert logps[[0, 2]].eq(-INF).all()
    assert_out_close(logps, logps_ref)
    _assert_stats_close(st, st_ref)
    assert torch.isfinite(dlogits).all()
    assert_grad_close(dlogits, d_ref)


# Finite logits of every size, each case one that an earlier version got wrong: Triton's t = x log2(e)/T - c
# with c = fp32(m log2(e)/T) left the rounding of c (up to 2^7 at 2e9) in the exponent (2^t = inf), its -1e30
# start of the running max made a row below -1e30 +inf, its log-prob overflowed in log2 units; the native
# backend's Σx overflowed, its lse = m + log l lost log l next to a huge m, and its backward took exp of
# positive arguments (the rounding of a huge lse) without a clamp.
EXTREMES = {  # name: (row builder, temperature)
    "2e9": (lambda V: 2e9 + 256.0 * torch.arange(V).flip(0), 1.0),
    "below-1e30": (lambda V: -1e31 * (1 + torch.rand(V)), 1.0),
    "fp32-max": (lambda V: torch.full((V,), 3e38), 1.0),
    "both-signs-1e38": (lambda V: 1e38 * torch.randn(V).clamp(-3, 3), 1.0),
    "T-2^-30": (lambda V: 3.0 * torch.randn(V), 2.0**-30),
    "offset-1e17": (lambda V: 1e17 + 2.0**40 * torch.arange(V), 2.0**40),  # z = 90949 + j
    "ties-1e17": (lambda V: torch.full((V,), 1e17), 1.0),  # log p = -log V next to a max of 1e17
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", list(EXTREMES))
def test_logprobs_extreme_finite_logits(kernels, device, case):
    """Finite z = logits / T of any size (fp32 inputs): log-prob, lse and stats within the table of the float64
    oracle; the log-prob gradient finite and bounded by |g| / T (its accuracy is the fp32 lse's: not asserted)."""
    N, V = 3, 100
    build, temperature = EXTREMES[case]
    logits = torch.stack([build(V) for _ in range(N)]).float().to(device)
    labels = torch.tensor([0, 1, V - 1], device=device)
    g = torch.randn(N, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, stats=True, temperature=temperature)
    logps_ref, lse_ref, st_ref, _ = _oracle(logits, labels, g, temperature=temperature)
    assert_out_close(logps, logps_ref.float())  # the fp32 output of a value below fp32's range is -inf
    assert_out_close(lse, lse_ref)
    for k, name in enumerate(STAT_NAMES):
        ref = getattr(st_ref, name).double()
        if name == "mean_logit":  # an fp32 sum: its error is relative to mean |z|
            z_abs = (logits.double() / temperature).abs().mean(-1)
            torch.testing.assert_close(st[k].double(), ref, rtol=1e-5, atol=(1e-5 * z_abs).max().item())
        else:
            assert_out_close(st[k], ref, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.isfinite(dlogits).all()
    assert (dlogits.double().abs() <= g.double().abs()[:, None] / temperature * (1 + 1e-6)).all()


@pytest.mark.parametrize("V", [100, 5000])
def test_logprobs_top1_ties(kernels, device, V):
    """TRL's tie rule: the label is top-1 only if no earlier column reaches its logit, also across blocks (at
    V = 5000 the third tie is in another Triton block and native chunk); a strictly larger later maximum takes
    over."""
    later = V * 3 // 5 + 1
    logits = torch.zeros(6, V, device=device)
    logits[:, [3, 7, later]] = 5.0
    labels = torch.tensor([3, 7, later, 0, IGNORE, V - 1], device=device)
    st = kernels.logprobs_fwd(logits, labels, return_stats=True)[2]
    logits[:, later] = 6.0
    st_later = kernels.logprobs_fwd(logits, labels, return_stats=True)[2]
    assert st[2].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert st_later[2].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


# Partial mode (dpo_kernels.parallel): one vocabulary shard's per-row partials, and the shard's gradient from the
# whole rows' lse and entropy. The oracle is float64 math on the shard's columns and the full rows.


def _partials_oracle(logits, labels, start, stop, temperature):
    """parallel.PARTIALS of the columns [start, stop) in float64: max, Σe, label's z (owned), Σe(z − m), Σe², Σz / V,
    max of z before the label's column (−inf if none); 0 at ignored rows."""
    V = logits.shape[-1]
    z = logits.double() / temperature
    shard = z[:, start:stop]
    m = shard.amax(1)
    e = (shard - m[:, None]).exp()
    owned = (labels >= start) & (labels < stop)
    label_z = torch.where(owned, z.gather(1, labels.clamp(0, V - 1)[:, None]).squeeze(1), 0.0)
    cols = torch.arange(start, stop, device=logits.device)
    before = torch.where(cols[None] < labels[:, None], shard, -math.inf).amax(1)
    rows = torch.stack([m, e.sum(1), label_z, (e * (shard - m[:, None])).sum(1), (e * e).sum(1), shard.sum(1) / V,
                        before])  # fmt: skip
    return torch.where(labels == IGNORE, 0.0, rows)


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("V, start, stop", [(100, 0, 40), (100, 40, 100), (2049, 23, 2049), (5000, 1000, 4100)])
def test_logprobs_partial_fwd(kernels, device, V, start, stop, dtype, stats):
    """Labels before, inside and after the shard; ties across its edges (is_top1's bound); V = 5000: several blocks."""
    N = 8
    logits = _logits(N, V, dtype, device)
    labels = _labels(N, V, device)
    labels[2:5] = torch.tensor([start, stop - 1, (start + stop) // 2])
    logits[5, [max(start - 1, 0), start]] = 10.0  # a tie across the shard's first edge, the label on its later side
    labels[5] = start
    out = kernels.logprobs_partial_fwd(logits[:, start:stop], labels, vocab_start=start, vocab_size=V,
                                       temperature=0.7, return_stats=stats)  # fmt: skip
    ref = _partials_oracle(logits, labels, start, stop, 0.7)
    assert out.shape == (7 if stats else 3, N) and out.dtype == torch.float32
    assert_out_close(out, ref[: out.shape[0]])


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["dlogp", "dlogp+dentropy"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("V, start, stop", [(100, 0, 40), (100, 40, 100), (5000, 1000, 4100)])
def test_logprobs_bwd_sharded(kernels, device, V, start, stop, dtype, entropy_grad):
    """The shard's gradient from the whole rows' lse and entropy: the float64 gradient's columns [start, stop); the
    label's one-hot only where the shard holds it; a bad label's NaN row comes from its NaN lse."""
    N = 7
    logits, labels = _logits(N, V, dtype, device), _labels(N, V, device)
    labels[2:4] = torch.tensor([start, stop - 1])
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device) if entropy_grad else None
    _, lse, st, d_ref = _oracle(logits, labels, g, g_h, temperature=0.7)
    lse = torch.where(labels == IGNORE, 0.0, lse).float()
    lse[4] = NAN  # as the combine writes it for a bad label (or a NaN row)
    entropy = dict(grad_entropy=g_h, entropy=st.entropy.detach().float()) if entropy_grad else {}
    local = logits[:, start:stop]
    dlocal = kernels.logprobs_bwd(local, labels, lse, g, temperature=0.7, vocab_start=start, **entropy)
    in_place = kernels.logprobs_bwd(local.clone(), labels, lse, g, temperature=0.7, vocab_start=start,
                                    inplace=True, **entropy)  # fmt: skip
    assert torch.isnan(dlocal[4]).all()
    rows = torch.arange(N, device=device) != 4
    assert_grad_close(dlocal[rows], d_ref[rows, start:stop])
    torch.testing.assert_close(in_place, dlocal, rtol=0, atol=0, equal_nan=True)


# Real vocabularies, a row count that is not a multiple of anything, N·V past 2^31: on a GPU for Triton; the
# native backend runs them on any machine, as slow tests.
BIG = [
    pytest.param(triton_ops, id="triton", marks=[pytest.mark.triton, pytest.mark.gpu]),
    pytest.param(cpu, id="cpu", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("V", [32000, 128256, 151936])  # Llama-2 / Mistral, Llama-3, Qwen-2
@pytest.mark.parametrize("kernels", BIG, indirect=True)
def test_logprobs_real_vocab(kernels, device, V, dtype):
    # On two CPU cores the float64 oracle takes about 10 s per case at 257 rows: the native backend gets 17.
    N = 257 if kernels is triton_ops else 17
    logits, labels = _logits(N, V, DTYPES[dtype], device), _labels(N, V, device, ignored=7)
    g, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    logps, lse, st, dlogits = _run(kernels, logits, labels, g, g_h)
    logps_ref, lse_ref, st_ref, d_ref = _oracle(logits, labels, g, g_h)
    d_pt = _oracle(logits, labels, g, g_h, upcast=None)[3]
    assert_out_close(logps, logps_ref)
    _assert_stats_close(st, st_ref)
    _assert_dlogits(dlogits, d_ref, d_pt, logits, g, g_h)


def _free_memory(device) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    if sys.platform.startswith("linux"):
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    return 0


@pytest.mark.parametrize("kernels", BIG, indirect=True)
def test_logprobs_past_int32_offsets(kernels, device):
    """N·V > 2^31 elements: the last rows start past 2^31 (int64 row offsets)."""
    V = 128256
    N = (1 << 31) // V + 64
    need = N * V * 2 + (2 << 30)  # bf16 logits, gradient in place, slack
    if _free_memory(device) < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on {device}")
    # The rows repeat a random block of 64 (drawing 2^31 random numbers takes long on a CPU) up to the last few,
    # which are fresh: a wrapped row offset would read other values than the checked last rows hold.
    logits = torch.empty(N, V, device=device, dtype=torch.bfloat16)
    head = N // 64 * 64
    logits[:head].view(-1, 64, V).copy_(_logits(64, V, torch.bfloat16, device, scale=1.0).expand(head // 64, 64, V))
    logits[head:] = _logits(N - head, V, torch.bfloat16, device, scale=1.0)
    tail = slice(N - 8, N)
    labels = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    tail_logits = logits[tail].clone()
    logps, lse, _ = kernels.logprobs_fwd(logits, labels)
    dlogits = kernels.logprobs_bwd(logits, labels, lse, g, inplace=True)
    logps_ref, _, _, d_ref = _oracle(tail_logits, labels[tail], g[tail])
    assert_out_close(logps[tail], logps_ref)
    assert_grad_close(dlogits[tail], d_ref)
