"""ops/segments.py (segments_fwd / segments_bwd) against reference.sequence_logps in float64: padded
and packed rows, LD-DPO weights, statistics sums, token counts, the backward against autograd."""

import pytest
import torch
from conftest import DEVICE, assert_grad_close, assert_out_close

from dpo_kernels import losses as L
from dpo_kernels import reference as R
from dpo_kernels.ops.dpo import dpo_fwd
from dpo_kernels.ops.segments import segments_bwd, segments_fwd

pytestmark = pytest.mark.triton

LD_ALPHAS = [
    pytest.param(None, id="plain"),
    pytest.param(0.0, id="ld0"),  # drops the longer response's tail
    pytest.param(0.5, id="ld0.5"),
    pytest.param(1.0, id="ld1"),  # same as plain
]


def make_rows(S: int, T: int, *, ignore_index: int = -100, p_empty: float = 0.2):
    """Padded rows as the collator builds them: prompt (ignored), completion (scored), right
    padding (ignored); about p_empty of the rows have no completion token. Returns fp32 token
    log-probs [S, T] (0 where unscored, as logprobs_fwd writes them), labels [S, T], 4 statistics
    rows [4, S, T] and the number of real (prompt + completion) tokens of each row."""
    prompt = torch.randint(0, min(5, T) + 1, (S,))
    completion = (torch.rand(S) * (T - prompt + 1)).long().clamp(max=T - prompt)
    completion[torch.rand(S) < p_empty] = 0
    pos = torch.arange(T)
    scored = (pos >= prompt[:, None]) & (pos < (prompt + completion)[:, None])
    labels = torch.randint(0, 100, (S, T)).masked_fill(~scored, ignore_index)
    lp = (-torch.rand(S, T) * 8).masked_fill(~scored, 0.0)
    stats = torch.randn(4, S, T)
    stats[2] = (torch.rand(S, T) < 0.5).float()  # is_top1 as 0/1
    stats = stats.masked_fill(~scored, 0.0)
    return lp, labels, stats, prompt + completion


def pack(x: torch.Tensor, row_len: torch.Tensor) -> torch.Tensor:
    """[..., S, T] padded → [..., N] packed (each row's first row_len tokens)."""
    return torch.cat([x[..., s, : row_len[s]] for s in range(row_len.numel())], dim=-1)


def cu_seqlens(row_len: torch.Tensor, dtype=torch.int64) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), row_len.cumsum(0)]).to(dtype)


def run_fwd(lp, labels, stats, seq_starts, ld_alpha, ignore_index=-100):
    """segments_fwd on flattened tokens; stats=None → C = 1."""
    values = lp.reshape(1, -1)
    if stats is not None:
        values = torch.cat([values, stats.reshape(4, -1)])
    return segments_fwd(
        values.contiguous().to(DEVICE),
        labels.reshape(-1).to(DEVICE),
        seq_starts.to(DEVICE),
        ignore_index=ignore_index,
        ld_alpha=ld_alpha,
    )


def check_fwd(sums, n_tokens, ref: R.SequenceLogps, with_stats: bool):
    assert torch.equal(n_tokens.cpu(), ref.n_tokens)
    assert_out_close(sums[0].cpu(), ref.logps)
    assert_out_close(sums[1].cpu(), ref.raw_logps)
    if with_stats:
        assert sums.shape[0] == 6
        for c, field in enumerate(ref.stats[:4]):
            assert_out_close(sums[2 + c].cpu(), field)
    else:
        assert sums.shape[0] == 2


@pytest.mark.parametrize("with_stats", [False, True], ids=["C1", "C5"])
@pytest.mark.parametrize("ld_alpha", LD_ALPHAS)
def test_segments_fwd_padded(ld_alpha, with_stats):
    S, T = 10, 37
    lp, labels, stats, _ = make_rows(S, T)
    starts = torch.arange(S + 1) * T
    sums, n_tokens = run_fwd(lp, labels, stats if with_stats else None, starts, ld_alpha)
    ref = R.sequence_logps(
        lp.double(),
        labels,
        ld_alpha=ld_alpha,
        token_stats=R.TokenStats(*stats.double()) if with_stats else None,
    )
    check_fwd(sums, n_tokens, ref, with_stats)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["cu32", "cu64"])
@pytest.mark.parametrize("ld_alpha", LD_ALPHAS)
def test_segments_fwd_packed(ld_alpha, cu_dtype):
    S, T = 12, 29
    lp, labels, stats, row_len = make_rows(S, T)
    row_len[3] = 0  # a sequence without any token
    cu = cu_seqlens(row_len, cu_dtype)
    lp, labels, stats = pack(lp, row_len), pack(labels, row_len), pack(stats, row_len)
    sums, n_tokens = run_fwd(lp, labels, stats, cu, ld_alpha)
    ref = R.sequence_logps(
        lp.double(),
        labels,
        ld_alpha=ld_alpha,
        cu_seqlens=cu,
        token_stats=R.TokenStats(*stats.double()),
    )
    check_fwd(sums, n_tokens, ref, True)


@pytest.mark.parametrize("ld_alpha", LD_ALPHAS)
def test_segments_padded_vs_packed(ld_alpha):
    # the same pairs, padded or packed: the same sums, counts, and DPO loss and gradients downstream
    S, T = 8, 41
    lp, labels, stats, row_len = make_rows(S, T)
    padded = run_fwd(lp, labels, stats, torch.arange(S + 1) * T, ld_alpha)
    packed = run_fwd(
        pack(lp, row_len),
        pack(labels, row_len),
        pack(stats, row_len),
        cu_seqlens(row_len),
        ld_alpha,
    )
    assert torch.equal(padded[1], packed[1])
    assert_out_close(packed[0], padded[0])
    B = S // 2
    config = L.loss_config(["sigmoid_norm", "sft"], [1.0, 0.3])
    outs = []
    for sums, n_tokens in (padded, packed):
        ref = torch.full((B,), -50.0, device=DEVICE)
        outs.append(
            dpo_fwd(
                sums[0, :B],
                sums[0, B:],
                ref,
                ref,
                config=config,
                chosen_lengths=n_tokens[:B],
                rejected_lengths=n_tokens[B:],
                sft_sum=sums[1, :B],
                sft_count=n_tokens[:B],
            )
        )
    assert_out_close(outs[1].loss, outs[0].loss)
    assert_out_close(outs[1].grads, outs[0].grads, atol=1e-6)


def reference_token_grads(lp, labels, grad_weighted, grad_plain, ld_alpha, cu=None):
    """autograd of Σ_s grad_weighted[s]·logps[s] + grad_plain[s]·raw_logps[s], reference path."""
    leaf = lp.double().requires_grad_()
    seq = R.sequence_logps(leaf, labels, ld_alpha=ld_alpha, cu_seqlens=cu)
    total = (seq.logps * grad_weighted.double()).sum()
    if grad_plain is not None:
        total = total + (seq.raw_logps * grad_plain.double()).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    return grad.reshape(-1)


@pytest.mark.parametrize("with_plain", [False, True], ids=["weighted", "weighted+plain"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("ld_alpha", LD_ALPHAS)
def test_segments_bwd(ld_alpha, layout, with_plain):
    S, T = 10, 23
    lp, labels, _, row_len = make_rows(S, T)
    cu = None
    starts = torch.arange(S + 1) * T
    if layout == "packed":
        lp, labels = pack(lp, row_len), pack(labels, row_len)
        cu = starts = cu_seqlens(row_len)
    _, n_tokens = run_fwd(lp, labels, None, starts, ld_alpha)
    grad_weighted = torch.randn(S)
    grad_plain = torch.randn(S) if with_plain else None
    out = segments_bwd(
        grad_weighted.to(DEVICE),
        None if grad_plain is None else grad_plain.to(DEVICE),
        labels.reshape(-1).to(DEVICE),
        starts.to(DEVICE),
        n_tokens,
        ld_alpha=ld_alpha,
    )
    ref = reference_token_grads(lp, labels, grad_weighted, grad_plain, ld_alpha, cu)
    assert_grad_close(out.cpu(), ref)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
def test_segments_empty_sequences(ld_alpha):
    # a pair whose rejected row has no scored token: its chosen row's tokens are all tail (weight
    # α); a pair with both rows empty; a packed sequence of zero length
    S, T = 6, 19
    lp, labels, stats, row_len = make_rows(S, T, p_empty=0.0)
    labels[3 + 0] = -100  # rejected row of pair 0
    labels[1] = -100  # pair 1: both rows
    labels[3 + 1] = -100
    lp = lp.masked_fill(labels == -100, 0.0)
    row_len[4] = 0
    cu = cu_seqlens(row_len)
    lp, labels, stats = pack(lp, row_len), pack(labels, row_len), pack(stats, row_len)
    sums, n_tokens = run_fwd(lp, labels, stats, cu, ld_alpha)
    token_stats = R.TokenStats(*stats.double())
    options = {"ld_alpha": ld_alpha, "cu_seqlens": cu, "token_stats": token_stats}
    ref = R.sequence_logps(lp.double(), labels, **options)
    check_fwd(sums, n_tokens, ref, True)
    assert n_tokens[3].item() == n_tokens[1].item() == n_tokens[4].item() == 0
    assert_out_close(sums[0, 0].cpu(), ld_alpha * ref.raw_logps[0])
    grad_weighted = torch.randn(S)
    out = segments_bwd(
        grad_weighted.to(DEVICE),
        None,
        labels.to(DEVICE),
        cu.to(DEVICE),
        n_tokens,
        ld_alpha=ld_alpha,
    )
    ref_grad = reference_token_grads(lp, labels, grad_weighted, None, ld_alpha, cu)
    assert_grad_close(out.cpu(), ref_grad)


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_segments_long_rows(ld_alpha):
    # rows of several BLOCK_T chunks (1024 at most): sums and LD ranks carried across chunks
    S, T = 4, 2500
    lp, labels, _, _ = make_rows(S, T, p_empty=0.0)
    labels[0, 1500:] = -100  # pair 0: chosen shorter than its rejected row, by more than one chunk
    lp = lp.masked_fill(labels == -100, 0.0)
    starts = torch.arange(S + 1) * T
    sums, n_tokens = run_fwd(lp, labels, None, starts, ld_alpha)
    check_fwd(sums, n_tokens, R.sequence_logps(lp.double(), labels, ld_alpha=ld_alpha), False)
    grad_weighted = torch.randn(S)
    out = segments_bwd(
        grad_weighted.to(DEVICE),
        None,
        labels.reshape(-1).to(DEVICE),
        starts.to(DEVICE),
        n_tokens,
        ld_alpha=ld_alpha,
    )
    assert_grad_close(out.cpu(), reference_token_grads(lp, labels, grad_weighted, None, ld_alpha))


def test_segments_unscored_values_not_read():
    # NaN at unscored positions (stale memory, an unwritten buffer) never reaches a sum
    S, T = 6, 17
    lp, labels, stats, _ = make_rows(S, T)
    token_stats = R.TokenStats(*stats.double())
    ref = R.sequence_logps(lp.double(), labels, ld_alpha=0.5, token_stats=token_stats)
    unscored = labels == -100
    sums, n_tokens = run_fwd(
        lp.masked_fill(unscored, float("nan")), labels, stats.masked_fill(unscored, float("nan")),
        torch.arange(S + 1) * T, 0.5,
    )  # fmt: skip
    check_fwd(sums, n_tokens, ref, True)


def test_segments_custom_ignore_index():
    S, T = 4, 13
    lp, labels, _, _ = make_rows(S, T, ignore_index=-1)
    sums, n_tokens = run_fwd(lp, labels, None, torch.arange(S + 1) * T, 0.5, ignore_index=-1)
    ref = R.sequence_logps(lp.double(), labels, ld_alpha=0.5, ignore_index=-1)
    check_fwd(sums, n_tokens, ref, False)


def test_segments_no_tokens():
    # N = 0: every sequence is empty; S = 0: nothing to do
    starts = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    labels = torch.empty(0, dtype=torch.int64, device=DEVICE)
    sums, n_tokens = segments_fwd(torch.empty(3, 0, device=DEVICE), labels, starts, ld_alpha=0.5)
    assert sums.shape == (4, 4) and (sums == 0).all() and (n_tokens == 0).all()
    grad = segments_bwd(torch.ones(4, device=DEVICE), None, labels, starts, n_tokens, ld_alpha=0.5)
    assert grad.shape == (0,)
    sums, n_tokens = segments_fwd(torch.empty(1, 0, device=DEVICE), labels, starts[:1])
    assert sums.shape == (2, 0) and n_tokens.shape == (0,)


def test_segments_values_1d():
    S, T = 4, 9
    lp, labels, _, _ = make_rows(S, T)
    starts = torch.arange(S + 1) * T
    lp_1d, labels_1d = lp.reshape(-1).to(DEVICE), labels.reshape(-1).to(DEVICE)
    sums, _ = segments_fwd(lp_1d, labels_1d, starts.to(DEVICE))
    assert_out_close(sums[1].cpu(), R.sequence_logps(lp.double(), labels).raw_logps)


def test_segments_ld_needs_even_rows():
    labels = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    starts = torch.tensor([0, 2, 4, 6], device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        segments_fwd(torch.zeros(1, 6, device=DEVICE), labels, starts, ld_alpha=0.5)
    with pytest.raises(ValueError, match="even"):
        segments_bwd(
            torch.zeros(3, device=DEVICE),
            None,
            labels,
            starts,
            torch.zeros(3, dtype=torch.int64),
            ld_alpha=0.5,
        )
