"""Token → sequence sums (padded or packed rows), with LD-DPO weights: forward and backward.

Sequence s owns the tokens seq_starts[s] <= t < seq_starts[s + 1] of the flattened token axis
(padded [S, T] rows come with seq_starts = arange(S + 1) · T, packed rows with cu_seqlens); token t
is scored when labels[t] != ignore_index. With C value rows (row 0: token log-probs lp, rows 1..C-1:
token statistics):

    n[s]        = Σ_t scored_t
    plain[c, s] = Σ_t scored_t · values[c, t]
    logp[s]     = Σ_t scored_t · w_t · lp[t],   w_t = 1 if rank_t <= n[partner(s)] else α

(LD-DPO, spec §3.1) where rank_t is the 1-based rank of t among the scored tokens of its sequence
and partner(s) = s ± S/2 (chosen rows first). As rank_t <= n[s] always, rank_t <= n[partner] is the
spec's rank_t <= min(n[s], n[partner]). Without α, w_t = 1 and logp = plain[0].

Backward: grad_tokens[t] = scored_t · (grad_weighted[s] · w_t + grad_plain[s]), t in sequence s.

Sums accumulate in float64: a DPO margin is a difference of sums of thousands of nats, and fp32
accumulation over a few hundred tokens loses more than the loss can afford.

Forward reads C·4 + 8 bytes per token (8 more per partner token with LD-DPO) and writes
(C + 1)·8 + 8 bytes per sequence; backward reads 8 bytes (labels) and writes 4 bytes per token.
"""

import torch
import triton
import triton.language as tl

from dpo_kernels.ops._config import empty_f32, segments_launch_config


@triton.jit
def _count_scored(labels_ptr, start, end, ignore_index, BLOCK_T: tl.constexpr):
    # number of scored tokens in [start, end)
    count = 0
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        labels = tl.load(labels_ptr + offs, mask=offs < end, other=ignore_index)
        count += tl.sum((labels != ignore_index).to(tl.int32), 0)
    return count


@triton.jit
def _segments_fwd_kernel(
    values_ptr, labels_ptr, starts_ptr, sums_ptr, counts_ptr,  # pointers
    stride_values_row, stride_sums_row,  # strides
    S, ignore_index, ld_alpha,  # sizes and scalars
    N_STATS: tl.constexpr, BLOCK_STATS: tl.constexpr, HAS_LD: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # one program per sequence: reads its labels and values in BLOCK_T chunks (with LD-DPO, first
    # counts its partner's scored tokens); writes column s of sums and n_tokens[s]
    seq = tl.program_id(0)
    # seq_starts may be int32 (cu_seqlens): widen before forming token offsets
    start = tl.load(starts_ptr + seq).to(tl.int64)
    end = tl.load(starts_ptr + seq + 1).to(tl.int64)
    if HAS_LD:
        partner = (seq + S // 2) % S
        partner_start = tl.load(starts_ptr + partner).to(tl.int64)
        partner_end = tl.load(starts_ptr + partner + 1).to(tl.int64)
        n_partner = _count_scored(labels_ptr, partner_start, partner_end, ignore_index, BLOCK_T)
    # float64 accumulators: a sum of thousands of fp32 token log-probs keeps every bit of them
    acc_plain = tl.zeros([BLOCK_T], dtype=tl.float64)
    acc_weighted = tl.zeros([BLOCK_T], dtype=tl.float64)
    acc_stats = tl.zeros([BLOCK_STATS, BLOCK_T], dtype=tl.float64)
    stat_rows = 1 + tl.arange(0, BLOCK_STATS).to(tl.int64)
    count = 0
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        labels = tl.load(labels_ptr + offs, mask=offs < end, other=ignore_index)
        scored = labels != ignore_index
        # unscored tokens are not read: whatever their values, they never reach a sum
        lp = tl.load(values_ptr + offs, mask=scored, other=0.0).to(tl.float64)
        acc_plain += lp
        if HAS_LD:
            rank = count + tl.cumsum(scored.to(tl.int32), 0)
            acc_weighted += tl.where(rank <= n_partner, lp, ld_alpha * lp)
        if N_STATS > 0:
            ptrs = values_ptr + stat_rows[:, None] * stride_values_row + offs[None, :]
            stat_mask = (stat_rows[:, None] <= N_STATS) & scored[None, :]
            acc_stats += tl.load(ptrs, mask=stat_mask, other=0.0).to(tl.float64)
        count += tl.sum(scored.to(tl.int32), 0)
    plain = tl.sum(acc_plain, 0)
    if HAS_LD:
        tl.store(sums_ptr + seq, tl.sum(acc_weighted, 0))
    else:
        tl.store(sums_ptr + seq, plain)
    tl.store(sums_ptr + stride_sums_row + seq, plain)
    if N_STATS > 0:
        # value row c (>= 1) goes to sums row c + 1
        tl.store(
            sums_ptr + (stat_rows + 1) * stride_sums_row + seq,
            tl.sum(acc_stats, 1),
            mask=stat_rows <= N_STATS,
        )
    tl.store(counts_ptr + seq, count)


@triton.jit
def _segments_bwd_kernel(
    grad_weighted_ptr, grad_plain_ptr,  # [S] upstream gradients
    labels_ptr, starts_ptr, counts_ptr, grad_tokens_ptr,  # pointers
    S, ignore_index, ld_alpha,  # sizes and scalars
    HAS_PLAIN: tl.constexpr, HAS_LD: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # one program per sequence: spreads its two upstream gradients over its tokens in BLOCK_T
    # chunks, writing every token of [start, end) (0 where unscored)
    seq = tl.program_id(0)
    start = tl.load(starts_ptr + seq).to(tl.int64)
    end = tl.load(starts_ptr + seq + 1).to(tl.int64)
    g_shared = tl.load(grad_weighted_ptr + seq)
    g_plain = 0.0
    if HAS_PLAIN:
        g_plain = tl.load(grad_plain_ptr + seq)
    if HAS_LD:
        n_partner = tl.load(counts_ptr + (seq + S // 2) % S)
        g_tail = ld_alpha * g_shared
    count = 0
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        in_seq = offs < end
        labels = tl.load(labels_ptr + offs, mask=in_seq, other=ignore_index)
        scored = labels != ignore_index
        if HAS_LD:
            rank = count + tl.cumsum(scored.to(tl.int32), 0)
            g = tl.where(rank <= n_partner, g_shared, g_tail) + g_plain
            count += tl.sum(scored.to(tl.int32), 0)
        else:
            g = tl.zeros([BLOCK_T], dtype=tl.float32) + (g_shared + g_plain)
        tl.store(grad_tokens_ptr + offs, tl.where(scored, g, 0.0), mask=in_seq)


def _check_ld(ld_alpha, S: int) -> tuple[bool, float]:
    if ld_alpha is None:
        return False, 1.0
    if S % 2:
        raise ValueError(f"LD-DPO pairs sequence s with s + S/2: S must be even, got S = {S}")
    return True, float(ld_alpha)


def segments_fwd(
    values: torch.Tensor,
    labels: torch.Tensor,
    seq_starts: torch.Tensor,
    *,
    ignore_index: int = -100,
    ld_alpha: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token values.

    Args:
        values: fp32 [C, N] with unit stride on N (or [N], read as C = 1); row 0 holds token
            log-probs, rows 1..C-1 token statistics.
        labels: [N] integer; a token is scored when its label != ignore_index.
        seq_starts: int64 (or int32) [S+1], 0 = seq_starts[0] <= ... <= seq_starts[S] = N.
        ld_alpha: LD-DPO weight of tokens past the shared length (None: plain sums); S must then
            be even.
    Returns:
        sums float64 [C+1, S] (row 0: LD-weighted log-prob sums, the plain sums without ld_alpha;
        row 1: plain log-prob sums; row c+1: plain sums of values[c] for c >= 1) and n_tokens
        int64 [S].

    Example, padded rows [S, T]:
        ``segments_fwd(lp.reshape(1, -1), labels.reshape(-1), torch.arange(S + 1) * T)``
    """
    if values.ndim == 1:
        values = values.unsqueeze(0)
    assert values.ndim == 2 and values.stride(1) == 1, "values must be [C, N], unit stride on N"
    assert labels.shape == values.shape[1:], "labels must be [N], matching values [C, N]"
    C = values.shape[0]
    S = seq_starts.numel() - 1
    has_ld, alpha = _check_ld(ld_alpha, S)
    sums = empty_f32(C + 1, S, device=values.device, dtype=torch.float64)
    n_tokens = torch.empty(S, dtype=torch.int64, device=values.device)
    if S == 0:
        return sums, n_tokens
    BLOCK_T, num_warps = segments_launch_config(values.shape[1], S)
    n_stats = C - 1
    _segments_fwd_kernel[(S,)](
        values, labels, seq_starts, sums, n_tokens,
        values.stride(0), sums.stride(0),
        S, ignore_index, alpha,
        N_STATS=n_stats, BLOCK_STATS=triton.next_power_of_2(max(n_stats, 1)), HAS_LD=has_ld,
        BLOCK_T=BLOCK_T, num_warps=num_warps,
    )  # fmt: skip
    return sums, n_tokens


def segments_bwd(
    grad_weighted: torch.Tensor,
    grad_plain: torch.Tensor | None,
    labels: torch.Tensor,
    seq_starts: torch.Tensor,
    n_tokens: torch.Tensor,
    *,
    ignore_index: int = -100,
    ld_alpha: float | None = None,
) -> torch.Tensor:
    """Spreads per-sequence gradients to the tokens.

    Args:
        grad_weighted: fp32 [S], gradient of the LD-weighted sums (row 0 of segments_fwd's sums).
        grad_plain: fp32 [S] or None, gradient of the plain log-prob sums (row 1).
        labels, seq_starts, ignore_index, ld_alpha: as given to segments_fwd.
        n_tokens: int64 [S] from segments_fwd (read only with ld_alpha).
    Returns:
        grad_tokens fp32 [N]: scored_t · (grad_weighted[s] · w_t + grad_plain[s]), 0 where
        unscored.
    """
    S = seq_starts.numel() - 1
    has_ld, alpha = _check_ld(ld_alpha, S)
    grad_tokens = empty_f32(labels.numel(), device=labels.device)
    if S == 0 or labels.numel() == 0:
        return grad_tokens
    BLOCK_T, num_warps = segments_launch_config(labels.numel(), S)
    grad_weighted = grad_weighted.to(torch.float32).contiguous()
    has_plain = grad_plain is not None
    if has_plain:
        grad_plain = grad_plain.to(torch.float32).contiguous()
    _segments_bwd_kernel[(S,)](
        grad_weighted, grad_plain if has_plain else grad_weighted,
        labels, seq_starts, n_tokens, grad_tokens,
        S, ignore_index, alpha,
        HAS_PLAIN=has_plain, HAS_LD=has_ld, BLOCK_T=BLOCK_T, num_warps=num_warps,
    )  # fmt: skip
    return grad_tokens
