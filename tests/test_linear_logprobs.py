"""The fused head's two implementations against the explicit float64 oracle: the all-Triton head
(ops/linear_logprobs.py launchers, impl="fused") and the tile path (dpo_kernels.chunked: torch.mm + the row kernels
of the cpu and triton backends, the default).

The oracle builds the logits: z = transform(hidden.double() @ weight.double().T + bias), then runs
`reference.token_logps` on them and differentiates in float64. All kernel calls of a test run first, then the
asserts. Interpreter shapes stay tiny (N <= 40, H <= 32, V <= 200); real vocabularies are under `gpu`.
"""

import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, GRAD_TOL, assert_out_close, tile_linear_token_logps, tile_out_tol

from dpo_kernels import reference
from dpo_kernels.ops import linear_logprobs as ops

IGNORE = -100
STAT_NAMES = ("entropy", "mean_logit", "is_top1", "log_sum_sq_probs")

# The gradients come out of GEMMs: grad_hidden = dy · W, grad_weight = dyᵀ · hidden with dy rounded to the input
# dtype before the product (tensor cores multiply 16-bit operands) and an fp32 sum in another order than the
# oracle's. The error of such a sum is bounded by the sum of the magnitudes of its terms, not by the magnitude of
# the result (which cancellation can make arbitrarily small), so the table's element-wise rtol does not apply.
# This is the one looser tolerance of the file:
#     |out - ref| <= atol + eps(dtype) · |ref| + GEMM_RTOL[dtype] · (|dy| · |W|, |dy|ᵀ · |hidden|, Σ|dy|)
# with eps(dtype) the final rounding, and GEMM_RTOL the rounding of dy to the dtype (half an ulp per term, doubled
# for the fp32 sums) or, for fp32 inputs, the fp32 sum itself (K · 2^-24 with K up to 200 terms here).
GEMM_RTOL = {torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps, torch.float16: 1e-3}


# ----------------------------------------------------------------------------------------------------------------
# inputs, the oracle, the two implementations


TRANSFORMS = {  # (temperature, softcap, logit_scale, bias)
    "plain": (1.0, None, 1.0, False),
    "softcap-T-scale-bias": (0.7, 4.0, 1.3, True),  # Gemma-like softcap, TRL's temperature and a biased head
}


def _problem(N, H, V, dtype, *, bias=False, ignored=3):
    """hidden [N, H], weight [V, H] (scaled so that the logits spread over a few units), bias, labels with the
    edges: token 0 → column 0, token 1 → column V - 1, `ignored` tokens spread through the batch."""
    hidden = torch.randn(N, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * (2.0 / H**0.5)).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[0], labels[1] = 0, V - 1
    if ignored:
        labels[torch.linspace(2, N - 1, ignored).long()] = IGNORE
    return hidden, weight, b, labels


def _oracle(hidden, weight, bias, labels, g, g_h=None, *, temperature=1.0, softcap=None, logit_scale=1.0, upcast=True):
    """Explicit logits in float64 (upcast=False: plain torch in the inputs' dtype) → reference.token_logps.

    Returns (logps, lse, stats, grads, bounds): grads of Σ g·logp + g_h·entropy for hidden, weight (and bias);
    bounds are the GEMM_RTOL magnitudes |dy|·|W|, |dy|ᵀ·|hidden| (and Σ|dy|), float64."""
    cast = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach())
    leaves = [cast(hidden).requires_grad_(), cast(weight).requires_grad_()]
    if bias is not None:
        leaves.append(cast(bias).requires_grad_())
    y = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0.0)
    z = y * logit_scale if softcap is None else softcap * torch.tanh(y * logit_scale / softcap)
    logps, st = reference.token_logps(z, labels, ignore_index=IGNORE, temperature=temperature, return_stats=True)
    loss = (logps * g.to(logps.dtype)).sum()
    if g_h is not None:
        loss = loss + (st.entropy * g_h.to(logps.dtype)).sum()
    *grads, dy = torch.autograd.grad(loss, leaves + [y])
    lse = torch.logsumexp(z.detach().double() / temperature, dim=-1)
    dy, h, w = dy.double().abs(), leaves[0].detach().double().abs(), leaves[1].detach().double().abs()
    bounds = [dy @ w, dy.T @ h] + ([dy.sum(0)] if bias is not None else [])
    return logps.detach(), lse, st, grads, bounds


def _run(hidden, weight, bias, labels, g, g_h=None, *, temperature=1.0, softcap=None, logit_scale=1.0, config=None):
    """Forward then backward through the launchers: (logps, lse, stats, grads)."""
    opts = dict(bias=bias, ignore_index=IGNORE, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    logps, lse, st = ops.linear_logprobs_fwd(hidden, weight, labels, **opts, return_stats=True, config=config)
    grads = ops.linear_logprobs_bwd(
        hidden, weight, labels, lse, g, **opts, grad_entropy=g_h, entropy=st[0], config=config
    )
    return logps, lse, st, [t for t in grads if t is not None]


def _run_tile(hidden, weight, bias, labels, g, g_h=None, *, backend, rows=8, **options):
    """The tile path, by default 8 rows per chunk (several chunks, the last one partial): (logps, stats, grads)."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logps, st = tile_linear_token_logps(
        leaves[0], leaves[1], labels, backend=backend, bias=leaves[2] if bias is not None else None,
        ignore_index=IGNORE, return_stats=True, rows=rows, **options,
    )  # fmt: skip
    loss = (logps * g).sum() + ((st[0] * g_h).sum() if g_h is not None else 0.0)
    return logps.detach(), st.detach(), torch.autograd.grad(loss, leaves)


def _assert_stats_close(st, st_ref, rows=slice(None), **tol):
    for k, name in enumerate(STAT_NAMES):
        ref = getattr(st_ref, name).detach().double()[rows]
        assert_out_close(st[k][rows], ref, msg=lambda m, name=name: f"stats.{name}: {m}", **tol)


def _assert_gemm_grads_close(grads, grads_ref, bounds, grads_pt=None, z_absmax=0.0):
    """Each gradient within GEMM_RTOL of the float64 one (see the table above), and, for 16-bit inputs, at most
    2x as far from it as plain torch in the same dtype (flash-attn's rule) plus atol.

    `z_absmax` (the tile path's 16-bit tiles): the logits themselves are rounded to the dtype, so p = exp(z - lse)
    carries a relative error up to eps · 2 max|z| (z and lse half an ulp each) and so does each term of dy; and on
    the CPU each chunk's dW product comes out of the GEMM rounded to the dtype before its fp32 sum over chunks (half
    an ulp of a sum bounded by its terms): GEMM_RTOL · (1.5 + 2 max|z|)."""
    for name, out, ref, bound, pt in zip(
        ("hidden", "weight", "bias"), grads, grads_ref, bounds, grads_pt or [None] * 3
    ):
        dtype = out.dtype
        atol = GRAD_TOL[dtype]["atol"]
        err = (out.double() - ref.double()).abs()
        tile = 1.5 + 2.0 * z_absmax if dtype != torch.float32 and z_absmax else 1.0
        allowed = atol + torch.finfo(dtype).eps * ref.double().abs() + GEMM_RTOL[dtype] * tile * bound
        worst = (err / allowed).nan_to_num(nan=float("inf")).max().item()
        assert worst <= 1.0, f"grad_{name} ({dtype}): max error {err.max().item():.3g}, {worst:.3g}x the allowed"
        if pt is not None and dtype != torch.float32:
            err_pt = (pt.double() - ref.double()).abs().max().item()
            assert err.max().item() <= 2 * err_pt + atol, (
                f"grad_{name}: {err.max().item():.3g} > 2 × torch's {err_pt:.3g}"
            )


# A config with small tiles: 3 vocabulary splits, 4 backward chunks (the last one partial), H not a multiple of
# block_k / block_h (masked reductions), several token blocks.
SMALL_TILES = ops.LinearLaunchConfig(block_n=16, block_v=32, block_h=16, block_k=16, vocab_splits=3, vocab_chunk=64)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


# N = 37 with V = 200: neither a multiple of a tile (the default config's 64 x 128 tiles: one partial token block,
# one partial vocabulary tile).
CASES = [pytest.param(dt, tf, id=f"N37-H32-V200-{dt}-{tf}") for dt in DTYPES for tf in TRANSFORMS]


@pytest.mark.triton
@pytest.mark.parametrize("dtype, transform", CASES)
def test_linear_logprobs(dtype, transform):
    temperature, softcap, logit_scale, has_bias = TRANSFORMS[transform]
    opts = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    hidden, weight, bias, labels = _problem(37, 32, 200, DTYPES[dtype], bias=has_bias)
    g, g_h = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    logps, lse, st, grads = _run(hidden, weight, bias, labels, g, g_h, **opts)
    logps_ref, lse_ref, st_ref, grads_ref, bounds = _oracle(hidden, weight, bias, labels, g, g_h, **opts)
    grads_pt = _oracle(hidden, weight, bias, labels, g, g_h, **opts, upcast=False)[3]
    scored = labels != IGNORE
    assert logps.dtype == lse.dtype == st.dtype == torch.float32 and st.shape == (4, 37)
    assert [t.dtype for t in grads] == [hidden.dtype] * len(grads)
    assert_out_close(logps, logps_ref)
    assert_out_close(lse[scored], lse_ref[scored])
    _assert_stats_close(st, st_ref)
    assert (logps[~scored] == 0).all() and (lse[~scored] == 0).all() and (st[:, ~scored] == 0).all()
    _assert_gemm_grads_close(grads, grads_ref, bounds, grads_pt)
    assert (grads[0][~scored] == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_linear_logprobs_many_tiles(dtype):
    """Small tiles: the forward merges 3 vocabulary splits, the backward accumulates dH over 4 chunks in fp32,
    and H = 24 leaves partial reduction and output tiles."""
    opts = dict(temperature=0.7, softcap=4.0, logit_scale=1.3)
    hidden, weight, bias, labels = _problem(40, 24, 200, DTYPES[dtype], bias=True, ignored=5)
    g, g_h = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    logps, lse, st, grads = _run(hidden, weight, bias, labels, g, g_h, **opts, config=SMALL_TILES)
    plain = ops.linear_logprobs_fwd(hidden, weight, labels, bias=bias, **opts, config=SMALL_TILES)
    logps_ref, lse_ref, st_ref, grads_ref, bounds = _oracle(hidden, weight, bias, labels, g, g_h, **opts)
    scored = labels != IGNORE
    assert_out_close(logps, logps_ref)
    assert_out_close(plain[0], logps_ref)
    assert plain[2] is None
    assert_out_close(lse[scored], lse_ref[scored])
    _assert_stats_close(st, st_ref)
    _assert_gemm_grads_close(grads, grads_ref, bounds)


@pytest.mark.triton
@pytest.mark.parametrize("which", ["logps", "entropy"])
def test_linear_logprobs_one_upstream_grad(which):
    """Only grad_logps, or only grad_entropy (grad_logps=None)."""
    hidden, weight, bias, labels = _problem(20, 32, 100, torch.float32)
    g = torch.randn(20, device=DEVICE)
    zero = torch.zeros(20, device=DEVICE)
    logps, lse, st = ops.linear_logprobs_fwd(hidden, weight, labels, return_stats=True)
    if which == "logps":
        grads = ops.linear_logprobs_bwd(hidden, weight, labels, lse, g)
        *_, grads_ref, bounds = _oracle(hidden, weight, bias, labels, g)
    else:
        grads = ops.linear_logprobs_bwd(hidden, weight, labels, lse, None, grad_entropy=g, entropy=st[0])
        *_, grads_ref, bounds = _oracle(hidden, weight, bias, labels, zero, g)
    assert grads[2] is None
    _assert_gemm_grads_close(grads[:2], grads_ref, bounds)
    # a frozen output layer: grad_hidden alone, the same values
    frozen = ops.linear_logprobs_bwd(hidden, weight, labels, lse, g, weight_grad=False)
    assert frozen[1] is None and frozen[2] is None
    if which == "logps":
        torch.testing.assert_close(frozen[0], grads[0], rtol=0, atol=0)


@pytest.mark.triton
def test_linear_logprobs_softcap_padding():
    """Under a softcap every real logit sits near -softcap / T; the padding columns of the last vocabulary tile
    (V = 100 of 128) would have tanh(0) = 0 and win the softmax unless they are -inf after the transform."""
    hidden, weight, _, labels = _problem(8, 32, 100, torch.float32, ignored=0)
    bias = torch.full((100,), -50.0, device=DEVICE)
    opts = dict(bias=bias, softcap=2.0, ignore_index=IGNORE)
    logps, lse, st = ops.linear_logprobs_fwd(hidden, weight, labels, **opts, return_stats=True)
    logps_ref, lse_ref, st_ref = _oracle(hidden, weight, bias, labels, torch.ones(8, device=DEVICE), softcap=2.0)[:3]
    assert_out_close(logps, logps_ref)
    assert_out_close(lse, lse_ref)
    _assert_stats_close(st, st_ref)


@pytest.mark.triton
def test_linear_logprobs_top1_ties():
    """TRL's first-argmax rule across tiles and vocabulary splits: with zero hidden states the logits are the bias;
    the maximum appears at columns 10, 150 (another split) and 195 (the last split, partial tile)."""
    V = 200
    hidden = torch.zeros(4, 16, device=DEVICE)
    weight = torch.randn(V, 16, device=DEVICE)
    bias = torch.randn(V, device=DEVICE).clamp(max=2.0)
    bias[[10, 150, 195]] = 5.0
    labels = torch.tensor([10, 150, 195, 3], device=DEVICE)
    _, _, st = ops.linear_logprobs_fwd(hidden, weight, labels, bias=bias, return_stats=True, config=SMALL_TILES)
    _, _, st_ref, *_ = _oracle(hidden, weight, bias, labels, torch.ones(4, device=DEVICE))
    assert st[2].tolist() == [1.0, 0.0, 0.0, 0.0] == st_ref.is_top1.double().tolist()
    equal = torch.zeros(V, device=DEVICE)  # equal logits: log p = -log V, entropy log V
    logps, _, st = ops.linear_logprobs_fwd(hidden, weight, labels, bias=equal, return_stats=True, config=SMALL_TILES)
    log_v = torch.full((4,), np.log(V), dtype=torch.float64)
    assert_out_close(logps, -log_v)
    assert_out_close(st[0], log_v)
    assert_out_close(st[3], -log_v)
    assert st[2].tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.triton
def test_linear_logprobs_strided_rows():
    """Rows of wider tensors (hidden[:, :-1]-style views, a weight slice): any row stride, unit stride along H."""
    N, H, V = 12, 32, 100
    wide_h = torch.randn(N, H + 9, device=DEVICE, dtype=torch.bfloat16)
    wide_w = (torch.randn(V, H + 5, device=DEVICE) * 0.3).to(torch.bfloat16)
    hidden, weight = wide_h[:, 4 : 4 + H], wide_w[:, :H]
    labels = _problem(N, H, V, torch.float32)[3]
    g = torch.randn(N, device=DEVICE)
    logps, lse, _, grads = _run(hidden, weight, None, labels, g)
    logps_ref, _, _, grads_ref, bounds = _oracle(hidden, weight, None, labels, g)
    assert_out_close(logps, logps_ref)
    _assert_gemm_grads_close(grads, grads_ref, bounds)
    assert grads[0].is_contiguous() and grads[1].is_contiguous()


@pytest.mark.triton
def test_linear_logprobs_ignored():
    """Every token ignored: zeros everywhere, the weight gradient too (written, not left as poison); N = 0."""
    hidden, weight, bias, _ = _problem(5, 16, 50, torch.bfloat16, bias=True)
    labels = torch.full((5,), IGNORE, device=DEVICE)
    g = torch.randn(5, device=DEVICE)
    logps, lse, st, grads = _run(hidden, weight, bias, labels, g, g)
    assert (logps == 0).all() and (st == 0).all() and all((t == 0).all() for t in grads)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logps, lse, st, grads = _run(hidden[:0], weight, bias, empty, g[:0], g[:0])
    assert logps.shape == lse.shape == (0,) and st.shape == (4, 0) and grads[0].shape == (0, 16)
    assert all((t == 0).all() for t in grads[1:])


@pytest.mark.triton
def test_linear_logprobs_ignore_index_and_bad_labels():
    """ignore_index=0 skips label 0; -100 is then out of range: NaN log-prob and stats, is_top1 0, for that token
    (and a NaN gradient, which reaches every weight row through the sum over tokens); the other tokens are exact."""
    hidden, weight, _, _ = _problem(6, 32, 100, torch.float32)
    labels = torch.tensor([0, 5, IGNORE, 99, 100, 7], device=DEVICE)
    logps, _, st = ops.linear_logprobs_fwd(hidden, weight, labels, ignore_index=0, return_stats=True)
    good = torch.tensor([1, 3, 5], device=DEVICE)
    logps_ref = _oracle(hidden[good], weight, None, labels[good], torch.ones(3, device=DEVICE))[0]
    assert logps[0] == 0 and (st[:, 0] == 0).all()
    assert logps[[2, 4]].isnan().all() and st[[0, 1, 3]][:, [2, 4]].isnan().all() and (st[2, [2, 4]] == 0).all()
    assert_out_close(logps[good], logps_ref)


@pytest.mark.triton
def test_linear_logprobs_nan_hidden():
    """A NaN in one hidden state: that token's outputs and grad_hidden row are NaN, the other tokens exact."""
    hidden, weight, _, labels = _problem(6, 32, 100, torch.float32, ignored=0)
    hidden[2, 7] = float("nan")
    g = torch.randn(6, device=DEVICE)
    logps, _, st, grads = _run(hidden, weight, None, labels, g)
    good = torch.tensor([0, 1, 3, 4, 5], device=DEVICE)
    logps_ref, _, st_ref, grads_ref, bounds = _oracle(hidden[good], weight, None, labels[good], g[good])
    assert logps[2].isnan() and st[[0, 1, 3], 2].isnan().all() and st[2, 2] == 0 and grads[0][2].isnan().all()
    assert_out_close(logps[good], logps_ref)
    _assert_stats_close(st[:, good], st_ref)
    _assert_gemm_grads_close([grads[0][good]], grads_ref[:1], bounds[:1])


# ----------------------------------------------------------------------------------------------------------------
# the tile path (chunked.py)

TILE_BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "cpu"]


def _z_absmax(hidden, weight, bias, temperature=1.0, softcap=None, logit_scale=1.0):
    y = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
    z = y * logit_scale if softcap is None else softcap * torch.tanh(y * logit_scale / softcap)
    return (z / temperature).abs().max().item()


@pytest.mark.parametrize("keep_logits", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("backend", TILE_BACKENDS)
@pytest.mark.parametrize("dtype, transform", CASES)
def test_tile_linear_token_logps(dtype, transform, backend, keep_logits):
    temperature, softcap, logit_scale, has_bias = TRANSFORMS[transform]
    opts = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    dtype = DTYPES[dtype]
    hidden, weight, bias, labels = _problem(37, 32, 200, dtype, bias=has_bias)
    g, g_h = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    logps, st, grads = _run_tile(hidden, weight, bias, labels, g, g_h, backend=backend, keep_logits=keep_logits, **opts)
    logps_ref, _, st_ref, grads_ref, bounds = _oracle(hidden, weight, bias, labels, g, g_h, **opts)
    z_absmax = _z_absmax(hidden, weight, bias, **opts)
    tol = tile_out_tol(dtype, z_absmax)
    assert logps.dtype == st.dtype == torch.float32
    assert_out_close(logps, logps_ref, **tol)
    # is_top1 of 16-bit tiles: two logits can round to one value, and the first then wins (as in a bf16 model)
    for k in (0, 1, 3):
        assert_out_close(st[k], getattr(st_ref, STAT_NAMES[k]).double(), **tol)
    if dtype == torch.float32:
        assert torch.equal(st[2] > 0.5, st_ref.is_top1)
    # dy is written into the tile (rounded to its dtype) and the gradients come out of GEMMs: the GEMM rule
    _assert_gemm_grads_close(grads, grads_ref, bounds, z_absmax=z_absmax)
    assert (grads[0][labels == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", TILE_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_tile_keep_logits_changes_nothing(backend, dtype):
    """The kept tiles are the recomputed ones: values and gradients bitwise equal, several chunks, with a bias and
    the softcap; a second backward through the kept tiles gives the same gradients again."""
    hidden, weight, bias, labels = _problem(37, 32, 200, DTYPES[dtype], bias=True)
    g, g_h = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    opts = dict(backend=backend, temperature=0.7, softcap=4.0, logit_scale=1.3)
    outs = [_run_tile(hidden, weight, bias, labels, g, g_h, keep_logits=keep, **opts) for keep in (False, True)]
    for a, b in zip((outs[0][0], outs[0][1], *outs[0][2]), (outs[1][0], outs[1][1], *outs[1][2])):
        assert torch.equal(a, b)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight)]
    logps, _ = tile_linear_token_logps(*leaves, labels, backend=backend, rows=8, keep_logits=True)
    first = torch.autograd.grad(logps, leaves, g, retain_graph=True)
    second = torch.autograd.grad(logps, leaves, g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", TILE_BACKENDS)
@pytest.mark.parametrize("options", [{}, {"keep_logits": True}, {"deterministic": True}], ids=["plain", "keep", "det"])
def test_tile_vocab_split(backend, options, monkeypatch):
    """A vocabulary split into column blocks (from chunked.VOCAB_SPLIT columns; shrunk here): the blocks' row
    partials merged as across vocabulary shards, the backward block by block from the whole rows' lse: values,
    stats (is_top1 with ties across a block boundary) and gradients as the float64 oracle, several row chunks."""
    from dpo_kernels import chunked

    monkeypatch.setattr(chunked, "VOCAB_SPLIT", 128)
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 64)
    assert len(chunked.vocab_blocks(200)) == 4
    opts = dict(temperature=0.7, softcap=4.0, logit_scale=1.3)
    hidden, weight, bias, labels = _problem(37, 32, 200, torch.float32, bias=True)
    # rows 3 and 4 peak on a tie across the block boundary at 50 (columns 49 and 50): the first column wins
    hidden[4] = hidden[3]
    weight[49] = weight[50] = 0.5 * hidden[3]
    bias[50] = bias[49]
    labels[3], labels[4] = 49, 50
    g, g_h = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    logps, st, grads = _run_tile(hidden, weight, bias, labels, g, g_h, backend=backend, **opts, **options)
    logps_ref, _, st_ref, grads_ref, bounds = _oracle(hidden, weight, bias, labels, g, g_h, **opts)
    assert_out_close(logps, logps_ref)
    for k in (0, 1, 3):
        assert_out_close(st[k], getattr(st_ref, STAT_NAMES[k]).double())
    assert torch.equal(st[2] > 0.5, st_ref.is_top1) and st_ref.is_top1[3] and not st_ref.is_top1[4]
    _assert_gemm_grads_close(grads, grads_ref, bounds)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("keep_logits", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("backend", TILE_BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tile_fp32_tiles(dtype, backend, keep_logits, split, monkeypatch):
    """tile_dtype=torch.float32 from 16-bit operands: log-probs and stats from unrounded logits, so within the fp32
    tolerance of the float64 oracle (the default 16-bit tiles are not: checked on the same inputs), is_top1 exact;
    gradients by the GEMM rule without the tile's rounding (dy is rounded to the dtype for the GEMMs); several
    chunks, softcap, temperature, logit scale and a bias; with kept tiles and a split vocabulary."""
    from dpo_kernels import chunked

    if split:
        monkeypatch.setattr(chunked, "VOCAB_SPLIT", 128)
        monkeypatch.setattr(chunked, "VOCAB_BLOCK", 64)
    monkeypatch.setattr(chunked, "UPCAST_COLUMNS", 48)  # the CPU's upcast weight blocks, the last one partial
    temperature, softcap, logit_scale, _ = TRANSFORMS["softcap-T-scale-bias"]
    opts = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    dtype = DTYPES[dtype]
    hidden, weight, bias, labels = _problem(37, 32, 200, dtype, bias=True)
    g, g_h = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    run = dict(backend=backend, keep_logits=keep_logits, **opts)
    logps, st, grads = _run_tile(hidden, weight, bias, labels, g, g_h, **run, fp32_tile=True)
    logps_16, _, _ = _run_tile(hidden, weight, bias, labels, g, g_h, **run)
    logps_ref, _, st_ref, grads_ref, bounds = _oracle(hidden, weight, bias, labels, g, g_h, **opts)
    assert [t.dtype for t in grads] == [dtype] * 3
    assert_out_close(logps, logps_ref)
    for k in (0, 1, 3):
        assert_out_close(st[k], getattr(st_ref, STAT_NAMES[k]).double())
    assert torch.equal(st[2] > 0.5, st_ref.is_top1)
    err, err_16 = ((x.double() - logps_ref).abs().max().item() for x in (logps, logps_16))
    assert err_16 > 1e-5 >= err, f"fp32 tiles {err:.3g} vs 16-bit tiles {err_16:.3g} from the float64 log-probs"
    _assert_gemm_grads_close(grads, grads_ref, bounds)


def test_tile_fp32_tiles_public_and_autocast():
    """Through the public function (bf16 hidden and weight) and under bf16 autocast with fp32 parameters (autocast's
    bf16 GEMM is what the default tile gets; fp32 tiles run the GEMM on fp32 operands), on the default backend and
    on the reference one: values within the fp32 tolerance of float64, gradients in the parameters' dtypes."""
    import dpo_kernels as dk

    N, H, V = 6, 32, 300
    hidden, weight, bias, labels = _problem(N, H, V, torch.float32, bias=True, ignored=1)
    for backend in (None, "reference"):
        for h, w, b, autocast in ((hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), False),
                                  (hidden, weight, bias, True)):  # fmt: skip
            leaves = [t.clone().requires_grad_() for t in (h, w, b)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logps = dk.linear_token_logps(
                    leaves[0], leaves[1], labels, bias=leaves[2], tile_dtype=torch.float32, backend=backend
                )
            grads = torch.autograd.grad(logps.sum(), leaves)
            assert [t.dtype for t in grads] == [h.dtype] * 3
            ref = reference.linear_token_logps(h.double(), w.double(), labels, bias=b.double(), ignore_index=IGNORE)
            assert_out_close(logps, ref, msg=lambda m: f"backend {backend}, autocast {autocast}: {m}")  # noqa: B023


def test_tile_linear_token_logps_edges():
    """Every token ignored, a label out of range (NaN there, is_top1 0, like the kernels), no stats requested."""
    hidden, weight, _, _ = _problem(4, 8, 30, torch.float32)
    logps, st = tile_linear_token_logps(hidden, weight, torch.full((4,), IGNORE))
    assert st is None and (logps == 0).all()
    logps, st = tile_linear_token_logps(hidden, weight, torch.tensor([1, 30, -1, IGNORE]), return_stats=True)
    ref = torch.log_softmax(hidden.double() @ weight.double().T, -1)[0, 1]
    assert_out_close(logps[0], ref)
    assert logps[1:3].isnan().all() and st[[0, 1, 3], 1:3].isnan().all() and (st[2, 1:3] == 0).all()
    assert logps[3] == 0


def test_tile_linear_token_logps_autocast():
    """Forward under torch.autocast (bf16 GEMMs on the CPU, a bf16 tile), backward outside it: the backward
    recomputes the forward's very tiles (the autocast state is saved and restored), so its gradients equal those
    of the kept tiles bitwise; values match a float64 oracle of the same bf16 GEMM (torch's addmm in bf16, as
    autocast runs it), and the gradients the GEMM rule."""
    N, H, V = 6, 32, 300
    hidden, weight, bias, labels = _problem(N, H, V, torch.float32, bias=True, ignored=1)
    g, g_h = torch.randn(N), torch.randn(N)
    runs = []
    for keep in (False, True):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, st = tile_linear_token_logps(leaves[0], leaves[1], labels, bias=leaves[2], return_stats=True,
                                                rows=4, keep_logits=keep)  # fmt: skip
        grads = torch.autograd.grad([logps, st[0]], leaves, [g, g_h])  # outside autocast
        assert [t.dtype for t in grads] == [torch.float32] * 3
        runs.append((logps, st, grads))
    for a, b in zip((runs[0][0], runs[0][1], *runs[0][2]), (runs[1][0], runs[1][1], *runs[1][2])):
        assert torch.equal(a, b), "the recomputed tile differs from the forward's"
    logps, st, grads = runs[0]
    y = torch.addmm(bias.bfloat16(), hidden.bfloat16(), weight.bfloat16().T).double().requires_grad_()
    logps_ref, st_ref = reference.token_logps(y, labels, return_stats=True)
    (dy,) = torch.autograd.grad([logps_ref, st_ref.entropy], y, [g.double(), g_h.double()])
    assert_out_close(logps, logps_ref)
    assert_out_close(st[0], st_ref.entropy)
    grads_ref = (dy @ weight.bfloat16().double(), dy.T @ hidden.bfloat16().double(), dy.sum(0))
    bounds = (dy.abs() @ weight.abs().double(), dy.abs().T @ hidden.abs().double(), dy.abs().sum(0))
    for out, ref, bound in zip(grads, grads_ref, bounds):  # dy rounded to the bf16 tile, bf16 GEMMs
        err = (out.double() - ref).abs()
        assert (err <= 1e-6 + 2 * torch.finfo(torch.bfloat16).eps * bound).all(), f"max error {err.max():.3g}"


# ----------------------------------------------------------------------------------------------------------------
# real sizes (CUDA)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize(
    "N, H, V",
    [
        pytest.param(1000, 4096, 128256, id="N1000-H4096-V128256"),  # the anchor's H and V; N not a tile multiple
        pytest.param(777, 2048, 151936, id="N777-H2048-V151936"),  # Qwen's vocabulary; two backward chunks
    ],
)
def test_linear_logprobs_real_sizes(N, H, V):
    hidden, weight, _, labels = _problem(N, H, V, torch.bfloat16, ignored=N // 4)
    g, g_h = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    logps, lse, st, grads = _run(hidden, weight, None, labels, g, g_h, softcap=30.0)
    logps_ref, lse_ref, st_ref, grads_ref, bounds = _oracle(hidden, weight, None, labels, g, g_h, softcap=30.0)
    scored = labels != IGNORE
    # H = 4096 fp32 products per logit: the sum's rounding, a few 1e-7 of |y|, reaches 1e-5 of the log-probs
    assert_out_close(logps, logps_ref, atol=2e-5, rtol=2e-5)
    assert_out_close(lse[scored], lse_ref[scored], atol=2e-5, rtol=2e-5)
    _assert_gemm_grads_close(grads, grads_ref, bounds)


@pytest.mark.gpu
@pytest.mark.triton
def test_linear_logprobs_int64_offsets():
    """V · H > 2^31 weight elements: offsets into the weight and its gradient past row 262144 need 64 bits. The
    oracle is reference.linear_token_logps in float64 (100 MB of logits); a few labels sit past that row."""
    N, H, V = 48, 8192, 264000
    hidden, weight, _, labels = _problem(N, H, V, torch.bfloat16, ignored=8)
    labels[2:6] = torch.tensor([262144, 262999, V - 2, V - 1], device=DEVICE)
    g = torch.randn(N, device=DEVICE)
    logps, _, _, grads = _run(hidden, weight, None, labels, g)
    leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    ref_logps = reference.linear_token_logps(*leaves, labels, ignore_index=IGNORE)
    ref = (ref_logps.detach(), None, torch.autograd.grad(ref_logps, leaves, g.double()))
    assert_out_close(logps, ref[0], atol=2e-5, rtol=2e-5)
    # bf16 gradients: relative Frobenius error of each, and of the weight rows past 2^31 elements
    tail = slice(262144, None)
    pairs = [(grads[0], ref[2][0]), (grads[1], ref[2][1]), (grads[1][tail], ref[2][1][tail])]
    for name, (out, r) in zip(("hidden", "weight", "weight tail"), pairs):
        rel = ((out.double() - r).norm() / r.norm()).item()
        assert rel < 4e-3, f"grad {name}: relative error {rel:.3g}"
