"""The NaN / inf policy of per-token log-probs, the same on every backend and for both entry points.

One body of assertions (`_assert_policy`) checks every case of the policy, for the logits path
(`dk.token_logps`, backends triton / cpu / reference) and the fused head (`dk.linear_token_logps`, backends
triton / the chunked torch path), in fp32, bf16 and fp16:

- ignored position: log-prob 0, every stat 0 (is_top1 False), gradient exactly 0, whatever the row holds;
- a NaN or +inf logit, or every logit -inf, or a label outside [0, V) (through the launchers: the public functions
  refuse it on the host): NaN log-prob, entropy, mean logit and log Σp², is_top1 False, and a NaN gradient on every
  column of the row, with or without a differentiated entropy;
- -inf logits in a row with a finite max: p = 0 and a gradient of exactly 0 there, mean logit -inf; a -inf label
  logit: log-prob -inf and a finite gradient;
- finite logits of any size (z = logits / T up to fp32's largest, tiny T, a row entirely below -1e30): every value
  within the tolerance table of a float64 oracle written here; the gradient finite, and |d logp / dx| <= |g| / T
  (p <= 1; its accuracy is limited by the fp32 lse the backward recomputes p from: README "Numerics").

Expected values come from the policy and from `_oracle` below (float64, independent of dpo_kernels), never from a
backend's output.
"""

import math

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, assert_grad_close, assert_out_close, lse_rounding_atol, tile_linear_token_logps

import dpo_kernels as dk
from dpo_kernels import cpu
from dpo_kernels import reference as R
from dpo_kernels.ops import linear_logprobs as triton_linear
from dpo_kernels.ops import logprobs as triton_logprobs

NAN, INF = float("nan"), float("inf")
IGNORE = -100
V = 37  # odd, under one block of every backend; the block and chunk edges are test_logprobs.py's job

LOGITS_BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "cpu", "reference"]
# the fused head: (backend, impl); "reference" builds the logits (reference.linear_token_logps)
HIDDEN_BACKENDS = [
    pytest.param(("triton", "tile"), marks=pytest.mark.triton, id="triton-tile"),
    pytest.param(("triton", "fused"), marks=pytest.mark.triton, id="triton-fused"),
    pytest.param(("cpu", "tile"), id="cpu-tile"),
    pytest.param(("reference", "tile"), id="reference"),
]

# The interpreter computes the very NaN / inf arithmetic under test and numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# --- the cases ---------------------------------------------------------------------------------------------------


class Case:
    """Rows of logits (float64 values exactly representable in the dtype, ±inf and NaN included), labels, a
    temperature, and per row what the policy expects: "ok" (finite, the oracle's values), "ignored" or "nan"."""

    def __init__(self, temperature: float = 1.0, extreme: bool = False):
        self.rows, self.labels, self.kinds = [], [], []
        self.temperature, self.extreme = temperature, extreme

    def add(self, row, label: int, kind: str) -> None:
        self.rows.append(torch.as_tensor(row, dtype=torch.float64))
        self.labels.append(label)
        self.kinds.append(kind)

    def tensors(self, dtype):
        logits = torch.stack(self.rows).to(dtype)
        finite = torch.isfinite(torch.stack(self.rows))
        exact = logits.double()[finite] == torch.stack(self.rows)[finite]
        assert exact.all(), "case values must be exact in the dtype"
        return logits, torch.tensor(self.labels), self.kinds


def _randn(scale=3.0):
    """Exact in every dtype: bf16's 8 significant bits, and no value below fp16's smallest normal (2^-14), where
    fp16 keeps fewer bits (such a draw, about one run in 50, broke the exactness check)."""
    x = torch.randn(V, dtype=torch.float64).mul(scale).to(torch.bfloat16).double()
    return torch.where(x.abs() < 2**-14, 0.0, x)


def policy_case() -> Case:
    """One row per non-finite case of the policy, between ordinary rows."""
    c = Case(temperature=0.75)
    c.add(_randn(), 3, "ok")
    row = _randn()
    row[::3] = -INF
    c.add(row, 4, "ok")  # -inf entries, finite max: p = 0 and zero gradient there, mean -inf
    row = _randn()
    row[[6, 20]] = -INF
    c.add(row, 6, "ok")  # the label's logit is -inf: log-prob -inf, finite gradient
    row = torch.full((V,), -INF, dtype=torch.float64)
    row[11] = 2.0
    c.add(row, 11, "ok")  # every logit -inf but the label's: log-prob 0, entropy 0
    row = _randn()
    row[[1, 2, 3]] = torch.tensor([NAN, INF, -INF], dtype=torch.float64)
    c.add(row, 2, "ignored")  # NaN and ±inf in an ignored row: nothing of it reaches a value or a gradient
    c.add(torch.full((V,), NAN, dtype=torch.float64), IGNORE, "ignored")
    row = _randn()
    row[30] = NAN
    c.add(row, 1, "nan")  # a NaN logit
    row = _randn()
    row[8] = NAN
    c.add(row, 8, "nan")  # NaN at the label
    row = _randn()
    row[17] = INF
    c.add(row, 5, "nan")  # a +inf logit
    row = _randn()
    row[0] = INF
    c.add(row, 0, "nan")  # +inf at the label
    row = _randn()
    row[[9, 10]] = torch.tensor([INF, -INF], dtype=torch.float64)
    c.add(row, 9, "nan")  # +inf and -inf
    c.add(torch.full((V,), -INF, dtype=torch.float64), 7, "nan")  # every logit -inf
    c.add(torch.full((V,), INF, dtype=torch.float64), 7, "nan")  # every logit +inf
    c.add(_randn(), V - 1, "ok")
    c.labels[4] = IGNORE  # the row with NaN and ±inf is ignored
    return c


def extreme_cases(dtype) -> list[Case]:
    """Finite logits of any size: the largest magnitudes of the dtype, rows entirely below -1e30, ties at the
    top, and temperatures that push z = x / T to 1e35 (fp16 gets its extremes from T alone)."""
    big = torch.finfo(dtype).max
    exact = lambda t: t.to(dtype).double().clamp(-big, big)  # noqa: E731  (rounding may pass the largest)
    c = Case(temperature=1.0 if dtype != torch.float16 else 2.0**-100, extreme=True)
    sign = torch.where(torch.rand(V) < 0.5, -1.0, 1.0).double()
    c.add(exact(sign * big * 10.0 ** -(8 * torch.rand(V).double())), 5, "ok")  # both signs, up to the largest
    c.add(exact(-big * 10.0 ** -(3 * torch.rand(V).double())), 2, "ok")  # the whole row far below -1e30 (fp32/bf16)
    c.add(torch.full((V,), exact(torch.tensor(big / 2)).item(), dtype=torch.float64), 9, "ok")  # Σx overflows fp32
    row = exact(-big * torch.rand(V).double())
    row[[4, 12, 30]] = exact(torch.tensor(big / 2)).item()
    c.add(row, 12, "ok")  # three tied maxima: log p = -log 3, is_top1 only at the first (label 4 in the next row)
    c.add(row.clone(), 4, "ok")
    c.add(torch.full((V,), exact(torch.tensor(-big)).item(), dtype=torch.float64), 0, "ok")  # all at the lowest
    cases = [c]
    # O(1) differences on top of the largest offset the dtype's grid allows: x = 2^p (1 + j 2^-p'), T = ulp(2^p)
    mant = round(-math.log2(torch.finfo(dtype).eps))  # mantissa bits: 23, 7, 10
    p = 60 if dtype != torch.float16 else 14
    ladder = Case(temperature=2.0 ** (p - mant), extreme=True)
    j = torch.randperm(V).double()
    ladder.add(2.0**p + j * 2.0 ** (p - mant), 0, "ok")
    ladder.add(-(2.0**p) - j * 2.0 ** (p - mant), int(j.argmin()), "ok")
    cases.append(ladder)
    tiny_t = Case(temperature=2.0**-60 if dtype != torch.float16 else 2.0**-120, extreme=True)
    for label in (0, 3, V - 1):
        tiny_t.add(_randn(), label, "ok")  # ordinary logits, T small enough that z reaches 1e19 (fp16: 1e37)
    cases.append(tiny_t)
    return cases


# --- the float64 oracle (independent of dpo_kernels) ---------------------------------------------------------------


def _oracle(logits, labels, temperature, g, g_h):
    """float64 logp, stats and d(Σ g logp + Σ g_h H)/dx of finite-max rows (anything for the others)."""
    z = logits.double() / temperature
    m = z.amax(-1, keepdim=True)
    s = z - torch.where(torch.isfinite(m), m, 0.0)
    log_p = s - torch.logsumexp(s, -1, keepdim=True)
    p = log_p.exp()
    safe = labels.clamp(0, V - 1)[:, None]
    logp = log_p.gather(-1, safe)[:, 0]
    log_p_masked = torch.where(p > 0, log_p, 0.0)
    entropy = -(p * log_p_masked).sum(-1)
    stats = {
        "entropy": entropy,
        "mean_logit": z.mean(-1),
        "is_top1": z.argmax(-1) == labels,  # the first maximal index
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, -1),
    }
    onehot = torch.nn.functional.one_hot(safe[:, 0], V).double()
    # dH/dz_v = -p_v (log p_v + H), 0 where p_v = 0
    d_logp = g.double()[:, None] * (onehot - p) / temperature
    d_h = -g_h.double()[:, None] * torch.where(p > 0, p * (log_p_masked + entropy[:, None]), 0.0) / temperature
    return logp, stats, d_logp, d_logp + d_h, d_h


# --- the one body of assertions --------------------------------------------------------------------------------


def _assert_policy(kinds, logits, labels, temperature, extreme, out, g, g_h):
    """out: logp [N], stats (TokenStats-like, is_top1 bool), grads: (d of Σ g logp, d with + Σ g_h H, d of Σ g_h H
    alone), each [N, V] in the logits' dtype, or None where that gradient was not asked for."""
    logp, stats, grads = out
    kinds = list(kinds)
    ref_logp, ref_stats, *ref_grads = _oracle(logits, labels, temperature, g, g_h)
    idx = {k: torch.tensor([i for i, kk in enumerate(kinds) if kk == k], dtype=torch.long) for k in kinds}
    names = ("entropy", "mean_logit", "log_sum_sq_probs")
    if "ignored" in idx:
        rows = idx["ignored"]
        assert (logp[rows] == 0).all(), "log-prob at ignored rows"
        for name in names:
            assert (getattr(stats, name)[rows] == 0).all(), f"{name} at ignored rows"
        assert not stats.is_top1[rows].any(), "is_top1 at ignored rows"
        for k, d in enumerate(grads):
            if d is not None:
                assert (d[rows] == 0).all(), f"gradient {k} at ignored rows"
    if "nan" in idx:
        rows = idx["nan"]
        assert logp[rows].isnan().all(), "log-prob at NaN rows"
        for name in names:
            assert getattr(stats, name)[rows].isnan().all(), f"{name} at NaN rows"
        assert not stats.is_top1[rows].any(), "is_top1 at NaN rows"
        for k, d in enumerate(grads):
            if d is not None:
                assert d[rows].isnan().all(), f"gradient {k} at NaN rows: NaN on every column"
    if "ok" not in idx:
        return
    rows = idx["ok"]
    # fp32 outputs: a log-prob below fp32's range (z_y - max z < -3.4e38, both huge) is -inf, rightly rounded
    assert_out_close(logp[rows], ref_logp[rows].float(), msg=lambda m: f"log-prob: {m}")
    for name in ("entropy", "log_sum_sq_probs"):
        assert_out_close(getattr(stats, name)[rows], ref_stats[name][rows], msg=lambda m, n=name: f"{n}: {m}")
    # The mean is an fp32 sum: its error is relative to mean |z|, not to |mean z| (rows of both signs cancel).
    z_abs = (logits[rows].double() / temperature).abs().nan_to_num(posinf=0.0).mean(-1)
    mean, mean_ref = stats.mean_logit[rows].double(), ref_stats["mean_logit"][rows]
    assert (mean == -INF).eq(mean_ref == -INF).all(), "mean_logit -inf exactly where a logit is"
    fin = mean_ref.isfinite()
    atol = 1e-5 + 1e-5 * z_abs[fin].max().item() if fin.any() else 0.0
    torch.testing.assert_close(mean[fin], mean_ref[fin], rtol=0, atol=atol, msg=lambda m: f"mean_logit: {m}")
    assert torch.equal(stats.is_top1[rows], ref_stats["is_top1"][rows]), "is_top1"
    x = logits[rows].double()
    masked = x == -INF
    masked[torch.arange(len(rows)), labels[rows]] = False  # at a -inf label: g (1 - 0) / T from the log-prob
    for k, (d, d_ref) in enumerate(zip(grads, ref_grads)):
        if d is None:
            continue
        d, d_ref = d[rows], d_ref[rows]
        assert (d[masked] == 0).all(), f"gradient {k}: exactly 0 at -inf logits"
        if not extreme:
            assert torch.isfinite(d).all(), f"gradient {k}: finite for finite-max rows"
            weights = (g.abs() if k < 2 else 0) + (g_h.abs() if k > 0 else 0)
            extra = lse_rounding_atol(x / temperature, weights[rows], temperature)
            assert_grad_close(d, d_ref, extra_atol=extra)
        elif k == 0:
            # p <= 1 whatever the rounding of the fp32 lse: |g (1[v = y] - p)| / T <= |g| / T, finite where the
            # dtype can hold |g| / T (fp16 with T = 2^-100 cannot). The entropy term's accuracy at these sizes is
            # limited by the fp32 lse and entropy (README "Numerics"): not asserted.
            bound = (g[rows].double().abs() / temperature)[:, None].expand_as(d)
            fits = bound <= torch.finfo(d.dtype).max
            assert torch.isfinite(d[fits]).all(), "gradient of the log-prob finite"
            within = d.double().abs() <= bound * (1 + 2 * torch.finfo(d.dtype).eps)
            assert within[fits].all(), "gradient of the log-prob bounded by |g| / T"


def _finite_grads(logits):
    g = torch.randn(logits.shape[0])
    g_h = torch.randn(logits.shape[0])
    return g, g_h


# --- token_logps -------------------------------------------------------------------------------------------------


def _public_logits(backend, logits, labels, temperature, g, g_h):
    """dk.token_logps forward, then the three gradients."""
    x = logits.clone().requires_grad_(True)
    logp, stats = dk.token_logps(x, labels, temperature=temperature, return_stats=True, backend=backend)
    grads = []
    for wl, wh in ((g, None), (g, g_h), (None, g_h)):
        outs, gs = [], []
        if wl is not None:
            outs.append(logp), gs.append(wl)
        if wh is not None:
            outs.append(stats.entropy), gs.append(wh)
        (d,) = torch.autograd.grad(outs, x, gs, retain_graph=True)
        grads.append(d)
    return logp.detach(), stats, grads


def _launchers_logits(backend, logits, labels, temperature, g, g_h):
    """The launchers (no host check of the labels), as the public function would call them under torch.compile."""
    if backend == "reference":  # the reference checks labels on the host unless compiling
        mp = pytest.MonkeyPatch()
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        try:
            return _public_logits(backend, logits, labels, temperature, g, g_h)
        finally:
            mp.undo()
    ops = triton_logprobs if backend == "triton" else cpu
    opts = dict(ignore_index=IGNORE, temperature=temperature)
    logp, lse, st = ops.logprobs_fwd(logits, labels, return_stats=True, **opts)
    grads = [
        ops.logprobs_bwd(logits, labels, lse, g, **opts),
        ops.logprobs_bwd(logits, labels, lse, g, grad_entropy=g_h, entropy=st[0], **opts),
        ops.logprobs_bwd(logits, labels, lse, None, grad_entropy=g_h, entropy=st[0], **opts),
    ]
    stats = R.TokenStats(entropy=st[0], mean_logit=st[1], is_top1=st[2] > 0.5, log_sum_sq_probs=st[3])
    return logp, stats, grads


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_token_logps_nan_policy(backend, dtype):
    dtype = DTYPES[dtype]
    if backend == "cpu" and not cpu.available():
        pytest.fail("the native CPU backend did not build")
    for case in [policy_case(), *extreme_cases(dtype)]:
        logits, labels, kinds = case.tensors(dtype)
        g, g_h = _finite_grads(logits)
        out = _public_logits(backend, logits, labels, case.temperature, g, g_h)
        _assert_policy(kinds, logits, labels, case.temperature, case.extreme, out, g, g_h)
    # Labels outside [0, V) that are not ignore_index, next to ordinary and ignored rows; labels as int16.
    logits = torch.stack([_randn() for _ in range(5)]).to(dtype)
    labels = torch.tensor([V, 3, -1, IGNORE, -7], dtype=torch.int16)
    g, g_h = _finite_grads(logits)
    out = _launchers_logits(backend, logits, labels, 1.0, g, g_h)
    _assert_policy(["nan", "ok", "nan", "ignored", "nan"], logits, labels.long(), 1.0, False, out, g, g_h)


# --- linear_token_logps ------------------------------------------------------------------------------------------
# The output layer is the identity (H = V), so that the logits z = hidden @ Iᵀ (+ bias) are the hidden rows exactly,
# NaN and inf propagating as a GEMM does (0 · inf = NaN: an inf in a hidden row makes its whole row NaN); -inf
# logits in a finite row come from the bias.


def _public_hidden(path, hidden, labels, temperature, g, g_h, bias=None, weight_grad=False):
    backend, impl = path
    h = hidden.clone().requires_grad_(True)
    w = torch.eye(V, dtype=hidden.dtype).requires_grad_(weight_grad)
    b = None if bias is None else bias.to(hidden.dtype).requires_grad_(weight_grad)
    logp, stats = dk.linear_token_logps(h, w, labels, bias=b, temperature=temperature, return_stats=True,
                                        backend=backend, impl=impl)  # fmt: skip
    grads, wgrads = [], []
    for wl, wh in ((g, None), (g, g_h), (None, g_h)):
        outs, gs = [], []
        if wl is not None:
            outs.append(logp), gs.append(wl)
        if wh is not None:
            outs.append(stats.entropy), gs.append(wh)
        inputs = [h, w] + ([b] if b is not None else []) if weight_grad else [h]
        d = torch.autograd.grad(outs, inputs, gs, retain_graph=True)
        grads.append(d[0])
        wgrads.append(d[1:])
    return (logp.detach(), stats, grads), wgrads


def _launchers_hidden(path, hidden, labels, g, g_h):
    """Below the api's checks (labels outside [0, V) reach the kernels)."""
    backend, impl = path
    w = torch.eye(V, dtype=hidden.dtype)
    if impl == "tile":
        h = hidden.clone().requires_grad_(True)
        if backend == "reference":
            logp, st = R.linear_token_logps(h, w, labels, return_stats=True)
            st = torch.stack([s.to(logp.dtype) for s in st])
        else:
            logp, st = tile_linear_token_logps(h, w, labels, backend=backend, return_stats=True)
        grads = [
            torch.autograd.grad(outs, h, gs, retain_graph=True)[0]
            for outs, gs in (([logp], [g]), ([logp, st[0]], [g, g_h]), ([st[0]], [g_h]))
        ]
    else:
        logp, lse, st = triton_linear.linear_logprobs_fwd(hidden, w, labels, return_stats=True)
        opts = dict(weight_grad=False)
        grads = [
            triton_linear.linear_logprobs_bwd(hidden, w, labels, lse, g, **opts)[0],
            triton_linear.linear_logprobs_bwd(hidden, w, labels, lse, g, grad_entropy=g_h, entropy=st[0], **opts)[0],
            triton_linear.linear_logprobs_bwd(hidden, w, labels, lse, None, grad_entropy=g_h, entropy=st[0], **opts)[0],
        ]
    stats = R.TokenStats(entropy=st[0].detach(), mean_logit=st[1], is_top1=st[2] > 0.5, log_sum_sq_probs=st[3])
    return logp.detach(), stats, grads


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_linear_token_logps_nan_policy(backend, dtype):
    dtype = DTYPES[dtype]
    # the policy's rows without -inf inside finite rows (those come from the bias below): NaN, ±inf, ignored
    case = policy_case()
    keep = [i for i, r in enumerate(case.rows) if not (case.kinds[i] == "ok" and torch.isinf(r).any())]
    rows = torch.stack([case.rows[i] for i in keep])
    kinds = [case.kinds[i] for i in keep]
    # a GEMM turns an inf in a row into NaN (0 · inf): the row is NaN, as the policy says for its inf logit
    hidden, labels = rows.to(dtype), torch.tensor([case.labels[i] for i in keep])
    g, g_h = _finite_grads(hidden)
    out, wgrads = _public_hidden(backend, hidden, labels, case.temperature, g, g_h, weight_grad=True)
    _assert_policy(kinds, torch.where(torch.isinf(rows), NAN, rows), labels, case.temperature, False, out, g, g_h)
    assert all(d.isnan().all() for ds in wgrads for d in ds), "a NaN row makes grad_weight NaN (a sum over tokens)"
    # -inf logits inside finite rows, through the bias, one of them at a label; bias and weight gradients
    bias = torch.zeros(V, dtype=torch.float64)
    bias[[5, 20]] = -INF
    hidden = torch.stack([_randn() for _ in range(4)])
    labels = torch.tensor([5, 0, IGNORE, V - 1])
    g, g_h = _finite_grads(hidden)
    out, wgrads = _public_hidden(backend, hidden.to(dtype), labels, 0.75, g, g_h, bias=bias, weight_grad=True)
    logits = hidden.to(dtype).double() + bias
    _assert_policy(["ok", "ok", "ignored", "ok"], logits, labels, 0.75, False, out, g, g_h)
    _, _, *ref_grads = _oracle(logits, labels, 0.75, g, g_h)
    # dW = dzᵀ h and db = Σ dz, with dz rounded to the dtype (and off by the lse's rounding) before the sums
    h = hidden.to(dtype).double()
    for k, ((gw, gb), d_ref) in enumerate(zip(wgrads, ref_grads)):
        scored = (labels != IGNORE)[:, None]
        d_ref = torch.where(scored, d_ref, 0.0)
        weights = (g.abs() if k < 2 else 0) + (g_h.abs() if k > 0 else 0)
        dz_err = GRAD_TOL[dtype]["atol"] + torch.finfo(dtype).eps * d_ref.abs()
        dz_err = dz_err + lse_rounding_atol(logits / 0.75, weights, 0.75)
        dz_err = torch.where(scored, dz_err, 0.0)
        assert_grad_close(gw, d_ref.T @ h, extra_atol=dz_err.T @ h.abs())
        assert gb[20] == 0, "bias gradient exactly 0 at a -inf logit (5 is a label's: g there)"
        assert_grad_close(gb, d_ref.sum(0), extra_atol=dz_err.sum(0))
    # finite extremes: the identity layer passes them through exactly
    for case in extreme_cases(dtype):
        logits, labels, kinds = case.tensors(dtype)
        g, g_h = _finite_grads(logits)
        out, _ = _public_hidden(backend, logits, labels, case.temperature, g, g_h)
        _assert_policy(kinds, logits, labels, case.temperature, case.extreme, out, g, g_h)
    # labels outside [0, V) through the launchers, labels as uint8 (ignore_index -100 then never matches); the
    # reference checks its labels itself
    hidden = torch.stack([_randn() for _ in range(4)]).to(dtype)
    labels = torch.tensor([V, 3, 255, 0], dtype=torch.uint8)
    g, g_h = _finite_grads(hidden)
    if backend[0] == "reference":
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\)"):
            _launchers_hidden(backend, hidden, labels, g, g_h)
        return
    out = _launchers_hidden(backend, hidden, labels, g, g_h)
    _assert_policy(["nan", "ok", "nan", "ok"], hidden, labels.long(), 1.0, False, out, g, g_h)


# --- the two reference bugs of the issue, on their own ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reference_ignored_rows_have_no_gradient(dtype):
    """reference.token_logps (also the backend of float64 and of devices without kernels): an ignored row full
    of NaN and inf gets a zero gradient, with and without the entropy term (torch.where before the math, not a
    mask multiplied in after it: 0 · NaN is NaN)."""
    logits = torch.randn(3, V, dtype=dtype)
    logits[1, :5] = torch.tensor([NAN, INF, -INF, NAN, 1.0], dtype=dtype)
    labels = torch.tensor([2, IGNORE, 4])
    x = logits.clone().requires_grad_(True)
    logp, stats = R.token_logps(x, labels, return_stats=True)
    (d,) = torch.autograd.grad([logp, stats.entropy], x, [torch.ones(3, dtype=dtype)] * 2)
    assert (d[1] == 0).all() and torch.isfinite(d).all()
    assert logp[1] == 0 and stats.entropy[1] == 0


@pytest.mark.parametrize(
    "label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=lambda d: str(d)[6:]
)
@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_token_logps_any_integer_labels(backend, label_dtype):
    """Labels of every integer dtype give what int64 labels give, on every backend (the reference's gather
    needed int64; uint8 labels cannot hold ignore_index -100: none is ignored there)."""
    logits = torch.randn(6, V)
    labels = torch.tensor([0, 5, IGNORE, V - 1, 3, IGNORE])
    if label_dtype == torch.uint8:
        labels[labels == IGNORE] = 1
    x = logits.clone().requires_grad_(True)
    logp, stats = dk.token_logps(x, labels.to(label_dtype), return_stats=True, backend=backend)
    (d,) = torch.autograd.grad(logp.sum(), x)
    logp_64, stats_64 = dk.token_logps(logits, labels, return_stats=True, backend=backend)
    assert torch.equal(logp.detach(), logp_64) and torch.equal(stats.is_top1, stats_64.is_top1)
    ref = R.token_logps(logits.double(), labels)
    assert_out_close(logp, ref)
    assert (d[labels == IGNORE] == 0).all()
