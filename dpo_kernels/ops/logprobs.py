"""Per-token log-probabilities from logits, with optional softmax statistics: forward and backward.

Row i has logits z = logits[i] / T over V columns and a label y. With lse = logsumexp_v z_v and
p_v = exp(z_v - lse):

    logp     = z_y - lse
    entropy  = -sum_v p_v log p_v = lse - sum_v p_v z_v
    mean     = (1/V) sum_v z_v
    is_top1  = 1 if y is the first argmax of z (z_y >= max and > every earlier z, TRL), else 0
    log_sum_sq_probs = log sum_v p_v^2

Layout: the logits are [R, T, V] with any batch and row strides (unit vocab stride), or [N, V] (R = N, T = 1);
row n = (n // T, n % T) is read where it is (int64 offsets), so logits[:, :-1] costs no copy. Labels and every
[N] output are flat over the N = R·T rows; the gradient has the logits' shape.

Forward: one program per row, one pass in BLOCK_V chunks. Every 16-byte piece of a chunk (VEC
columns) belongs to one thread, which keeps a running max m of the logits x and sums of 2^t over the
columns of its pieces, t = (x/2 - m/2) * 2 log2(e) / T <= 0 (one FMA and one multiply per logit; the
halves never overflow, at any pair of finite logits; when m grows the sums are rescaled by
2^((m_old - m_new) log2(e) / T)); the pieces are merged after the loop. With l = sum 2^t,
S1 = sum 2^t t and S2 = sum 2^(2t) relative to the row's max:

    logp    = (x_y - m) / T - ln2 log2 l    entropy          = ln2 (log2 l - S1 / l)
    lse     = m / T + ln2 log2 l            log_sum_sq_probs = ln2 (log2 S2 - 2 log2 l)
    mean    = (sum_v x_v 2^-k) (2^k / V) / T,   2^k >= V (no overflow of the sum at any finite x)

No output is a difference of two numbers of the logits' size and no exponent is above 0, so every
finite z = x / T works, up to |z| = fp32's largest (the row maximum is -inf, not a finite sentinel,
until a finite logit comes). Bytes: reads the logits once (N·V·itemsize), writes 8·N (+16·N with the
stats); ignored rows are not read. One subtract, one multiply and one exp2 per logit (+1/VEC for the
rescaling; +1 multiply with the stats), about 8.5 instructions per bf16 logit on sm_90. 2 / T must be
finite in fp32 (T > 5.9e-39).

Backward: one program per (row, BLOCK_V block); recomputes p from the saved lse and writes, in the
logits' dtype,

    dlogits_v = [g_y (1[v = y] - p_v) - g_H p_v (z_v - (lse - entropy))] / T

with the target entry formed in fp32 before its one rounding. Bytes: reads the logits and writes the
gradient (2·N·V·itemsize); ignored rows write zeros without reading. With inplace=True the gradient
overwrites the logits (each program reads its block before writing it). p carries the rounding
error of the fp32 lse as a relative error: half an ulp of lse, 4e-6 at |lse| = 100, 5e-4 at 1e4;
z - lse is clamped at 0 (one min per logit), so p <= 1 and the gradient stays finite at any size.

Partial mode (PARTIAL / SHARDED, constexpr: the finalized path is compiled without it), for logits sharded
over the vocabulary (`dpo_kernels.parallel`): the forward writes a shard's per-row partials instead of finalized
outputs (its max, sums relative to it, the label's logit where the shard holds it, the max before the label's
column for is_top1's first-argmax rule), which parallel.py combines across shards with two all-reduces; the
backward takes the combined lse and entropy and a global label, and writes the shard's part of the gradient.

NaN policy (every backend, README "Numerics"): an ignored row (label == ignore_index) gives 0 in
every output and a zero gradient row, and is not read. A row with a NaN or +inf logit, a row of
-inf only, or a label outside [0, V) gives NaN log-prob, lse, entropy, mean logit and log Σ p²,
is_top1 0, and a NaN gradient row. -inf logits elsewhere are fine: p = 0 and a zero gradient
there (the entropy term included), a mean logit of -inf, and at the label a log-prob of -inf with
a finite gradient.
"""

import math
import os

import torch
import triton
import triton.language as tl

from dpo_kernels.ops._config import empty_f32, logprobs_launch_config, scalar_load_config

LOG2E = math.log2(math.e)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logps_ptr, lse_ptr, stats_ptr,  # pointers; stats [4, N]
    stride_logits_b, stride_logits_t,  # strides
    N, T, V, ignore_index, inv_temperature, two_log2e_over_t, mean_scale, mean_unscale,  # sizes and scalars
    vocab_start,  # PARTIAL: the global column of this shard's column 0
    RETURN_STATS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):  # fmt: skip
    # One program per row: reads the row once (not at all if ignored), writes logp, lse (+ 4 stats), or with
    # PARTIAL the row's partials over this vocabulary shard ([3 or 7, N] at stats_ptr, `logprobs_partial_fwd`).
    # A block is a [BLOCK_V // VEC, VEC] tile of 16-byte pieces dealt round-robin to the threads; a
    # piece's running max and sums stay in its thread: the loop never communicates between threads.
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at 16384 x 128256
    label = tl.load(labels_ptr + row)
    r = row // T  # row = (r, t) of the [R, T, V] logits, read where they are (T = 1 for [N, V] logits)
    if label == ignore_index:
        if PARTIAL:
            for k in tl.static_range(7 if RETURN_STATS else 3):
                tl.store(stats_ptr + k * N + row, 0.0)
        else:
            tl.store(logps_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if RETURN_STATS:
                for k in tl.static_range(4):
                    tl.store(stats_ptr + k * N + row, 0.0)
    else:
        row_ptr = logits_ptr + r * stride_logits_b + (row - r * T) * stride_logits_t
        if PARTIAL:
            label = label - vocab_start  # the shard's column of the label: outside [0, V) when another rank owns it
        in_range = (label >= 0) & (label < V)
        x_label = tl.load(row_ptr + tl.where(in_range, label, 0)).to(tl.float32)
        offs = tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        # Per piece: max m of x and sum of 2^t, t = (x/2 - m/2) 2 log2(e) / T. m starts at -inf (no
        # finite sentinel: every finite logit counts); -inf - -inf never happens (half_m, d below).
        m_p = tl.full([BLOCK_V // VEC], -float("inf"), tl.float32)
        l_p = tl.zeros([BLOCK_V // VEC], tl.float32)
        if RETURN_STATS:
            s1_p = tl.zeros([BLOCK_V // VEC], tl.float32)  # sum 2^t t
            s2_p = tl.zeros([BLOCK_V // VEC], tl.float32)  # sum 2^(2t)
            sx_p = tl.zeros([BLOCK_V // VEC], tl.float32)  # sum x 2^-k
            before_p = tl.full([BLOCK_V // VEC], -float("inf"), tl.float32)  # max of x[:label]
        # -inf padding: exp2 of it is 0 and it never wins a max
        x_next = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf"))
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            # Issue the next block's load before reducing this one: two blocks in flight.
            x = x_next.to(tl.float32)
            x_next = tl.load(row_ptr + BLOCK_V + cols, mask=cols + BLOCK_V < V, other=-float("inf"))
            block_max = tl.max(x, 1)
            m_new = tl.maximum(m_p, block_max)
            # Per piece, not per logit: a piece that has seen only -inf measures from 0 (t = -inf, 2^t = 0);
            # the rescaling exponent d is 0 while the piece is empty and >= -256 (2^d = 0 already), so
            # that l_p * d is never 0 * -inf, also when (m_p - m_new) / T overflows.
            half_m = tl.where(m_new == -float("inf"), 0.0, m_new * 0.5)
            d = tl.fma(m_p, 0.5, -half_m) * two_log2e_over_t
            d = tl.where(m_p == -float("inf"), 0.0, tl.maximum(d, -256.0))
            alpha = tl.exp2(d)
            t = tl.fma(x, 0.5, -half_m[:, None]) * two_log2e_over_t  # <= 0, -inf only where 2^t is 0
            e = tl.exp2(t)
            if RETURN_STATS:
                # Old terms of sum 2^t t move by d. At -inf columns e * t must be 0, not 0 * -inf: t is
                # clamped at -256, where 2^t is 0 already.
                s1_p = alpha * (s1_p + l_p * d) + tl.sum(e * tl.maximum(t, -256.0), 1)
                s2_p = s2_p * (alpha * alpha) + tl.sum(e * e, 1)
                sx_p += tl.sum(tl.where(cols < V, x * mean_scale, 0.0), 1)
                if start + BLOCK_V <= label:
                    before_p = tl.maximum(before_p, block_max)
                elif start <= label:  # the block that holds the label
                    x_before = tl.where(cols < label, x, -float("inf"))
                    before_p = tl.maximum(before_p, tl.max(x_before, 1))
            l_p = l_p * alpha + tl.sum(e, 1)
            m_p = m_new
        # Merge the pieces: the row's max m, sums relative to it.
        m = tl.max(m_p, 0)
        half_m = tl.where(m == -float("inf"), 0.0, m * 0.5)
        d = tl.maximum(tl.fma(m_p, 0.5, -half_m) * two_log2e_over_t, -256.0)
        d = tl.where(m_p == -float("inf"), 0.0, d)
        alpha = tl.exp2(d)
        sum_exp = tl.sum(l_p * alpha, 0)
        if PARTIAL:
            # The shard's partials in z = x / T (natural units): max, sum of e = exp(z - max), the label's z if owned
            # (else 0); with stats sum e (z - max), sum e^2, the shard's part of the mean (sum z / V_total) and the max
            # of z before the label's column (-inf if none). NaN rows carry NaN in l; the combine applies the policy.
            tl.store(stats_ptr + row, m * inv_temperature)
            tl.store(stats_ptr + N + row, sum_exp)
            tl.store(stats_ptr + 2 * N + row, tl.where(in_range, x_label * inv_temperature, 0.0))
            if RETURN_STATS:
                s1 = tl.sum((s1_p + l_p * d) * alpha, 0) * 0.6931471805599453
                tl.store(stats_ptr + 3 * N + row, s1)
                tl.store(stats_ptr + 4 * N + row, tl.sum(s2_p * (alpha * alpha), 0))
                tl.store(stats_ptr + 5 * N + row, tl.sum(sx_p, 0) * mean_unscale * inv_temperature)
                tl.store(stats_ptr + 6 * N + row, tl.max(before_p, 0) * inv_temperature)
        else:
            # The NaN policy: a NaN or +inf logit makes sum_exp NaN, a row of -inf only makes it 0.
            ok = (sum_exp > 0.0) & in_range
            log2_sum = tl.log2(sum_exp)
            # z_y - max z in natural units: -inf only where it is below fp32's range
            logp = tl.fma(x_label, 0.5, -half_m) * (2.0 * inv_temperature) - log2_sum * 0.6931471805599453
            lse = m * inv_temperature + log2_sum * 0.6931471805599453
            # NaN lse too: the backward then writes a NaN row (p = NaN) with or without grad_logps.
            tl.store(logps_ptr + row, tl.where(ok, logp, float("nan")))
            tl.store(lse_ptr + row, tl.where(ok, lse, float("nan")))
            if RETURN_STATS:
                s1 = tl.sum((s1_p + l_p * d) * alpha, 0)
                s2 = tl.sum(s2_p * (alpha * alpha), 0)
                entropy = (log2_sum - s1 / sum_exp) * 0.6931471805599453
                mean_logit = tl.sum(sx_p, 0) * mean_unscale * inv_temperature
                is_top1 = (x_label >= m) & (x_label > tl.max(before_p, 0)) & ok
                log_sum_sq = (tl.log2(s2) - 2.0 * log2_sum) * 0.6931471805599453
                tl.store(stats_ptr + row, tl.where(ok, entropy, float("nan")))
                tl.store(stats_ptr + N + row, tl.where(ok, mean_logit, float("nan")))
                tl.store(stats_ptr + 2 * N + row, tl.where(is_top1, 1.0, 0.0))
                tl.store(stats_ptr + 3 * N + row, tl.where(ok, log_sum_sq, float("nan")))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_logps_ptr, grad_entropy_ptr, entropy_ptr,  # pointers
    dlogits_ptr,
    stride_logits_b, stride_logits_t, stride_dlogits_b, stride_dlogits_t,  # strides
    T, V, NUM_BLOCKS, ignore_index, inv_temperature,  # sizes and scalars
    vocab_start,  # SHARDED: the global column of this shard's column 0
    HAS_GRAD_LOGPS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SHARDED: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    # One program per (row, block of BLOCK_V columns), row-major so that consecutive programs touch
    # consecutive memory: reads the block of logits (not for an ignored row), writes its gradient.
    # SHARDED: the logits are one vocabulary shard, lse and entropy the whole row's (combined); the label is
    # global (its one-hot only where this shard holds it), and a bad label's NaN row is already in lse.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NUM_BLOCKS
    cols = (pid - row * NUM_BLOCKS).to(tl.int32) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    r = row // T  # row = (r, pos) of the [R, T, V] logits and gradient (T = 1 for [N, V])
    pos = row - r * T
    dx_ptrs = dlogits_ptr + r * stride_dlogits_b + pos * stride_dlogits_t + cols
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(dx_ptrs, tl.zeros([BLOCK_V], dtype=dlogits_ptr.dtype.element_ty), mask=mask)
    else:
        x_ptrs = logits_ptr + r * stride_logits_b + pos * stride_logits_t + cols
        x = tl.load(x_ptrs, mask=mask, other=-float("inf")).to(tl.float32)
        if SHARDED:
            label = label - vocab_start
            lse = tl.load(lse_ptr + row)
        else:
            # A bad label is a NaN row (the forward's lse is NaN there too, as for the rows of NaN or +inf)
            lse = tl.where((label >= 0) & (label < V), tl.load(lse_ptr + row), float("nan"))
        # z - lse in one rounding (FMA): p carries only the error of lse's own fp32 rounding. z - lse is
        # <= 0 but for that rounding: clamped at 0 (NaN kept), p <= 1 at any magnitude.
        t = tl.fma(x, inv_temperature, -lse)
        p = tl.exp2(tl.where(t > 0.0, 0.0, t) * 1.4426950408889634)
        dx = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_GRAD_LOGPS:
            g = tl.load(grad_logps_ptr + row) * inv_temperature
            dx = tl.where(cols == label, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + row) * inv_temperature
            mean_z = lse - tl.load(entropy_ptr + row)  # E_p[z]
            # p (z - E z) is 0 where p is 0, also at -inf logits (not 0 * -inf).
            dx -= g_h * p * tl.where(p > 0.0, x * inv_temperature - mean_z, 0.0)
        tl.store(dx_ptrs, dx.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _layout(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, tuple[int, int]]:
    """(N, T, V, (stride_b, stride_t)) of [R, T, V] or [N, V] logits: row n = (n // T, n % T) starts at
    (n // T) stride_b + (n % T) stride_t. [N, V] is R = N, T = 1 (the JIT specialises T = 1 away). A stride of a
    size-1 dimension is never used: passed as 0, so it cannot cost the 16-divisibility of the addresses."""
    assert logits.ndim in (2, 3) and logits.stride(-1) == 1, "ops expect [R, T, V] or [N, V] logits, unit vocab stride"
    R, T, V = logits.shape if logits.ndim == 3 else (logits.shape[0], 1, logits.shape[1])
    stride_b = logits.stride(0) if R > 1 else 0
    stride_t = logits.stride(1) if logits.ndim == 3 and T > 1 else 0
    assert labels.numel() == R * T and labels.shape in ((R * T,), logits.shape[:-1]), "ops expect labels [N] or [R, T]"
    return R * T, T, V, (stride_b, stride_t)


def _int64(labels: torch.Tensor) -> torch.Tensor:
    """Labels of any integer dtype as contiguous int64 (a copy of N values unless they already are), so that
    the kernels compare them with ignore_index and V in one integer type."""
    return labels.to(torch.int64).reshape(-1).contiguous()


def _launch_fwd(logits, labels, logps, lse, out, *, ignore_index, temperature, return_stats, vocab_start, V_total):
    """One launch of the forward kernel: finalized outputs (vocab_start None) or a shard's partials into `out`."""
    N, T, V, strides = _layout(logits, labels)
    if N == 0:
        return
    BLOCK_V, num_warps = logprobs_launch_config(V, logits.dtype, stats=return_stats)
    if any(s % 16 for s in strides):  # not specialised as 16-divisible: scalar loads
        BLOCK_V, num_warps = scalar_load_config(BLOCK_V, num_warps, logits.dtype)
    VEC = min(BLOCK_V, 16 // logits.element_size())  # columns in 16 bytes
    k = max(V_total - 1, 1).bit_length()  # 2^k >= V: the mean's sum of x 2^-k never overflows
    _logprobs_fwd_kernel[(N,)](
        logits, _int64(labels), logps, lse, out,
        *strides,
        N, T, V, ignore_index, 1.0 / temperature, 2.0 * LOG2E / temperature, 2.0**-k, 2.0**k / V_total,
        vocab_start or 0,
        RETURN_STATS=return_stats, PARTIAL=vocab_start is not None, BLOCK_V=BLOCK_V, VEC=VEC, num_warps=num_warps,
    )  # fmt: skip


def logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits [R, T, V] or [N, V] (unit vocab stride, any other strides: logits[:, :-1] is read in place), labels
    [N] (N = R·T, row-major) or [R, T] of any integer dtype → (logps, lse, stats), all over the N rows.

    All fp32. logps [N], lse [N]; stats [4, N] (None unless return_stats): entropy, mean logit,
    is_top1 (1.0 / 0.0), log sum_v p_v^2. All on logits / temperature. 0 everywhere at ignored rows;
    NaN (is_top1 0) at NaN rows and labels outside [0, V) (the module docstring's policy).
    """
    N, _, V, _ = _layout(logits, labels)
    logps = empty_f32(N, device=logits.device)
    lse = empty_f32(N, device=logits.device)
    stats = empty_f32(4, N, device=logits.device) if return_stats else None
    options = dict(ignore_index=ignore_index, temperature=temperature, return_stats=return_stats)
    _launch_fwd(logits, labels, logps, lse, stats if return_stats else logps, **options, vocab_start=None, V_total=V)
    return logps, lse, stats


def logprobs_partial_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
) -> torch.Tensor:
    """The per-row partials of one vocabulary shard, for a combine across shards (`dpo_kernels.parallel`).

    logits [R, T, V_shard] or [N, V_shard] hold the global columns [vocab_start, vocab_start + V_shard) of a
    vocabulary of `vocab_size`; labels are global ([N] or [R, T], any integer dtype). Returns fp32 [3, N], or
    [7, N] with return_stats (`parallel.PARTIALS` names the rows), on z = logits / temperature: the shard's max m,
    Σ e with e = exp(z − m), the label's z where this shard holds the label (else 0); with stats Σ e·(z − m), Σ e², the
    shard's part of the mean logit (Σ z / vocab_size) and the max of z over the shard's columns before the label
    (−inf where there are none; is_top1's first-argmax rule). Ignored rows: 0 everywhere, not read. A NaN or +inf
    logit makes Σ e NaN; a shard of −inf only gives m = −inf, Σ e = 0.
    """
    N, _, V, _ = _layout(logits, labels)
    out = empty_f32(7 if return_stats else 3, N, device=logits.device)
    options = dict(ignore_index=ignore_index, temperature=temperature, return_stats=return_stats)
    _launch_fwd(logits, labels, out, out, out, **options, vocab_start=int(vocab_start), V_total=int(vocab_size))
    return out


def logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    inplace: bool = False,
    out: torch.Tensor | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """d(sum_i grad_logps[i] logp[i] + grad_entropy[i] entropy[i]) / d logits, in the logits' dtype.

    logits and labels as in `logprobs_fwd` ([R, T, V] with any batch and row strides, or [N, V]); lse (and
    entropy, with grad_entropy) are the forward's fp32 [N] outputs. Returns dlogits shaped like the logits
    (a new contiguous tensor) with zero rows at ignored labels; with inplace=True it is written into the
    logits' own storage (same strides, nothing outside the view touched) and the logits are returned; with
    `out` (the logits' shape and dtype, unit vocab stride, e.g. a window of a larger gradient) it is written there.
    With `vocab_start` the logits are the vocabulary shard that starts at that global column, the labels global,
    and lse / entropy the whole rows' (combined from `logprobs_partial_fwd`'s partials): the shard's part of the
    gradient, with no communication.
    """
    N, T, V, strides = _layout(logits, labels)
    labels = _int64(labels)
    assert grad_entropy is None or entropy is not None, "grad_entropy needs the forward's entropy"
    assert out is None or (out.shape == logits.shape and out.dtype == logits.dtype), "out must match the logits"
    if inplace or out is not None:
        dlogits = logits if inplace else out
    elif os.environ.get("DPO_KERNELS_POISON") == "1":  # as empty_f32: unwritten entries show
        dlogits = torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    else:
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N == 0:
        return dlogits
    BLOCK_V, num_warps = logprobs_launch_config(V, logits.dtype, backward=True)
    num_blocks = triton.cdiv(V, BLOCK_V)
    d_strides = _layout(dlogits, labels)[3]
    # Absent inputs pass lse as a placeholder pointer: the kernel never reads it (HAS_* False).
    _logprobs_bwd_kernel[(N * num_blocks,)](
        logits, labels, lse,
        lse if grad_logps is None else grad_logps.contiguous(),
        lse if grad_entropy is None else grad_entropy.contiguous(),
        lse if entropy is None else entropy.contiguous(),
        dlogits,
        *strides, *d_strides,
        T, V, num_blocks, ignore_index, 1.0 / temperature, vocab_start or 0,
        HAS_GRAD_LOGPS=grad_logps is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        SHARDED=vocab_start is not None, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )  # fmt: skip
    return dlogits
