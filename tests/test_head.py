"""The fused lm_head from hidden states (`linear_token_logps`, `dpo_loss_from_hidden`) on its default tile path
(chunked.py: torch.mm / addmm into a tile, then the row kernels of the `cpu` and `triton` backends) against a
float64 oracle written here from the spec (dpo_losses.md §1–§3, §6), not from dpo_kernels.reference:

    z = transform(h·Wᵀ + b) in float64, log_softmax, entropy, mean logit, is_top1 (first-argmax tie rule),
    log Σp², the TRL losses; gradients by torch.autograd in float64.

Cases: fp32 / bf16 / fp16, bias, softcap + temperature + logit_scale, exact integer logits (ties), tied embeddings,
all rows ignored, NaN hidden rows (scored and ignored), V = 997 and V = 1, 2, several chunks (chunked.TILE_BYTES
shrunk), strided hidden and weight, non-default ignore_index, int32 labels, [N, H] / [B, T, H] / [H] shapes,
autocast (forward inside, backward outside), keep_logits on/off/auto (bitwise, GEMM counts, no_grad),
retain_graph, deterministic=True batch invariance (tile path, logits path, precomputed reference), DPO losses
(sigmoid, ipo, sigmoid_norm, a weighted mix with sft) with ref_hidden and precomputed reference log-probs, the
errors of bad options.

Tolerances (the one place; zerr = a bound on |Δz| from the tile's roundings, computed from each test's inputs:
eps(tile)/2 · |y|·scale/T for the GEMM writing y in the tile dtype, + eps/2·|u|/T for the softcapped tile, +
eps(tile)·(|h| @ |W|ᵀ)·scale/T when autocast rounds fp32 operands; 0 for an fp32 tile, whose error the 1e-5 covers):
    log-prob      |Δ| ≤ 1e-5 + 1e-5·|ref| + 2·zerr        (z_y and lse move by zerr each; tile_out_tol's rule)
    mean logit    |Δ| ≤ 1e-5 + 1e-5·|ref| + zerr
    log Σp²       |Δ| ≤ 1e-5 + 1e-5·|ref| + 4·zerr        (∂/∂z_v = 2(q_v − p_v), Σ|·| ≤ 4)
    entropy       |Δ| ≤ 1e-5 + 1e-5·|ref| + zerr·Σ_v p_v|z_v − E_p z|   per row (∂H/∂z_v = −p_v(z_v − E_p z))
    is_top1       exact, on rows whose label logit is more than 2·zerr from the best competing logit
    gradients     |Δ| ≤ GRAD_REL · Bnd, Bnd the same GEMMs on magnitudes (|∂L/∂y| @ |W|, |∂L/∂y|ᵀ @ |h|,
                  Σ|∂L/∂y|, with |∂L/∂y| ≤ (|g|(p + 1[v=y]) + |g_H| p (|z − E_p z| + 2))·|dz/dy|): the error of a
                  sum is bounded by the sum of its terms' magnitudes, not by the result (cancellation)
                  GRAD_REL = 1e-5 (fp32 sums) + 2·zerr (p's relative error) + 4·eps(tile) (dy, the operands under
                  autocast and the result rounded) + eps(tile)·max|y·scale/softcap| with a softcap (dz/dy);
                  + 2 subnormal spacings of the tile dtype × (the GEMMs on |1| for ∂L/∂y, + 1): fp16's dy underflows
    DPO losses    first order: 1e-5 + Σ_tokens |∂L/∂lp_t| · (log-prob tolerance), per-pair losses likewise;
                  gradients at fp32 only (bf16: values)
Bitwise (torch.equal) wherever the same GEMM shapes and row kernels run: keep_logits, retain_graph, batch invariance.
"""

import math
import re

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels import chunked, dispatch

OUT_ATOL = OUT_RTOL = 1e-5
GRAD_FP32_REL = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
]
V_ODD = 997  # prime: not a multiple of any block


def _cpu_or_skip(backend):
    if backend == "cpu" and not dispatch.native_available():
        pytest.skip("the native CPU kernels did not build (dpo_kernels.cpu.available() is False)")


def _eps(dtype):
    return 0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps


def _small_tiles(monkeypatch, rows, V, tile_dtype):
    """chunk_rows(V, tile_dtype) == rows: several chunks at test sizes."""
    monkeypatch.setattr(chunked, "TILE_BYTES", rows * V * tile_dtype.itemsize)
    assert chunked.chunk_rows(V, tile_dtype) == rows


# ----------------------------------------------------------------------------------------------------------------
# the float64 oracle (from the spec)


def oracle_z(h, w, b=None, *, temperature=1.0, softcap=None, logit_scale=1.0):
    """z = transform(h·Wᵀ + b), transform(y) = softcap·tanh(y·scale/softcap)/T or y·scale/T (spec §3)."""
    y = h @ w.T
    if b is not None:
        y = y + b
    y = y * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y / temperature


def oracle_tokens(z, labels, ignore_index):
    """(logp, entropy, mean logit, is_top1, log Σp²) of each row of z [N, V] (float64), 0 / False at ignored rows."""
    scored = labels != ignore_index
    safe = torch.where(scored, labels, 0).long()
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    lp = logp_all.gather(-1, safe[:, None])[:, 0]
    entropy = -(p * logp_all).sum(-1)
    mean = z.mean(-1)
    z_y = z.gather(-1, safe[:, None])
    earlier = torch.arange(z.shape[-1]) < safe[:, None]
    top1 = (z_y[:, 0] >= z.max(-1).values) & ~((z >= z_y) & earlier).any(-1)  # the first argmax
    lsp = torch.logsumexp(2 * logp_all, dim=-1)

    def zero(t):
        return torch.where(scored, t, torch.zeros_like(t))

    return zero(lp), zero(entropy), zero(mean), top1 & scored, zero(lsp)


def oracle_head(h, w, b, labels, *, g=None, g_h=None, ignore_index=-100, **transform):
    """The oracle on the library's inputs (upcast exactly): outputs, the float64 gradients of Σ g·logp + g_H·H, and
    the magnitude bounds of the gradient check. h [N, H], labels [N]."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    z = oracle_z(h64, w64, b64, **transform)
    lp, ent, mean, top1, lsp = oracle_tokens(z, labels, ignore_index)
    out = dict(logp=lp.detach(), entropy=ent.detach(), mean=mean.detach(), top1=top1, lsp=lsp.detach(), z=z.detach())
    if g is None and g_h is None:
        return out
    loss = 0.0
    if g is not None:
        loss = loss + (lp * g.double()).sum()
    if g_h is not None:
        loss = loss + (ent * g_h.double()).sum()
    params = [t for t in (h64, w64, b64) if t is not None]
    grads = torch.autograd.grad(loss, params)
    out["grads"] = dict(zip(("h", "w", "b"), grads))
    # magnitude bounds: |∂L/∂y| bounded elementwise, then the GEMMs on absolute values
    with torch.no_grad():
        zd = z.detach()
        scored = (labels != ignore_index).double()[:, None]
        p = torch.softmax(zd, -1)
        onehot = torch.nn.functional.one_hot(torch.where(labels != ignore_index, labels, 0).long(), zd.shape[1])
        spread = (zd - (p * zd).sum(-1, keepdim=True)).abs()
        a = torch.zeros_like(zd)
        if g is not None:
            a += g.double().abs()[:, None] * (p + onehot)
        if g_h is not None:
            a += g_h.double().abs()[:, None] * p * (spread + 2)
        y = h64.detach() @ w64.detach().T + (0 if b64 is None else b64.detach())
        T, c, s = transform.get("temperature", 1.0), transform.get("softcap"), transform.get("logit_scale", 1.0)
        dz_dy = s / T if c is None else s / T / torch.cosh(y * s / c) ** 2
        a = a * dz_dy * scored
        out["bounds"] = dict(h=a @ w64.detach().abs(), w=a.T @ h64.detach().abs(), b=a.sum(0))
        # for a tile's absolute rounding error at underflow (fp16's subnormal spacing): the GEMMs on |1|
        ones = scored.expand_as(a)
        out["floors"] = dict(h=ones @ w64.detach().abs() + 1, w=ones.T @ h64.detach().abs() + 1, b=ones.sum(0) + 1)
    return out


def logit_err(h, w, b, tile_dtype, *, autocast=False, temperature=1.0, softcap=None, logit_scale=1.0):
    """zerr: a bound on |Δz| from the tile's roundings (module docstring); 0 for an fp32 tile."""
    e = _eps(tile_dtype) / 2
    if e == 0:
        return 0.0
    h64, w64 = h.detach().double(), w.detach().double()
    b64 = 0 if b is None else b.detach().double()
    y = h64 @ w64.T + b64
    dy = e * y.abs()
    if autocast:  # the fp32 operands rounded to the tile dtype (each by half an ulp)
        dy = dy + 2 * e * (h64.abs() @ w64.abs().T + abs(b64 if b is None else b64.abs()))
    if softcap is None:
        dz = dy * logit_scale / temperature
    else:
        t = y * logit_scale / softcap
        dz = (dy * logit_scale / torch.cosh(t) ** 2 + e * softcap * torch.tanh(t).abs()) / temperature
    return dz.max().item()


def grad_rel(tile_dtype, zerr, *, softcap=None, y_scaled_max=0.0):
    rel = GRAD_FP32_REL + 2 * zerr + 4 * _eps(tile_dtype)
    if softcap is not None:
        rel += _eps(tile_dtype) * y_scaled_max / softcap
    return rel


def check_outputs(lp, stats, ref, zerr, *, nan_rows=()):
    """The log-prob and the stats of the library (flat [N]) against the oracle's, with the tolerances above."""
    keep = torch.ones(lp.numel(), dtype=torch.bool)
    keep[list(nan_rows)] = False
    got_lp = lp.reshape(-1).double()[keep]
    torch.testing.assert_close(got_lp, ref["logp"][keep], atol=OUT_ATOL + 2 * zerr, rtol=OUT_RTOL)
    if stats is None:
        return
    ent, mean, top1, lsp = (s.reshape(-1) for s in stats)
    torch.testing.assert_close(mean.double()[keep], ref["mean"][keep], atol=OUT_ATOL + zerr, rtol=OUT_RTOL)
    torch.testing.assert_close(lsp.double()[keep], ref["lsp"][keep], atol=OUT_ATOL + 4 * zerr, rtol=OUT_RTOL)
    z = ref["z"]
    p = torch.softmax(z, -1)
    spread = (p * (z - (p * z).sum(-1, keepdim=True)).abs()).sum(-1)
    err = (ent.double() - ref["entropy"]).abs()[keep]
    bound = (OUT_ATOL + OUT_RTOL * ref["entropy"].abs() + zerr * spread)[keep]
    assert (err <= bound).all(), f"entropy off by {(err - bound).max().item():.3g} beyond its bound"
    # is_top1: exact where the label's logit is clear of the best other logit by more than the logits' error
    assert top1.dtype == torch.bool
    z_y = ref["z_y"]
    others = ref["z_other_max"]
    clear = (z_y - others).abs() > 2 * zerr + 1e-9
    sel = keep & clear & ref["scored"]
    assert sel.any(), "no row to check is_top1 on"
    assert torch.equal(top1[sel], ref["top1"][sel])
    assert not top1[~ref["scored"]].any()


def with_top1_margins(ref, labels, ignore_index):
    z = ref["z"]
    safe = torch.where(labels != ignore_index, labels, 0).long()
    ref["z_y"] = z.gather(-1, safe[:, None])[:, 0]
    masked = z.clone()
    masked.scatter_(-1, safe[:, None], -math.inf)
    ref["z_other_max"] = masked.max(-1).values
    ref["scored"] = labels != ignore_index
    return ref


def check_grads(got: dict, ref: dict, rel: float, tile_dtype=torch.float32, extra: dict | None = None):
    # the tile's dy and the result rounded at underflow: two subnormal spacings (a softcap rounds dy twice)
    sub = 2 * _eps(tile_dtype) * torch.finfo(tile_dtype).smallest_normal
    for name, g in got.items():
        assert g is not None, f"no gradient for {name}"
        r, bnd = ref["grads"][name], ref["bounds"][name]
        floor = (sub * ref["floors"][name] if sub else 0.0) + (extra[name] if extra else 0.0)
        err = (g.double() - r).abs()
        bad = ~(err <= rel * bnd + floor + 1e-30)  # NaN counts as bad
        assert not bad.any(), (
            f"grad {name}: {int(bad.sum())} entries off, worst excess "
            f"{(err - rel * bnd)[bad].max().item():.3g} (rel {rel:.3g})"
        )


# ----------------------------------------------------------------------------------------------------------------
# inputs


def make_problem(N, H, V, dtype, *, bias=False, ignore_index=-100, ignored=0.25, transform=None, std=2.0):
    """hidden [N, H], weight [V, H] (logits of a few units), bias, labels: a quarter ignored, half the scored rows at
    the oracle's argmax (is_top1 True), the others random; edge columns 0 and V − 1."""
    transform = transform or {}
    h = torch.randn(N, H).to(dtype)
    w = (torch.randn(V, H) * (std / H**0.5)).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    z = oracle_z(h.double(), w.double(), None if b is None else b.double(), **transform)
    labels = torch.randint(0, V, (N,))
    labels[::2] = z.argmax(-1)[::2]
    labels[min(1, N - 1)] = V - 1
    labels[min(3, N - 1)] = 0
    if ignored:
        labels[torch.rand(N) < ignored] = ignore_index
    return h, w, b, labels


def run_head(h, w, b, labels, *, g, g_h=None, grads=("h", "w", "b"), **kwargs):
    """linear_token_logps with stats, then backward of Σ g·logp (+ g_H·entropy): (logp, stats, grads)."""
    h = h.detach().clone().requires_grad_("h" in grads)
    w = w.detach().clone().requires_grad_("w" in grads)
    b = None if b is None else b.detach().clone().requires_grad_("b" in grads)
    lp, st = dk.linear_token_logps(h, w, labels, bias=b, return_stats=True, **kwargs)
    loss = (lp * g.reshape(lp.shape)).sum()
    if g_h is not None:
        loss = loss + (st.entropy * g_h.reshape(lp.shape)).sum()
    loss.backward()
    out = {name: t.grad for name, t in (("h", h), ("w", w), ("b", b)) if t is not None and name in grads}
    return lp.detach(), tuple(s.detach() for s in st), out


# ----------------------------------------------------------------------------------------------------------------
# linear_token_logps against the oracle

CASES = {
    # name: (N, make_problem options, head options, rows per chunk (0: one chunk), [B, T + 1, H] strided)
    "plain": (24, {}, {}, 0, False),
    "bias-ignore_index": (24, dict(bias=True, ignore_index=-1), dict(ignore_index=-1), 0, False),
    "T-scale": (24, {}, dict(temperature=1.3, logit_scale=0.25), 0, False),
    "softcap-T-scale-bias": (24, dict(bias=True), dict(softcap=5.0, temperature=0.7, logit_scale=1.7), 0, False),
    "chunks-softcap-bias": (29, dict(bias=True), dict(softcap=6.0, temperature=1.2, logit_scale=0.9), 5, False),
    "strided-3d-chunks": (0, {}, dict(temperature=0.8), 4, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.keys())
def test_linear_token_logps_oracle(case, dtype, backend, monkeypatch):
    _cpu_or_skip(backend)
    N, problem, head, rows, strided = CASES[case]
    H, V = 32, V_ODD
    transform = {k: v for k, v in head.items() if k != "ignore_index"}
    ignore_index = head.get("ignore_index", -100)
    if rows:
        _small_tiles(monkeypatch, rows, V, dtype)
    if strided:  # hidden[:, :-1] of [B, T + 1, H] with labels [B, T] (int32): rows not evenly strided
        B, T = 3, 7
        full = torch.randn(B, T + 1, H).to(dtype)
        h3 = full[:, :-1]
        _, w, b, labels = make_problem(B * T, H, V, dtype, transform=transform)
        z = oracle_z(h3.reshape(-1, H).double(), w.double(), **transform)
        labels[::2] = z.argmax(-1)[::2]
        labels[torch.rand(B * T) < 0.25] = ignore_index
        labels3 = labels.view(B, T).to(torch.int32)
        h_lib, lab_lib, h_flat = full, labels3, h3.reshape(-1, H)
    else:
        h_flat, w, b, labels = make_problem(N, H, V, dtype, transform=transform, **problem)
        h_lib, lab_lib = h_flat, labels
    g = torch.randn(labels.shape)
    g_h = torch.randn(labels.shape)
    ref = oracle_head(h_flat, w, b, labels, g=g, g_h=g_h, ignore_index=ignore_index, **transform)
    with_top1_margins(ref, labels, ignore_index)

    if strided:
        full_leaf = h_lib.detach().clone().requires_grad_()
        wl = w.clone().requires_grad_()
        lp, st = dk.linear_token_logps(full_leaf[:, :-1], wl, lab_lib, backend=backend, return_stats=True, **head)
        assert lp.shape == lab_lib.shape and lp.dtype == torch.float32
        ((lp * g.view(lp.shape)).sum() + (st.entropy * g_h.view(lp.shape)).sum()).backward()
        assert torch.equal(full_leaf.grad[:, -1], torch.zeros_like(full_leaf.grad[:, -1]))  # the dropped column
        got = dict(h=full_leaf.grad[:, :-1].reshape(-1, H), w=wl.grad)
        lp, st = lp.detach(), tuple(s.detach() for s in st)
    else:
        lp, st, got = run_head(h_lib, w, b, lab_lib, g=g, g_h=g_h, backend=backend, **head)
        assert lp.shape == labels.shape and lp.dtype == torch.float32
    for name, t in got.items():
        assert t.dtype == dtype, f"grad {name} in {t.dtype}"
    zerr = logit_err(h_flat, w, b, dtype, **transform)
    check_outputs(lp, st, ref, zerr)
    scored = labels != ignore_index
    assert torch.equal(lp.reshape(-1)[~scored], torch.zeros(int((~scored).sum())))
    assert not st[2].reshape(-1)[~scored].any()
    y_max = (oracle_z(h_flat.double(), w.double(), None if b is None else b.double()).abs().max().item()) * (
        transform.get("logit_scale", 1.0)
    )
    check_grads(got, ref, grad_rel(dtype, zerr, softcap=transform.get("softcap"), y_scaled_max=y_max), dtype)
    assert torch.equal(got["h"][~scored], torch.zeros_like(got["h"][~scored]))  # ignored rows: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_linear_token_logps_exact_logits_ties(dtype, backend, monkeypatch):
    """Integer hidden and weight entries: every logit is an exact small integer in any dtype and any summation
    order, so the tile rounds nothing (fp32 tolerance at every dtype) and ties are exact: is_top1 follows the
    first-argmax rule, checked on every row."""
    _cpu_or_skip(backend)
    N, H, V = 40, 8, 301
    _small_tiles(monkeypatch, 16, V, dtype)
    for _ in range(100):  # draw until half the rows (or more) peak on a tie: most draws do
        h = torch.randint(-1, 2, (N, H)).to(dtype)
        w = torch.randint(-1, 2, (V, H)).to(dtype)
        z = h.double() @ w.double().T
        zmax = z.max(-1, keepdim=True).values
        ties = z == zmax
        first = ties.int().argmax(-1)  # first column at the max
        last = V - 1 - ties.flip(-1).int().argmax(-1)  # last column at the max
        if (first != last).sum() >= N // 2:
            break
    assert (first != last).sum() >= N // 2, "too few tied rows to test the tie rule"
    labels = torch.randint(0, V, (N,))
    labels[0::3], labels[1::3] = first[0::3], last[1::3]
    labels[5] = -100
    g, g_h = torch.randn(N), torch.randn(N)
    ref = oracle_head(h, w, None, labels, g=g, g_h=g_h)
    lp, st, got = run_head(h, w, None, labels, g=g, g_h=g_h, backend=backend)
    torch.testing.assert_close(lp.double(), ref["logp"], atol=OUT_ATOL, rtol=OUT_RTOL)
    torch.testing.assert_close(st[0].double(), ref["entropy"], atol=OUT_ATOL, rtol=OUT_RTOL)
    torch.testing.assert_close(st[1].double(), ref["mean"], atol=OUT_ATOL, rtol=OUT_RTOL)
    torch.testing.assert_close(st[3].double(), ref["lsp"], atol=OUT_ATOL, rtol=OUT_RTOL)
    assert torch.equal(st[2], ref["top1"])
    tied = first != last
    assert st[2][0::3][tied[0::3]].all() and not st[2][1::3][tied[1::3]].any()
    check_grads(got, ref, grad_rel(dtype, 0.0), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 2])
def test_linear_token_logps_tiny_vocab(V, backend):
    _cpu_or_skip(backend)
    h, w, b, labels = make_problem(6, 16, V, torch.float32, bias=True, ignored=0)
    labels[2] = -100
    g, g_h = torch.randn(6), torch.randn(6)
    ref = with_top1_margins(oracle_head(h, w, b, labels, g=g, g_h=g_h), labels, -100)
    lp, st, got = run_head(h, w, b, labels, g=g, g_h=g_h, backend=backend)
    check_outputs(lp, st, ref, 0.0)
    check_grads(got, ref, grad_rel(torch.float32, 0.0))
    if V == 1:
        assert torch.equal(lp, torch.zeros(6)) and st[2].sum() == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logps_float64_runs_the_reference(backend):
    """float64 hidden: the reference backend (documented), float64 out, float64 accuracy."""
    _cpu_or_skip(backend)
    h, w, b, labels = make_problem(10, 16, 97, torch.float64, bias=True)
    g = torch.randn(10, dtype=torch.float64)
    ref = oracle_head(h, w, b, labels, g=g, temperature=0.9)
    lp, _, got = run_head(h, w, b, labels, g=g, backend=backend, temperature=0.9)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, ref["logp"], atol=1e-12, rtol=1e-12)
    for name in got:
        torch.testing.assert_close(got[name], ref["grads"][name], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logps_one_row_and_shapes(backend):
    """[1, H], [H] with a 0-dim label, [B, T, H] == its [N, H] view bitwise, transposed-storage hidden and
    weight (copied, same values, gradients into the originals)."""
    _cpu_or_skip(backend)
    H, V = 16, 211
    h, w, b, labels = make_problem(12, H, V, torch.float32, bias=True, ignored=0.2)
    one = dk.linear_token_logps(h[:1], w, labels[:1], bias=b, backend=backend)
    ref1 = oracle_head(h[:1], w, b, labels[:1])
    assert one.shape == (1,)
    torch.testing.assert_close(one.double(), ref1["logp"], atol=OUT_ATOL, rtol=OUT_RTOL)
    vec = dk.linear_token_logps(h[0], w, labels[0], bias=b, backend=backend)
    assert vec.shape == () and torch.equal(vec, one[0])

    flat = dk.linear_token_logps(h, w, labels, bias=b, backend=backend)
    batched = dk.linear_token_logps(h.view(3, 4, H), w, labels.view(3, 4), bias=b, backend=backend)
    assert batched.shape == (3, 4) and torch.equal(batched.reshape(-1), flat)

    h_t = h.T.contiguous().T.requires_grad_()  # stride (1, N): not unit stride along H
    w_t = w.T.contiguous().T.requires_grad_()
    assert h_t.stride(-1) != 1 and w_t.stride(-1) != 1
    g = torch.randn(12)
    lp = dk.linear_token_logps(h_t, w_t, labels, bias=b, backend=backend)
    (lp * g).sum().backward()
    assert torch.equal(lp.detach(), flat)
    _, _, got = run_head(h, w, b, labels, g=g, grads=("h", "w"), backend=backend)
    assert torch.equal(h_t.grad, got["h"]) and torch.equal(w_t.grad, got["w"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("trainable", [pytest.param(("h",), id="hidden"), pytest.param(("h", "w", "b"), id="head")])
def test_linear_token_logps_all_ignored(trainable, keep, backend, monkeypatch):
    """Every label ignored (a micro-batch of truncated completions): zeros everywhere, zero gradients."""
    _cpu_or_skip(backend)
    _small_tiles(monkeypatch, 3, V_ODD, torch.bfloat16)
    h, w, b, _ = make_problem(8, 16, V_ODD, torch.bfloat16, bias=True)
    labels = torch.full((2, 4), -100)
    h = h.view(2, 4, 16).requires_grad_("h" in trainable)
    w.requires_grad_("w" in trainable)
    b.requires_grad_("b" in trainable)
    lp, st = dk.linear_token_logps(h, w, labels, bias=b, backend=backend, return_stats=True, keep_logits=keep)
    (lp.sum() + st.entropy.sum()).backward()
    assert torch.equal(lp, torch.zeros(2, 4))
    for s in (st.entropy, st.mean_logit, st.log_sum_sq_probs):
        assert torch.equal(s, torch.zeros(2, 4))
    assert not st.is_top1.any()
    for name, t in (("h", h), ("w", w), ("b", b)):
        if name in trainable:
            assert t.grad is not None and t.grad.dtype == torch.bfloat16 and not t.grad.any()


# ----------------------------------------------------------------------------------------------------------------
# NaN policy (README "Numerics": a NaN row gives NaN in its outputs, is_top1 False, a NaN gradient row, never
# touches other rows; through the head it makes grad_weight and grad_bias NaN; an ignored row is never read)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [True, False])
def test_linear_token_logps_nan_hidden_row(keep, backend, monkeypatch):
    _cpu_or_skip(backend)
    N, H, V = 20, 16, V_ODD
    _small_tiles(monkeypatch, 6, V, torch.float32)  # the NaN row in the second chunk of four
    h, w, b, labels = make_problem(N, H, V, torch.float32, bias=True, ignored=0)
    bad, ignored_bad = 8, 15
    labels[ignored_bad] = -100
    clean = h.clone()
    clean[ignored_bad] = 0
    h[bad], h[ignored_bad] = math.nan, math.nan
    g, g_h = torch.randn(N), torch.randn(N)
    ref = with_top1_margins(oracle_head(clean, w, b, labels, g=g, g_h=g_h), labels, -100)
    lp, st, got = run_head(h, w, b, labels, g=g, g_h=g_h, backend=backend, keep_logits=keep)
    for name, s in zip(("logp", "entropy", "mean", "lsp"), (lp, st[0], st[1], st[3])):
        assert s[bad].isnan(), f"{name} of the NaN row is {s[bad]}"
        assert s[ignored_bad] == 0, f"{name} of the ignored NaN row is {s[ignored_bad]}"
    assert not st[2][bad] and not st[2][ignored_bad]
    check_outputs(lp, st, ref, 0.0, nan_rows=(bad,))
    assert got["h"][bad].isnan().all()
    assert torch.equal(got["h"][ignored_bad], torch.zeros(H))
    others = torch.arange(N) != bad
    others_ref = {key: {"h": ref[key]["h"][others]} for key in ("grads", "bounds", "floors")}
    check_grads({"h": got["h"][others]}, others_ref, GRAD_FP32_REL)
    assert got["w"].isnan().all() and got["b"].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logps_nan_in_ignored_rows_only(backend, monkeypatch):
    """NaN hidden states at ignored positions never reach a GEMM: every gradient finite and as without them."""
    _cpu_or_skip(backend)
    _small_tiles(monkeypatch, 4, V_ODD, torch.float32)
    h, w, b, labels = make_problem(14, 16, V_ODD, torch.float32, bias=True, ignored=0)
    labels[[0, 6, 13]] = -100
    clean = h.clone()
    clean[[0, 6, 13]] = 0
    h[[0, 6, 13]] = math.inf * torch.tensor([1.0, -1.0, math.nan])[:, None]
    g = torch.randn(14)
    ref = oracle_head(clean, w, b, labels, g=g)
    lp, _, got = run_head(h, w, b, labels, g=g, backend=backend)
    torch.testing.assert_close(lp.double(), ref["logp"], atol=OUT_ATOL, rtol=OUT_RTOL)
    check_grads(got, ref, GRAD_FP32_REL)


# ----------------------------------------------------------------------------------------------------------------
# tied embeddings, autocast, the bias' dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [0, 5], ids=["one-chunk", "chunks"])
def test_linear_token_logps_tied_embeddings(rows, backend, monkeypatch):
    """The same Parameter as the input embedding and the head: both gradients accumulate into one .grad."""
    _cpu_or_skip(backend)
    V, H, B, T = V_ODD, 16, 2, 9
    if rows:
        _small_tiles(monkeypatch, rows, V, torch.float32)
    emb = torch.nn.Embedding(V, H)
    with torch.no_grad():
        emb.weight.mul_(0.7)
    mix = torch.randn(H, H) / H**0.5
    ids = torch.randint(0, V, (B, T + 1))
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    labels[0, :3] = -100  # a prompt
    g = torch.randn(B, T + 1)

    def backbone(weight, m):
        x = torch.nn.functional.embedding(ids, weight)
        return x + torch.tanh(x @ m)

    lp = dk.linear_token_logps(backbone(emb.weight, mix), emb.weight, labels, backend=backend)
    (lp * g).sum().backward()

    w64 = emb.weight.detach().double().requires_grad_()
    h64 = backbone(w64, mix.double())
    lp64 = oracle_tokens(oracle_z(h64.reshape(-1, H), w64), labels.reshape(-1), -100)[0]
    (grad,) = torch.autograd.grad((lp64 * g.reshape(-1).double()).sum(), w64)
    torch.testing.assert_close(lp.detach().reshape(-1).double(), lp64.detach(), atol=OUT_ATOL, rtol=OUT_RTOL)
    # the head's part and the embedding's part both sum over tokens: one fp32 bound for the sum of both
    torch.testing.assert_close(emb.weight.grad.double(), grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 8.0], ids=["plain", "softcap"])
def test_linear_token_logps_autocast(softcap, backend, monkeypatch):
    """fp32 model, forward under CPU bf16 autocast, backward outside: bf16 tiles, fp32 outputs and gradients; the
    backward recomputes the forward's bf16 tiles (keep_logits=False is bitwise keep_logits=True)."""
    _cpu_or_skip(backend)
    N, H, V = 22, 32, V_ODD
    _small_tiles(monkeypatch, 7, V, torch.bfloat16)
    transform = dict(softcap=softcap, temperature=0.9, logit_scale=1.1)
    h, w, b, labels = make_problem(N, H, V, torch.float32, bias=True, transform=transform)
    g, g_h = torch.randn(N), torch.randn(N)
    results = {}
    for keep in (True, False):
        hl, wl, bl = (t.clone().requires_grad_() for t in (h, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, st = dk.linear_token_logps(
                hl, wl, labels, bias=bl, backend=backend, return_stats=True, keep_logits=keep, **transform
            )
        ((lp * g).sum() + (st.entropy * g_h).sum()).backward()
        results[keep] = (lp.detach(), tuple(s.detach() for s in st), dict(h=hl.grad, w=wl.grad, b=bl.grad))
    lp, st, got = results[False]
    assert lp.dtype == torch.float32 and all(t.dtype == torch.float32 for t in got.values())
    for a, c in zip((lp, *st, *got.values()), (results[True][0], *results[True][1], *results[True][2].values())):
        assert torch.equal(a, c), "the backward's recomputed tile differs from the kept one under autocast"
    ref = with_top1_margins(oracle_head(h, w, b, labels, g=g, g_h=g_h, **transform), labels, -100)
    zerr = logit_err(h, w, b, torch.bfloat16, autocast=True, **transform)
    assert zerr > 1e-3  # the tile is bf16: an fp32 tile would pass the fp32 check below
    check_outputs(lp, st, ref, zerr)
    y_max = (h.double() @ w.double().T + b.double()).abs().max().item() * 1.1
    check_grads(got, ref, grad_rel(torch.bfloat16, zerr, softcap=softcap, y_scaled_max=y_max))
    # and the tile was bf16: the fp32 oracle is not met at fp32 tolerance
    assert (lp.double() - ref["logp"]).abs().max() > 10 * OUT_ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logps_bias_cast_like_weight(backend):
    """A bf16 model with an fp32 head (weight and bias): both are cast to hidden's dtype, on every backend (the
    kernel backends raised torch's addmm dtype error on the bias before)."""
    _cpu_or_skip(backend)
    h, w, b, labels = make_problem(8, 16, 97, torch.float32, bias=True)
    h = h.bfloat16()
    ref = oracle_head(h, w.bfloat16(), b.bfloat16(), labels)
    zerr = logit_err(h, w.bfloat16(), b.bfloat16(), torch.bfloat16) + _eps(torch.bfloat16) * b.abs().max().item()
    lp_ref_backend = dk.linear_token_logps(h, w, labels, bias=b, backend="reference")
    torch.testing.assert_close(lp_ref_backend.double(), ref["logp"], atol=OUT_ATOL + 2 * zerr, rtol=OUT_RTOL)
    lp = dk.linear_token_logps(h, w, labels, bias=b, backend=backend)
    torch.testing.assert_close(lp.double(), ref["logp"], atol=OUT_ATOL + 2 * zerr, rtol=OUT_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logps-only", "entropy-only", "hidden-only", "weight-only"])
def test_linear_token_logps_partial_gradients(which, backend, monkeypatch):
    """One upstream gradient absent (the logp's or the entropy's), or only hidden / only the head trainable."""
    _cpu_or_skip(backend)
    _small_tiles(monkeypatch, 5, V_ODD, torch.float32)
    h, w, b, labels = make_problem(13, 16, V_ODD, torch.float32, bias=True)
    g = None if which == "entropy-only" else torch.randn(13)
    g_h = None if which == "logps-only" else torch.randn(13)
    grads = {"hidden-only": ("h",), "weight-only": ("w", "b")}.get(which, ("h", "w", "b"))
    hl, wl, bl = (t.clone().requires_grad_(n in grads) for t, n in ((h, "h"), (w, "w"), (b, "b")))
    lp, st = dk.linear_token_logps(hl, wl, labels, bias=bl, backend=backend, return_stats=True)
    loss = 0
    if g is not None:
        loss = loss + (lp * g).sum()
    if g_h is not None:
        loss = loss + (st.entropy * g_h).sum()
    loss.backward()
    ref = oracle_head(h, w, b, labels, g=g, g_h=g_h)
    got = {n: t.grad for n, t in (("h", hl), ("w", wl), ("b", bl)) if n in grads}
    check_grads(got, ref, GRAD_FP32_REL)
    for n, t in (("h", hl), ("w", wl), ("b", bl)):
        if n not in grads:
            assert t.grad is None


# ----------------------------------------------------------------------------------------------------------------
# keep_logits


def _keep_run(h, w, b, labels, keep, backend, **options):
    g, g_h = options.pop("g"), options.pop("g_h")
    return run_head(h, w, b, labels, g=g, g_h=g_h, backend=backend, keep_logits=keep, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options, dtype",
    [
        (dict(), torch.bfloat16),
        (dict(softcap=4.0, temperature=0.8, logit_scale=1.5), torch.float32),
        (dict(deterministic=True, temperature=1.4), torch.bfloat16),
        (dict(deterministic=True, softcap=3.0), torch.float16),
    ],
    ids=["plain-bf16", "softcap-fp32", "deterministic-bf16", "deterministic-softcap-fp16"],
)
def test_keep_logits_bitwise(options, dtype, backend, monkeypatch):
    _cpu_or_skip(backend)
    N, V = 23, V_ODD
    _small_tiles(monkeypatch, 6, V, dtype)
    h, w, b, labels = make_problem(N, 16, V, dtype, bias=True)
    g, g_h = torch.randn(N), torch.randn(N)
    runs = {keep: _keep_run(h, w, b, labels, keep, backend, g=g, g_h=g_h, **options) for keep in (True, False, "auto")}
    for keep in (True, "auto"):
        lp, st, got = runs[keep]
        assert torch.equal(lp, runs[False][0]), f"keep_logits={keep!r}: log-probs differ"
        for a, c in zip(st, runs[False][1]):
            assert torch.equal(a, c), f"keep_logits={keep!r}: stats differ"
        for name in got:
            assert torch.equal(got[name], runs[False][2][name]), f"keep_logits={keep!r}: grad {name} differs"


@pytest.mark.parametrize("backend", ["cpu"])  # chunked.py's loop, the same for every backend's row kernels
def test_keep_logits_gemm_counts(backend, monkeypatch):
    """keep_logits=True: the backward runs no tile GEMM; False: one per chunk; "auto" keeps when the tiles fit in
    KEEP_LOGITS_BYTES; under no_grad nothing is kept (keep is never asked of the tile loop)."""
    _cpu_or_skip(backend)
    V, rows, N = V_ODD, 4, 15  # 4 chunks
    _small_tiles(monkeypatch, rows, V, torch.float32)
    calls, keeps = [], []
    gemm, fwd = chunked._gemm, chunked.linear_logprobs_fwd

    def counting_gemm(*args, **kwargs):
        calls.append(1)
        return gemm(*args, **kwargs)

    def spying_fwd(*args, **kwargs):
        keeps.append(kwargs["keep"])
        return fwd(*args, **kwargs)

    monkeypatch.setattr(chunked, "_gemm", counting_gemm)
    monkeypatch.setattr(chunked, "linear_logprobs_fwd", spying_fwd)
    h, w, _, labels = make_problem(N, 16, V, torch.float32, ignored=0)

    def count(keep, grad=True):
        calls.clear()
        keeps.clear()
        hl = h.clone().requires_grad_(grad)
        lp = dk.linear_token_logps(hl, w, labels, backend=backend, keep_logits=keep)
        forward = len(calls)
        if grad:
            lp.sum().backward()
        return forward, len(calls) - forward, keeps[0]

    assert count(True) == (4, 0, True)
    assert count(False) == (4, 4, False)
    assert count("auto") == (4, 0, True)
    monkeypatch.setattr(chunked, "KEEP_LOGITS_BYTES", N * V * 4 - 1)  # one row short
    assert count("auto") == (4, 4, False)
    monkeypatch.setattr(chunked, "KEEP_LOGITS_BYTES", N * V * 4)
    assert count("auto") == (4, 0, True)
    assert count(True, grad=False) == (4, 0, False)
    with torch.no_grad():
        lp_ng = dk.linear_token_logps(h.clone().requires_grad_(), w, labels, backend=backend, keep_logits=True)
    assert not lp_ng.requires_grad and keeps[-1] is False
    assert torch.equal(lp_ng, dk.linear_token_logps(h, w, labels, backend=backend, keep_logits=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_retain_graph_double_backward(softcap, keep, backend, monkeypatch):
    """Two backwards through one graph: the second reads the kept tiles (or recomputes) again, the gradients add up
    exactly to twice one backward's."""
    _cpu_or_skip(backend)
    _small_tiles(monkeypatch, 5, V_ODD, torch.bfloat16)
    h, w, b, labels = make_problem(17, 16, V_ODD, torch.bfloat16, bias=True)
    g, g_h = torch.randn(17), torch.randn(17)
    _, _, once = run_head(h, w, b, labels, g=g, g_h=g_h, backend=backend, keep_logits=keep, softcap=softcap)
    hl, wl, bl = (t.clone().requires_grad_() for t in (h, w, b))
    head = dict(backend=backend, return_stats=True, keep_logits=keep, softcap=softcap)
    lp, st = dk.linear_token_logps(hl, wl, labels, bias=bl, **head)
    loss = (lp * g).sum() + (st.entropy * g_h).sum()
    loss.backward(retain_graph=True)
    first = {n: t.grad.clone() for n, t in (("h", hl), ("w", wl), ("b", bl))}
    loss.backward()
    for n, t in (("h", hl), ("w", wl), ("b", bl)):
        assert torch.equal(first[n], once[n]), f"first backward: grad {n}"
        assert torch.equal(t.grad, once[n] + once[n]), f"second backward: grad {n} is not twice the first"


# ----------------------------------------------------------------------------------------------------------------
# deterministic=True: batch invariance


def _batch(dtype, B=8, T=6, H=32, V=V_ODD):
    h = torch.randn(B, T, H).to(dtype)
    w = (torch.randn(V, H) * (2 / H**0.5)).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100  # prompts
    labels[torch.arange(B), torch.randint(2, T, (B,))] = -100  # some padding
    return h, w, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
def test_deterministic_batch_invariance_tile_path(dtype, backend, keep, monkeypatch):
    """A sequence's log-probs alone equal its log-probs in a batch of 8, bitwise (several chunks in the batch, one
    padded chunk alone), and so do the gradients of its hidden states (the backward's GEMMs are padded too), with
    the tiles recomputed or kept, the entropy's gradient included. With a softcap the log-probs only: its derivative
    is a torch element-wise pass whose last elements take another code path on the CPU (README)."""
    _cpu_or_skip(backend)
    _small_tiles(monkeypatch, 8, V_ODD, dtype)
    h, w, labels = _batch(dtype)
    b = torch.randn(V_ODD).to(dtype)
    g, g_h = torch.randn(labels.shape), torch.randn(labels.shape)
    for softcap in (7.0, None):
        opts = dict(bias=b, backend=backend, deterministic=True, softcap=softcap, keep_logits=keep, return_stats=True)

        def run(rows):
            x = h[rows].clone().requires_grad_()
            lp, st = dk.linear_token_logps(x, w, labels[rows], **opts)  # noqa: B023
            (lp * g[rows] + st.entropy * g_h[rows]).sum().backward()
            return lp.detach(), x.grad

        batch, grad = run(slice(None))
        alone = [run(slice(i, i + 1)) for i in range(8)]
        assert torch.equal(torch.cat([lp for lp, _ in alone]), batch)
        assert not torch.equal(batch, torch.zeros_like(batch)) and grad.abs().sum() > 0
        if softcap is None:
            assert torch.equal(torch.cat([d for _, d in alone]), grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_batch_invariance_logits_path(dtype, backend):
    """token_logps on the logits of the same rows: one sequence at a time equals the batch of 8, bitwise."""
    _cpu_or_skip(backend)
    h, w, labels = _batch(dtype)
    logits = (h @ w.T).to(dtype)
    batch, stats = dk.token_logps(logits, labels, backend=backend, return_stats=True)
    for i in range(8):
        one, one_stats = dk.token_logps(logits[i : i + 1], labels[i : i + 1], backend=backend, return_stats=True)
        assert torch.equal(one[0], batch[i])
        for a, c in zip(one_stats, stats):
            assert torch.equal(a[0], c[i])


@pytest.mark.parametrize("backend", ["cpu"])  # the tile path on the CPU (issue 13); triton is covered above
def test_deterministic_precomputed_reference_batches(backend, monkeypatch):
    """Reference log-probs precomputed one pair at a time equal those of a batch of 8 pairs, bitwise, and so do
    the losses and gradients of dpo_loss_from_hidden that use them."""
    _cpu_or_skip(backend)
    _small_tiles(monkeypatch, 8, V_ODD, torch.bfloat16)
    B = 8
    ref_h, w, labels = _batch(torch.bfloat16, B=2 * B)
    head = dict(backend=backend, deterministic=True)

    def precompute(rows):
        lp = dk.linear_token_logps(ref_h[rows], w, labels[rows], **head)
        return dk.sequence_logps(lp, labels[rows]).logps

    batch = precompute(torch.arange(2 * B))
    pairs = [precompute(torch.tensor([i, B + i])) for i in range(B)]
    rc1, rr1 = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    assert rc1.dtype == torch.float64
    assert torch.equal(rc1, batch[:B]) and torch.equal(rr1, batch[B:])
    # through reference_free=True's outputs (fp32 chosen / rejected log-probs), as TRL precomputes them
    out8 = dk.dpo_loss_from_hidden(ref_h, w, labels, reference_free=True, **head)
    for i in range(B):
        rows = torch.tensor([i, B + i])
        out1 = dk.dpo_loss_from_hidden(ref_h[rows], w, labels[rows], reference_free=True, **head)
        assert torch.equal(out1.chosen_logps[0], out8.chosen_logps[i])
        assert torch.equal(out1.rejected_logps[0], out8.rejected_logps[i])

    policy = (ref_h.float() + 0.1 * torch.randn(ref_h.shape)).bfloat16()
    results = []
    for rc, rr in ((rc1, rr1), (batch[:B], batch[B:])):
        hl, wl = policy.clone().requires_grad_(), w.clone().requires_grad_()
        out = dk.dpo_loss_from_hidden(hl, wl, labels, rc, rr, beta=0.3, **head)
        out.loss.backward()
        results.append((out.loss.detach(), out.chosen_rewards, hl.grad, wl.grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss_from_hidden against the TRL loss (spec §1, §2, §7)


def oracle_dpo(lp, *, rc, rr, scored, types, weights, beta):
    """TRL 1.16's loss (spec §1, §2) from per-token log-probs lp [2B, T] (0 where not scored), chosen rows first:
    (loss, losses [K, B], chosen rewards, rejected rewards)."""
    B = lp.shape[0] // 2
    seq = lp.sum(-1)
    n = scored.sum(-1).clamp(min=1)
    pc, pr, nc, nr = seq[:B], seq[B:], n[:B], n[B:]
    xc, xr = pc - rc, pr - rr
    lsig = torch.nn.functional.logsigmoid
    terms = []
    for name in [types] if isinstance(types, str) else types:
        if name == "sigmoid":
            terms.append(-lsig(beta * (xc - xr)))
        elif name == "ipo":
            terms.append((xc / nc - xr / nr - 1 / (2 * beta)) ** 2)
        elif name == "sigmoid_norm":
            terms.append(-lsig(beta * (xc / nc - xr / nr)))
        elif name == "bco_pair":
            terms.append(-lsig(beta * xc) - lsig(-beta * xr))
        elif name == "sft":  # the token mean over all chosen completion tokens of the batch
            terms.append((-(lp[:B] * scored[:B]).sum() / scored[:B].sum()).expand_as(xc))
        else:
            raise AssertionError(name)
    weights = weights or [1.0] * len(terms)
    loss = sum(wk * t.mean() for wk, t in zip(weights, terms))
    return loss, torch.stack(terms), beta * xc.detach(), beta * xr.detach()


def _pairs(B=3, T=7, H=32, V=V_ODD, dtype=torch.float32):
    """[2B, T, H] chosen rows then rejected rows, TRL-style shifted labels (a prompt, then padding)."""
    h = torch.randn(2 * B, T, H).to(dtype)
    w = (torch.randn(V, H) * (2 / H**0.5)).to(dtype)
    b = (0.5 * torch.randn(V)).to(dtype)
    labels = torch.randint(0, V, (2 * B, T))
    for r in range(2 * B):
        start, end = int(torch.randint(1, 3, ())), int(torch.randint(4, T + 1, ()))
        labels[r, :start] = -100
        labels[r, end:] = -100
    return h, w, b, labels


LOSSES = {
    "sigmoid-ref_hidden": (dict(loss_type="sigmoid", beta=0.1), "ref_hidden"),
    "ipo-precomputed64": (dict(loss_type="ipo", beta=0.5), "precomputed"),
    "sigmoid_norm-ref_hidden_shared_head": (dict(loss_type="sigmoid_norm", beta=2.0), "ref_hidden_shared"),
    "mix-sft-precomputed32": (
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.2),
        "precomputed32",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES.keys())
def test_dpo_loss_from_hidden_oracle(case, backend, monkeypatch):
    _cpu_or_skip(backend)
    options, reference = LOSSES[case]
    transform = dict(softcap=9.0, logit_scale=1.2) if "sigmoid_norm" in case else {}
    _small_tiles(monkeypatch, 9, V_ODD, torch.float32)
    B, T, H = 3, 7, 32
    h, w, b, labels = _pairs(B, T, H)
    ref_h = h + 0.3 * torch.randn(h.shape)
    ref_w = w + 0.05 * torch.randn(w.shape) if reference == "ref_hidden" else w
    ref_b = b + 0.1 if reference == "ref_hidden" else b
    flat = labels.reshape(-1)
    scored = (labels != -100).double()

    def seqs(hh, ww, bb):
        z = oracle_z(hh.reshape(-1, H), ww, bb, **transform)
        lp = oracle_tokens(z, flat, -100)[0].view(2 * B, T)
        return lp, lp.sum(-1)

    with torch.no_grad():
        _, ref_seq = seqs(ref_h.double(), ref_w.double(), ref_b.double())
    rc64, rr64 = ref_seq[:B], ref_seq[B:]
    kwargs = dict(bias=None, backend=backend, **options, **transform)
    ref_leaf = ref_h.clone().requires_grad_()  # the reference never receives a gradient
    if reference == "ref_hidden":
        kwargs.update(ref_hidden=ref_leaf, ref_weight=ref_w, ref_bias=ref_b)
        args = ()
    elif reference == "ref_hidden_shared":
        kwargs.update(ref_hidden=ref_leaf)
        args = ()
    elif reference == "precomputed":
        args = (rc64, rr64)
    else:
        args = (rc64.float(), rr64.float())
        rc64, rr64 = rc64.float().double(), rr64.float().double()
    hl, wl, bl = (t.clone().requires_grad_() for t in (h, w, b))
    kwargs["bias"] = bl
    out = dk.dpo_loss_from_hidden(hl, wl, labels, *args, return_stats=True, **kwargs)
    out.loss.backward()
    assert ref_leaf.grad is None

    h64, w64, b64 = (t.double().requires_grad_() for t in (h, w, b))
    lp64, seq = seqs(h64, w64, b64)
    trl = dict(rc=rc64, rr=rr64, scored=scored, types=options["loss_type"], weights=options.get("loss_weights"))
    loss64, losses64, cr64, rr_rew64 = oracle_dpo(lp64, beta=options["beta"], **trl)
    grads64 = torch.autograd.grad(loss64, (h64, w64, b64))
    # first-order tolerances: Σ over tokens of |∂(loss or a per-pair loss)/∂lp| · the log-prob tolerance
    lp_leaf = lp64.detach().requires_grad_()
    (g_tok,) = torch.autograd.grad(oracle_dpo(lp_leaf, beta=options["beta"], **trl)[0], lp_leaf)
    lp_tol = (OUT_ATOL + OUT_RTOL * lp64.detach().abs()) * scored
    loss_tol = OUT_ATOL + (g_tok.abs() * lp_tol).sum().item()
    jac = torch.autograd.functional.jacobian(lambda t: oracle_dpo(t, beta=options["beta"], **trl)[1], lp_leaf)
    losses_tol = OUT_ATOL + (jac.abs() * lp_tol).sum((-2, -1))

    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    torch.testing.assert_close(out.loss.double(), loss64.detach(), atol=loss_tol, rtol=OUT_RTOL)
    assert out.losses.shape == losses64.shape
    assert ((out.losses.double() - losses64.detach()).abs() <= losses_tol + OUT_RTOL * losses64.abs()).all()
    seq_tol = T * OUT_ATOL + OUT_RTOL * seq.detach().abs().max().item()
    torch.testing.assert_close(out.chosen_logps.double(), seq[:B].detach(), atol=seq_tol, rtol=OUT_RTOL)
    torch.testing.assert_close(out.rejected_logps.double(), seq[B:].detach(), atol=seq_tol, rtol=OUT_RTOL)
    beta = options["beta"]
    torch.testing.assert_close(out.chosen_rewards.double(), cr64, atol=beta * seq_tol, rtol=OUT_RTOL)
    torch.testing.assert_close(out.rejected_rewards.double(), rr_rew64, atol=beta * seq_tol, rtol=OUT_RTOL)
    # metrics (spec §7) from the oracle's per-token stats
    with torch.no_grad():
        z = oracle_z(h64.reshape(-1, H), w64, b64, **transform)
        _, ent, mean, top1, _ = oracle_tokens(z, flat, -100)
        m = scored.reshape(-1).bool()
        chosen = torch.zeros(2 * B, T, dtype=torch.bool)
        chosen[:B] = True
        chosen = chosen.reshape(-1) & m
        rejected = m & ~chosen
        expect = {
            "rewards/chosen": cr64.mean(),
            "rewards/rejected": rr_rew64.mean(),
            "rewards/margins": (cr64 - rr_rew64).mean(),
            "rewards/accuracies": (cr64 > rr_rew64).double().mean(),
            "logps/chosen": seq[:B].mean(),
            "logps/rejected": seq[B:].mean(),
            "logits/chosen": mean[chosen].sum() / chosen.sum(),
            "logits/rejected": mean[rejected].sum() / rejected.sum(),
            "entropy": ent[m].sum() / m.sum(),
            "mean_token_accuracy": top1[chosen].double().sum() / chosen.sum(),
        }
    for key, value in expect.items():
        assert key in out.metrics, key
        torch.testing.assert_close(out.metrics[key].double(), value, atol=seq_tol, rtol=OUT_RTOL, msg=key)
    # gradients (fp32): the loss's per-token gradient g_tok through the head, bounded as in check_grads
    bounds = oracle_head(h.reshape(-1, H), w, b, flat, g=g_tok.reshape(-1), **transform)
    # the library's per-token gradient comes from its own log-probs: off by up to |∂²L/∂lp²| · lp_tol (ipo's
    # 2(u − 1/(2β)) can be near 0, where that is most of it), carried through the head like g itself
    hess = torch.autograd.functional.hessian(lambda t: oracle_dpo(t, beta=options["beta"], **trl)[0], lp_leaf)
    dg = (hess.abs() * lp_tol).sum((-2, -1))
    extra = oracle_head(h.reshape(-1, H), w, b, flat, g=dg.reshape(-1), **transform)["bounds"]
    got = dict(h=hl.grad.reshape(-1, H), w=wl.grad, b=bl.grad)
    for name, ref64 in zip(("h", "w", "b"), (grads64[0].reshape(-1, H), grads64[1], grads64[2])):
        torch.testing.assert_close(ref64, bounds["grads"][name])  # the oracle's two routes agree
    check_grads(got, bounds, GRAD_FP32_REL, extra=extra)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_loss_from_hidden_bf16_values(backend, monkeypatch):
    """bf16 hidden states and head: the loss within the first-order bound of the bf16 tile's log-prob error."""
    _cpu_or_skip(backend)
    _small_tiles(monkeypatch, 9, V_ODD, torch.bfloat16)
    B, T, H = 3, 7, 32
    h, w, b, labels = _pairs(B, T, H, dtype=torch.bfloat16)
    rc, rr = -30 * torch.rand(B, dtype=torch.float64), -30 * torch.rand(B, dtype=torch.float64)
    out = dk.dpo_loss_from_hidden(h, w, labels, rc, rr, bias=b, backend=backend, beta=0.5, keep_logits=True)
    z = oracle_z(h.reshape(-1, H).double(), w.double(), b.double())
    lp = oracle_tokens(z, labels.reshape(-1), -100)[0].view(2 * B, T)
    seq = lp.sum(-1)
    n = (labels != -100).sum(-1).double()
    scored = (labels != -100).double()
    loss = oracle_dpo(lp, rc=rc, rr=rr, scored=scored, types="sigmoid", weights=None, beta=0.5)[0]
    zerr = logit_err(h.reshape(-1, H), w, b, torch.bfloat16)
    seq_tol = n * (OUT_ATOL + 2 * zerr) + OUT_RTOL * seq.abs()
    torch.testing.assert_close(out.chosen_logps.double(), seq[:B], atol=seq_tol.max().item(), rtol=0)
    torch.testing.assert_close(out.rejected_logps.double(), seq[B:], atol=seq_tol.max().item(), rtol=0)
    # |∂loss/∂seq| ≤ β / B per sequence for sigmoid
    torch.testing.assert_close(out.loss.double(), loss, atol=OUT_ATOL + 0.5 / B * seq_tol.sum().item(), rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# bad options → clear errors


def _bad_head_calls():
    h, w, labels = torch.randn(4, 8), torch.randn(11, 8), torch.tensor([0, 1, -100, 10])
    ok = dict(hidden=h, weight=w, labels=labels)
    return ok, [
        (dict(impl="fused", backend="cpu"), ValueError,
         "impl='fused' is the all-Triton head: it needs the triton backend and fp32/bf16/fp16 hidden states; this "
         "call runs on 'cpu'"),
        (dict(keep_logits="yes"), ValueError, "keep_logits must be True, False or 'auto', got 'yes'"),
        (dict(keep_logits=None), ValueError, "keep_logits must be True, False or 'auto', got None"),
        (dict(keep_logits=1), ValueError, "keep_logits must be True, False or 'auto', got 1"),
        (dict(impl="nope"), ValueError, "unknown impl 'nope'; valid: tile, fused"),
        (dict(tile_dtype=torch.bfloat16), ValueError,
         "tile_dtype must be None (the GEMM's dtype) or torch.float32, got torch.bfloat16"),
        (dict(tile_dtype="fp32"), ValueError,
         "tile_dtype must be None (the GEMM's dtype) or torch.float32, got 'fp32'"),
        (dict(impl="fused", backend="triton", deterministic=True), ValueError,
         "impl='fused' never builds a logits tile: keep_logits=True and deterministic=True need impl='tile'"),
        (dict(impl="fused", backend="triton", keep_logits=True), ValueError,
         "impl='fused' never builds a logits tile: keep_logits=True and deterministic=True need impl='tile'"),
        (dict(backend="gpu"), ValueError, "unknown backend 'gpu'; valid: triton, cpu, reference"),
        (dict(weight=torch.randn(11, 9)), ValueError, "hidden must have shape [..., H] with H = 9, got (4, 8)"),
        (dict(weight=torch.randn(11)), ValueError, "weight must have shape [V, H] with V, H >= 1, got (11,)"),
        (dict(bias=torch.randn(10)), ValueError, "bias must be a [11] tensor"),
        (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0, got 0.0"),
        (dict(softcap=math.inf), ValueError, "softcap must be None or a finite number > 0, got inf"),
        (dict(logit_scale=-1.0), ValueError, "logit_scale must be a finite number > 0, got -1.0"),
        (dict(hidden=torch.ones(4, 8, dtype=torch.long)), TypeError, "hidden must be a floating-point tensor"),
        (dict(weight=torch.ones(11, 8, dtype=torch.long)), TypeError, "weight must be a floating-point tensor"),
        (dict(labels=torch.tensor([0, 1, 11, 2])), ValueError,
         "labels must be in [0, 11) or equal ignore_index=-100; found [11]"),
    ]  # fmt: skip


def test_linear_token_logps_bad_input():
    ok, cases = _bad_head_calls()
    for change, error, message in cases:
        if change.get("backend") == "triton":
            continue  # test_linear_token_logps_bad_fused_options (needs the triton backend)
        args = {**ok, **change}
        kwargs = {k: v for k, v in args.items() if k not in ("hidden", "weight", "labels")}
        with pytest.raises(error, match=re.escape(message)):
            dk.linear_token_logps(args["hidden"], args["weight"], args["labels"], **kwargs)
    # the same option checks on dpo_loss_from_hidden, before any GEMM
    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    labels = torch.tensor([[0, 1, -100], [2, -100, -100]])
    rc = torch.zeros(1)
    for change, error, message in cases[:3]:
        with pytest.raises(error, match=re.escape(message)):
            dk.dpo_loss_from_hidden(h, w, labels, rc, rc, **change)
    with pytest.raises(ValueError, match=re.escape("ref_hidden shape (2, 2, 8) must match hidden's (2, 3, 8)")):
        dk.dpo_loss_from_hidden(h, w, labels, ref_hidden=torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match="give the reference exactly one way"):
        dk.dpo_loss_from_hidden(h, w, labels, rc, rc, ref_hidden=h)
    with pytest.raises(ValueError, match="pass both ref_chosen_logps and ref_rejected_logps, or neither"):
        dk.dpo_loss_from_hidden(h, w, labels, rc)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        dk.dpo_loss_from_hidden(h, w, labels, rc, rc, loss_type="dpo")
    # tile_dtype is checked on the vocabulary-parallel entries too (their tiles are fp32 anyway), before any group
    message = re.escape("tile_dtype must be None (the GEMM's dtype) or torch.float32, got torch.float16")
    with pytest.raises(ValueError, match=message):
        dk.dpo_loss_from_hidden(h, w, labels, rc, rc, vocab_parallel=True, tile_dtype=torch.float16)
    with pytest.raises(ValueError, match=message):
        dk.linear_token_logps(h, w, labels, vocab_parallel=True, tile_dtype=torch.float16)


@pytest.mark.triton
def test_linear_token_logps_bad_fused_options():
    ok, cases = _bad_head_calls()
    triton_cases = [case for case in cases if case[0].get("backend") == "triton"]
    assert len(triton_cases) == 2
    for change, error, message in triton_cases:
        with pytest.raises(error, match=re.escape(message)):
            dk.linear_token_logps(ok["hidden"], ok["weight"], ok["labels"], **change)
