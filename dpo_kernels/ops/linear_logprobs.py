"""Per-token log-probabilities straight from hidden states (fused lm_head): forward and backward.

Token i has hidden state h_i [H] and label y_i; the output layer has weight W [V, H] and optional bias b [V]:

    y_iv = h_i · W_v + b_v                                  (fp32 accumulation, never written to memory)
    z_iv = transform(y_iv) = y_iv · scale / T               or, with a softcap c, (c / T) · tanh(y_iv · scale / c)
    logp_i = z_iy - lse_i,  lse_i = logsumexp_v z_iv,  p_iv = exp(z_iv - lse_i)

and the stats of ops/logprobs.py (entropy, mean of z, is_top1 with the first-argmax rule, log Σ p²) on z.
Ignored tokens (label = ignore_index) are compacted away on the device: `order` lists the scored rows first (in
their original order), `count` holds their number, and every kernel reads hidden rows through `order`, so no
GEMM touches an ignored row and no host synchronisation is needed. Grids cover all N positions; programs past
`count` do nothing.

Forward (`_linear_logprobs_fwd_kernel`): the grid is (token block, vocabulary split). A program computes the
[BLOCK_N, BLOCK_V] tiles of y for its split with tl.dot over H, and folds each tile into per-row running sums in
the epilogue, with exponents in base 2 relative to the running maximum m: t = (z - m) · log2 e,

    l = Σ 2^t,   s1 = Σ 2^t · t,   s2 = Σ 2^(2t),   sx = Σ z,   z_y,   first argmax,

rescaled when m grows (as in ops/logprobs.py). Each split writes its partial sums (24 or 28 bytes per token);
`_linear_logprobs_combine_kernel` merges the splits and scatters logp, lse (and stats) to the original rows,
zeros at ignored rows. Cost: one GEMM, 2·N_s·H·V FLOPs (N_s scored tokens); bytes: W once per group of token
blocks sharing it in L2, hidden once per split.

Backward, in vocabulary chunks of VC columns (VC sized so the chunk buffer stays ≈ 128 MiB):

    dz_iv = g_i · (1[v = y_i] - p_iv) - gH_i · p_iv · (z_iv - (lse_i - entropy_i)),    dy_iv = dz_iv · dz/dy

with dz/dy = scale / T, or (scale / T) · (1 - tanh²) under the softcap. For each chunk:
  1. `_linear_logprobs_bwd_dy_kernel` recomputes the tiles of y (a GEMM over H) and writes dy in the input
     dtype into the [N, VC] chunk buffer (the target entry formed in fp32 before the one rounding);
  2. `_linear_logprobs_bwd_dh_kernel`: dH[positions] += dy_chunk · W_chunk, fp32 accumulator kept in an [N, H]
     fp32 buffer between chunks; the last chunk writes grad_hidden in the input dtype at the original rows;
  3. `_linear_logprobs_bwd_dw_kernel`: dW_chunk = dy_chunkᵀ · hidden[order] (the reduction over all scored tokens
     inside one program, in fp32; one rounding on the store), and db_chunk = Σ_i dy_chunk.
Cost: three GEMMs of 2·N_s·H·V FLOPs (recompute, dH, dW), no skipped blocks; extra memory: the chunk buffer,
the fp32 dH buffer (when V spans more than one chunk) and the outputs. Why this shape and not two GEMM-shaped
kernels that each recompute y: a dH program owns [BLOCK_N, BLOCK_H] of the output but needs dy over the full
H-long reduction of y, so it would recompute y H / BLOCK_H times; a chunk of dy in memory is recomputed once.

NaN policy, that of ops/logprobs.py on the logits z: ignored tokens give 0 everywhere and no gradient, and their
hidden rows are never read. A token whose logits hold a NaN or +inf, or are all -inf (a NaN or inf in its hidden
row, or in the weight: then every token), or whose label is outside [0, V), gives NaN logp, lse, entropy, mean z
and log Σ p², is_top1 0, and a NaN dz row (so a NaN grad_hidden row, and NaN grad_weight and grad_bias, which sum
over the tokens). Exponents are relative to the running max and clamped (no 0 · -inf), and the mean sums z 2^-k
(2^k >= V), so any finite z works; the backward clamps z - lse at 0 as ops/logprobs.py does.
"""

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dpo_kernels.ops._config import empty_f32

# constexpr globals: the kernels read them as compile-time constants (plain globals are refused from Triton 3.3)
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


# ----------------------------------------------------------------------------------------------------------------
# helpers inlined into the kernels


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    # Tile (row, col) of program `pid`, rows fastest within groups of GROUP rows: the programs running at the same
    # time share a few column tiles (weight tiles) and GROUP row tiles, so both stay in L2.
    programs_per_group = GROUP * num_cols
    first_row = (pid // programs_per_group) * GROUP
    rows_in_group = tl.minimum(num_rows - first_row, GROUP)
    local = pid % programs_per_group
    return first_row + local % rows_in_group, local // rows_in_group


@triton.jit
def _transform(y, pre, post, SOFTCAP: tl.constexpr):
    # z = y · pre (pre = scale / T), or z = post · tanh(y · pre) (pre = scale / c, post = c / T), and dz/dy.
    # tanh|u| = (1 - e) / (1 + e) with e = exp(-2|u|): no overflow, and 1 - tanh² = 4e / (1 + e)² exactly.
    if SOFTCAP:
        u = y * pre
        e = tl.exp2(tl.abs(u) * (-2.0 * LOG2E))
        tanh_abs = (1.0 - e) / (1.0 + e)
        z = post * tl.where(u < 0.0, -tanh_abs, tanh_abs)
        dz_dy = (post * pre * 4.0) * e / ((1.0 + e) * (1.0 + e))
    else:
        z = y * pre
        dz_dy = pre
    return z, dz_dy


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, o_v,
    stride_hidden_row, stride_weight_row,
    m_rows, V, H,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # y = hidden[rows] · W[o_v]ᵀ (+ b[o_v]), a [BLOCK_N, BLOCK_V] fp32 tile, reduced over H in BLOCK_K steps.
    # Rows outside `m_rows` (past the scored positions: ignored tokens are never read) and columns past V read 0.
    o_k = tl.arange(0, BLOCK_K)
    m_v = o_v < V
    p_h = hidden_ptr + rows[:, None] * stride_hidden_row + o_k[None, :]  # [BLOCK_N, BLOCK_K]
    p_w = weight_ptr + o_v.to(tl.int64)[None, :] * stride_weight_row + o_k[:, None]  # [BLOCK_K, BLOCK_V]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        if EVEN_K:
            b_h = tl.load(p_h, mask=m_rows[:, None], other=0.0)
            b_w = tl.load(p_w, mask=m_v[None, :], other=0.0)
        else:
            m_k = k + o_k < H
            b_h = tl.load(p_h, mask=m_rows[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_w, mask=m_k[:, None] & m_v[None, :], other=0.0)
        acc = tl.dot(b_h, b_w, acc, input_precision=INPUT_PRECISION)
        p_h += BLOCK_K
        p_w += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return acc


# ----------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, order_ptr, count_ptr, part_ptr, part_idx_ptr,  # pointers
    stride_hidden_row, stride_weight_row,  # strides
    N, V, H, NUM_SPLITS, TILES_PER_SPLIT, pre, post, mean_scale,  # sizes and scalars
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, RETURN_STATS: tl.constexpr, EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    # One program per (token block, vocabulary split): reads BLOCK_N hidden rows and the split's weight rows,
    # computes y tile by tile and writes the split's partial sums for its tokens (part [FIELDS, NUM_SPLITS, N]).
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), NUM_SPLITS, GROUP)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N < count:  # blocks of ignored positions only: nothing to do
        o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < count
        rows = tl.load(order_ptr + o_n, mask=o_n < N, other=0)  # int64 row of each position
        labels = tl.load(labels_ptr + rows, mask=m_n, other=-1)
        m_i = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        zy_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        if RETURN_STATS:
            s1_i = tl.zeros([BLOCK_N], dtype=tl.float32)
            s2_i = tl.zeros([BLOCK_N], dtype=tl.float32)
            sx_i = tl.zeros([BLOCK_N], dtype=tl.float32)
            arg_i = tl.zeros([BLOCK_N], dtype=tl.int32)
        v_start = pid_s * TILES_PER_SPLIT * BLOCK_V
        v_end = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)
        for v0 in range(v_start, v_end, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < V
            y = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, o_v, stride_hidden_row, stride_weight_row, m_n, V, H,
                HAS_BIAS, EVEN_K, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
            )  # fmt: skip
            z, _ = _transform(y, pre, post, SOFTCAP)
            # columns past V: -inf after the transform (tanh would have made them finite), so p = 0 there
            z = tl.where(m_v[None, :], z, -float("inf"))
            tile_max = tl.max(z, 1)
            if RETURN_STATS:  # a strictly larger maximum moves the first argmax; a tie keeps the earlier one
                arg_i = tl.where(tile_max > m_i, v0 + tl.argmax(z, 1, tie_break_left=True), arg_i)
            m_new = tl.maximum(m_i, tile_max)
            # first tile: the sums are 0, rescale by 1 (not by 2^-inf, which would turn 0 · -inf into NaN below);
            # >= -256 (2^-256 = 0 already), so that l_i * shift stays finite when m_i - m_new overflows
            shift = tl.where(m_i == -float("inf"), 0.0, tl.maximum((m_i - m_new) * LOG2E, -256.0))
            alpha = tl.exp2(shift)
            t = (z - m_new[:, None]) * LOG2E
            e = tl.exp2(t)
            if RETURN_STATS:  # e * t at -inf (padding, or z - m overflowing): t clamped, 0 not 0 · -inf
                s1_i = alpha * (s1_i + l_i * shift) + tl.sum(e * tl.maximum(t, -256.0), 1)
                s2_i = s2_i * (alpha * alpha) + tl.sum(e * e, 1)
                sx_i += tl.sum(tl.where(m_v[None, :], z * mean_scale, 0.0), 1)
            l_i = l_i * alpha + tl.sum(e, 1)
            m_i = m_new
            zy_i += tl.sum(tl.where(o_v[None, :] == labels[:, None], z, 0.0), 1)
        p_part = part_ptr + pid_s * N + o_n
        split_stride = NUM_SPLITS * N
        tl.store(p_part, m_i, mask=m_n)
        tl.store(p_part + split_stride, l_i, mask=m_n)
        tl.store(p_part + 2 * split_stride, zy_i, mask=m_n)
        if RETURN_STATS:
            tl.store(p_part + 3 * split_stride, s1_i, mask=m_n)
            tl.store(p_part + 4 * split_stride, s2_i, mask=m_n)
            tl.store(p_part + 5 * split_stride, sx_i, mask=m_n)
            tl.store(part_idx_ptr + pid_s * N + o_n, arg_i, mask=m_n)


@triton.jit
def _linear_logprobs_combine_kernel(
    part_ptr, part_idx_ptr, labels_ptr, order_ptr, count_ptr, logps_ptr, lse_ptr, stats_ptr,  # pointers
    N, V, NUM_SPLITS, mean_unscale,  # sizes and scalars
    RETURN_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # One program per BLOCK_P positions: merges the NUM_SPLITS partial sums of each scored position and writes
    # logp, lse (and stats [4, N]) at its original row; positions past `count` are ignored rows: zeros.
    o_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < N
    rows = tl.load(order_ptr + o_p, mask=m_p, other=0)
    scored = o_p < tl.load(count_ptr)
    labels = tl.load(labels_ptr + rows, mask=m_p, other=0)
    split_stride = NUM_SPLITS * N
    # the maximum over splits, and the first argmax: the earliest split that reaches it (splits are in V order)
    m_max = tl.full([BLOCK_P], -float("inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_P], dtype=tl.int32)
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(part_ptr + s * N + o_p, mask=scored, other=0.0)
        if RETURN_STATS:
            arg_s = tl.load(part_idx_ptr + s * N + o_p, mask=scored, other=0)
            arg = tl.where(m_s > m_max, arg_s, arg)
        m_max = tl.maximum(m_max, m_s)
    l_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    zy = tl.zeros([BLOCK_P], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    sx = tl.zeros([BLOCK_P], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        p_s = part_ptr + s * N + o_p
        # <= 0: rebase split s to m_max; >= -256 so that l_s * d stays finite (2^-256 = 0 already)
        d = tl.maximum((tl.load(p_s, mask=scored, other=0.0) - m_max) * LOG2E, -256.0)
        scale = tl.exp2(d)
        l_s = tl.load(p_s + split_stride, mask=scored, other=1.0)  # 1 at unscored lanes: no log of 0 below
        l_sum += l_s * scale
        zy += tl.load(p_s + 2 * split_stride, mask=scored, other=0.0)
        if RETURN_STATS:
            s1 += scale * (tl.load(p_s + 3 * split_stride, mask=scored, other=0.0) + l_s * d)
            s2 += scale * scale * tl.load(p_s + 4 * split_stride, mask=scored, other=1.0)
            sx += tl.load(p_s + 5 * split_stride, mask=scored, other=0.0)
    # The NaN policy: a NaN or +inf z makes l_sum NaN, all -inf makes it 0; and a label outside [0, V).
    ok = (l_sum > 0.0) & (labels >= 0) & (labels < V)
    log2_l = tl.log2(l_sum)
    logp = (zy - m_max) - log2_l * LN2  # natural units: -inf only below fp32's range
    lse = m_max + log2_l * LN2
    # NaN lse too: the backward then writes a NaN dz row (p = NaN) with or without grad_logps
    tl.store(logps_ptr + rows, tl.where(scored, tl.where(ok, logp, float("nan")), 0.0), mask=m_p)
    tl.store(lse_ptr + rows, tl.where(scored, tl.where(ok, lse, float("nan")), 0.0), mask=m_p)
    if RETURN_STATS:
        entropy = tl.where(ok, (log2_l - s1 / l_sum) * LN2, float("nan"))
        mean_z = tl.where(ok, sx * mean_unscale, float("nan"))
        is_top1 = tl.where((arg == labels) & ok, 1.0, 0.0)
        log_sum_sq = tl.where(ok, (tl.log2(s2) - 2.0 * log2_l) * LN2, float("nan"))
        tl.store(stats_ptr + rows, tl.where(scored, entropy, 0.0), mask=m_p)
        tl.store(stats_ptr + N + rows, tl.where(scored, mean_z, 0.0), mask=m_p)
        tl.store(stats_ptr + 2 * N + rows, tl.where(scored, is_top1, 0.0), mask=m_p)
        tl.store(stats_ptr + 3 * N + rows, tl.where(scored, log_sum_sq, 0.0), mask=m_p)


# ----------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _linear_logprobs_bwd_dy_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, order_ptr, count_ptr,  # pointers: inputs
    lse_ptr, grad_logps_ptr, grad_entropy_ptr, entropy_ptr, dy_ptr,  # pointers: saved, upstream, output
    stride_hidden_row, stride_weight_row, stride_dy_row,  # strides
    N, V, H, V_BEGIN, CHUNK_V, pre, post,  # sizes and scalars
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GRAD_LOGPS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    # One program per (token block, BLOCK_V columns of the chunk): recomputes the tile of y (a GEMM over H) and
    # writes dy into the chunk buffer [N, CHUNK_V] at (position, v - V_BEGIN); columns past V get 0, so the
    # GEMMs that read the buffer need no mask along it.
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), CHUNK_V // BLOCK_V, GROUP)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N < count:
        o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < count
        o_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column in the chunk
        o_v = V_BEGIN + o_c
        m_v = o_v < V
        rows = tl.load(order_ptr + o_n, mask=o_n < N, other=0)
        labels = tl.load(labels_ptr + rows, mask=m_n, other=-1)
        lse = tl.load(lse_ptr + rows, mask=m_n, other=0.0)
        y = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, o_v, stride_hidden_row, stride_weight_row, m_n, V, H,
            HAS_BIAS, EVEN_K, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        z, dz_dy = _transform(y, pre, post, SOFTCAP)
        t = z - lse[:, None]  # <= 0 but for the rounding of the fp32 lse: clamped at 0 (NaN kept), p <= 1
        p = tl.exp2(tl.where(t > 0.0, 0.0, t) * LOG2E)
        dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        if HAS_GRAD_LOGPS:
            g = tl.load(grad_logps_ptr + rows, mask=m_n, other=0.0)
            g = tl.where((labels >= 0) & (labels < V), g, float("nan"))
            dz = tl.where(o_v[None, :] == labels[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + rows, mask=m_n, other=0.0)
            mean_z = lse - tl.load(entropy_ptr + rows, mask=m_n, other=0.0)  # E_p[z]
            dz -= g_h[:, None] * p * tl.where(p > 0.0, z - mean_z[:, None], 0.0)  # 0 at -inf z, not 0 · -inf
        dy = tl.where(m_v[None, :], dz * dz_dy, 0.0)
        p_dy = dy_ptr + o_n.to(tl.int64)[:, None] * stride_dy_row + o_c[None, :]
        tl.store(p_dy, dy.to(dy_ptr.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _linear_logprobs_bwd_dh_kernel(
    dy_ptr, weight_ptr, order_ptr, count_ptr, dh_acc_ptr, grad_hidden_ptr,  # pointers
    stride_dy_row, stride_weight_row, stride_dh_acc_row, stride_grad_hidden_row,  # strides
    N, V, H, V_BEGIN, CHUNK_V,  # sizes
    FIRST_CHUNK: tl.constexpr, LAST_CHUNK: tl.constexpr, EVEN_H: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    # One program per (token block, BLOCK_H columns of H): acc = dh_acc (0 for the first chunk) + dy · W_chunk,
    # reduced over the chunk's CHUNK_V columns; stores acc in fp32 to dh_acc [N, H] (by position), or for the
    # last chunk in the input dtype to grad_hidden at the original rows.
    pid_n, pid_h = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(H, BLOCK_H), GROUP)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N < count:
        o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        o_k = tl.arange(0, BLOCK_K)
        m_n = o_n < count
        m_h = o_h < H
        p_acc = dh_acc_ptr + o_n.to(tl.int64)[:, None] * stride_dh_acc_row + o_h[None, :]
        if FIRST_CHUNK:
            acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        else:
            acc = tl.load(p_acc, mask=m_n[:, None] & m_h[None, :], other=0.0)
        p_dy = dy_ptr + o_n.to(tl.int64)[:, None] * stride_dy_row + o_k[None, :]  # [BLOCK_N, BLOCK_K]
        p_w = weight_ptr + (V_BEGIN + o_k).to(tl.int64)[:, None] * stride_weight_row + o_h[None, :]  # [K, H]
        for k in range(0, CHUNK_V, BLOCK_K):
            b_dy = tl.load(p_dy, mask=m_n[:, None], other=0.0)
            m_w = (V_BEGIN + k + o_k < V)[:, None]
            if not EVEN_H:
                m_w = m_w & m_h[None, :]
            b_w = tl.load(p_w, mask=m_w, other=0.0)
            acc = tl.dot(b_dy, b_w, acc, input_precision=INPUT_PRECISION)
            p_dy += BLOCK_K
            p_w += BLOCK_K * stride_weight_row
        if LAST_CHUNK:
            rows = tl.load(order_ptr + o_n, mask=m_n, other=0)
            p_out = grad_hidden_ptr + rows[:, None] * stride_grad_hidden_row + o_h[None, :]
            tl.store(p_out, acc.to(grad_hidden_ptr.dtype.element_ty), mask=m_n[:, None] & m_h[None, :])
        else:
            tl.store(p_acc, acc, mask=m_n[:, None] & m_h[None, :])


@triton.jit
def _linear_logprobs_bwd_dw_kernel(
    dy_ptr, hidden_ptr, order_ptr, count_ptr, grad_weight_ptr, grad_bias_ptr,  # pointers
    stride_dy_row, stride_hidden_row, stride_grad_weight_row,  # strides
    N, V, H, V_BEGIN, CHUNK_V,  # sizes
    HAS_BIAS: tl.constexpr, EVEN_H: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    # One program per (BLOCK_V rows of the chunk, BLOCK_H columns of H): grad_weight = dyᵀ · hidden[order],
    # reduced over all scored positions in BLOCK_K steps (fp32), one rounding on the store; the programs of the
    # first H block also write grad_bias = Σ_positions dy.
    pid_v, pid_h = _grouped_tile(tl.program_id(0), CHUNK_V // BLOCK_V, tl.cdiv(H, BLOCK_H), GROUP)
    o_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    o_v = V_BEGIN + o_c
    if V_BEGIN + pid_v * BLOCK_V < V:  # tiles past the vocabulary (in the last chunk) have nothing to write
        o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        o_k = tl.arange(0, BLOCK_K)
        m_h = o_h < H
        count = tl.load(count_ptr)
        acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
        bias_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for k in range(0, count, BLOCK_K):
            o_p = k + o_k
            m_p = o_p < count
            rows = tl.load(order_ptr + o_p, mask=m_p, other=0)
            # dyᵀ tile [BLOCK_V, BLOCK_K]: unit stride along V, positions strided
            p_dy = dy_ptr + o_p.to(tl.int64)[None, :] * stride_dy_row + o_c[:, None]
            b_dy = tl.load(p_dy, mask=m_p[None, :], other=0.0)
            m_x = m_p[:, None]
            if not EVEN_H:
                m_x = m_x & m_h[None, :]
            b_x = tl.load(hidden_ptr + rows[:, None] * stride_hidden_row + o_h[None, :], mask=m_x, other=0.0)
            acc = tl.dot(b_dy, b_x, acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                if pid_h == 0:
                    bias_acc += tl.sum(b_dy.to(tl.float32), 1)
        m_v = o_v < V
        p_out = grad_weight_ptr + o_v.to(tl.int64)[:, None] * stride_grad_weight_row + o_h[None, :]
        tl.store(p_out, acc.to(grad_weight_ptr.dtype.element_ty), mask=m_v[:, None] & m_h[None, :])
        if HAS_BIAS:
            if pid_h == 0:
                tl.store(grad_bias_ptr + o_v, bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration and launchers


class LinearLaunchConfig(NamedTuple):
    """Tile sizes and launch parameters of the kernels above (see `linear_launch_config`).

    block_n: tokens per tile; block_v: vocabulary columns per tile; block_h: H columns per dH / dW output tile;
    block_k: the reduction step of every GEMM (over H, over the chunk's V, over tokens); group: tiles per L2
    group; vocab_splits: forward programs per token block (None: from the SM count); vocab_chunk: columns of V
    per backward chunk (None: from a 128 MiB buffer), a multiple of block_v and block_k.
    """

    block_n: int = 128
    block_v: int = 128
    block_h: int = 128
    block_k: int = 64
    group: int = 8
    num_warps: int = 8
    num_stages: int = 3
    vocab_splits: int | None = None
    vocab_chunk: int | None = None


CHUNK_BYTES = 128 << 20  # the backward's dy chunk buffer
# Forward programs per SM: many short programs make the last, partly filled wave a small share of the time.
FORWARD_WAVES = 16


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


def linear_launch_config(N: int, V: int, H: int, dtype: torch.dtype, device: torch.device) -> LinearLaunchConfig:
    """The default tiles for a problem: 128 tokens x 64 vocabulary columns x 64 (K) for 16-bit inputs, 64 x 64 x 32
    for fp32, 8 warps, 3 stages (to be tuned on a card), shrunk to the problem on small shapes (the interpreter's
    tests); spill-free on sm_80 and sm_90 (tests/test_compile.py, bench/NOTES.md)."""
    p2 = lambda x, cap: max(16, min(cap, triton.next_power_of_2(max(x, 1))))  # noqa: E731
    base = LinearLaunchConfig()
    cfg = base._replace(
        block_n=p2(N, base.block_n), block_v=p2(V, base.block_v), block_h=p2(H, base.block_h), block_k=p2(H, 64)
    )
    if dtype == torch.float32:  # fp32 tiles in shared memory are twice as large; fp32 dots run on the FMA units
        # (ieee), whose [BLOCK_N, BLOCK_H] and [BLOCK_N, BLOCK_V] tiles live in registers: 64-token tiles
        cfg = cfg._replace(block_k=min(cfg.block_k, 32), block_n=min(cfg.block_n, 64), block_h=min(cfg.block_h, 64))
    # the tile of y and its exp, logits and masks live in registers through the vocabulary loop: at most 32 fp32
    # values of y per thread (128 x 64 in 16 bits, 64 x 64 in fp32; 128 x 128 spilled at 255 registers)
    tile = 4096 if dtype == torch.float32 else 8192
    cfg = cfg._replace(block_v=min(cfg.block_v, max(16, tile // cfg.block_n)))
    if H % 16:  # rows not 16-divisible: scalar loads, staged in registers; smaller K steps and H tiles, 2 stages
        cfg = cfg._replace(block_k=min(cfg.block_k, 16), block_h=min(cfg.block_h, 64), num_stages=2)
    return cfg


def _resolve(cfg: LinearLaunchConfig, N: int, V: int, itemsize: int, device: torch.device) -> LinearLaunchConfig:
    v_tiles = triton.cdiv(V, cfg.block_v)
    splits = cfg.vocab_splits
    if splits is None:  # about FORWARD_WAVES waves of programs over the SMs (ignored positions included)
        splits = triton.cdiv(FORWARD_WAVES * _num_sms(device), triton.cdiv(N, cfg.block_n))
    splits = max(1, min(splits, v_tiles))
    splits = triton.cdiv(v_tiles, triton.cdiv(v_tiles, splits))  # no empty split
    step = math.lcm(cfg.block_v, cfg.block_k)
    chunk = cfg.vocab_chunk
    if chunk is None:
        chunk = max(step, CHUNK_BYTES // max(N * itemsize, 1) // step * step)
    assert chunk % step == 0, f"vocab_chunk must be a multiple of block_v and block_k ({step})"
    chunk = min(chunk, triton.cdiv(V, step) * step)
    return cfg._replace(vocab_splits=splits, vocab_chunk=chunk)


def _check(hidden, weight, labels, bias):
    assert hidden.ndim == 2 and weight.ndim == 2 and hidden.shape[1] == weight.shape[1], "hidden [N, H], W [V, H]"
    assert hidden.stride(1) == 1 and weight.stride(1) == 1, "ops expect unit stride along H"
    assert hidden.dtype == weight.dtype, "hidden and weight must share a dtype"
    assert labels.shape == hidden.shape[:1], "ops expect labels [N]"
    assert bias is None or (bias.shape == weight.shape[:1] and bias.is_contiguous()), "bias [V], contiguous"
    return hidden.shape[0], weight.shape[0], hidden.shape[1]


def _transform_scalars(temperature: float, softcap: float | None, logit_scale: float) -> tuple[float, float]:
    """(pre, post) of `_transform`."""
    if softcap is None:
        return logit_scale / temperature, 1.0
    return logit_scale / softcap, softcap / temperature


def _compact(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count): the rows with scored labels first, in their original order, then the ignored ones; and
    the number of scored rows as an int32 [1] device tensor (no host synchronisation)."""
    ignored = labels == ignore_index
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    count = (~ignored).sum(dtype=torch.int32).reshape(1)
    return order, count


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # as empty_f32, in any dtype: NaN-filled under DPO_KERNELS_POISON=1 so that unwritten entries fail the tests
    if os.environ.get("DPO_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full fp32 products (tf32 would cost the 1e-5 accuracy); 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    config: LinearLaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H] (unit stride along H, any row stride), labels [N] → (logps, lse, stats | None).

    All fp32: logps [N] (0 at ignored rows, NaN where the label is outside [0, V)), lse [N] (0 at ignored rows),
    stats [4, N]: entropy, mean logit, is_top1 (1.0 / 0.0), log Σ p², 0 at ignored rows; all on the transformed
    logits z. `config` overrides the launch configuration (tests, tuning).
    """
    N, V, H = _check(hidden, weight, labels, bias)
    device = hidden.device
    logps, lse = empty_f32(N, device=device), empty_f32(N, device=device)
    stats = empty_f32(4, N, device=device) if return_stats else None
    if N == 0:
        return logps, lse, stats
    cfg = _resolve(config or linear_launch_config(N, V, H, hidden.dtype, device), N, V, hidden.element_size(), device)
    labels = labels.to(torch.int64).contiguous()  # any integer dtype
    order, count = _compact(labels, ignore_index)
    splits = cfg.vocab_splits
    k = max(V - 1, 1).bit_length()  # 2^k >= V: the mean's sum of z 2^-k never overflows
    part = empty_f32(6 if return_stats else 3, splits, N, device=device)
    part_idx = torch.empty((splits, N) if return_stats else (1,), dtype=torch.int32, device=device)
    pre, post = _transform_scalars(temperature, softcap, logit_scale)
    v_tiles = triton.cdiv(V, cfg.block_v)
    grid = (triton.cdiv(N, cfg.block_n) * splits,)
    _linear_logprobs_fwd_kernel[grid](
        hidden, weight, hidden if bias is None else bias, labels, order, count, part, part_idx,
        hidden.stride(0), weight.stride(0),
        N, V, H, splits, triton.cdiv(v_tiles, splits), pre, post, 2.0**-k,
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, RETURN_STATS=return_stats,
        EVEN_K=H % cfg.block_k == 0, INPUT_PRECISION=_input_precision(hidden.dtype),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP=cfg.group,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    BLOCK_P = 128
    _linear_logprobs_combine_kernel[(triton.cdiv(N, BLOCK_P),)](
        part, part_idx, labels, order, count, logps, lse, logps if stats is None else stats,
        N, V, splits, 2.0**k / V,
        RETURN_STATS=return_stats, BLOCK_P=BLOCK_P, num_warps=4,
    )  # fmt: skip
    return logps, lse, stats


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    weight_grad: bool = True,
    config: LinearLaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of Σ_i grad_logps[i] · logp[i] + grad_entropy[i] · entropy[i] → (grad_hidden, grad_weight,
    grad_bias | None), in the dtypes of hidden, weight and bias.

    lse (and entropy, when grad_entropy is given) are the forward's fp32 [N] outputs; grad_logps and grad_entropy
    fp32 [N] (either may be None). grad_hidden rows of ignored tokens are 0. weight_grad=False (a frozen output
    layer, e.g. LoRA) skips the dW GEMM, a third of the work, and returns None for grad_weight and grad_bias.
    """
    N, V, H = _check(hidden, weight, labels, bias)
    assert grad_entropy is None or entropy is not None, "grad_entropy needs the forward's entropy"
    device, dtype = hidden.device, hidden.dtype
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    grad_weight = _empty((V, H), weight.dtype, device) if weight_grad else None
    grad_bias = None if bias is None or not weight_grad else _empty((V,), bias.dtype, device)
    if N == 0:
        for t in (grad_weight, grad_bias):
            if t is not None:
                t.zero_()
        return grad_hidden, grad_weight, grad_bias
    cfg = _resolve(config or linear_launch_config(N, V, H, dtype, device), N, V, hidden.element_size(), device)
    labels = labels.to(torch.int64).contiguous()  # any integer dtype
    order, count = _compact(labels, ignore_index)
    chunk = cfg.vocab_chunk
    n_chunks = triton.cdiv(V, chunk)
    dy = _empty((N, chunk), dtype, device)
    dh_acc = empty_f32(N, H, device=device) if n_chunks > 1 else dy  # unused with one chunk
    pre, post = _transform_scalars(temperature, softcap, logit_scale)
    precision = _input_precision(dtype)
    lse = lse.contiguous()
    n_blocks = triton.cdiv(N, cfg.block_n)
    h_blocks = triton.cdiv(H, cfg.block_h)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    for c in range(n_chunks):
        v_begin = c * chunk
        _linear_logprobs_bwd_dy_kernel[(n_blocks * (chunk // cfg.block_v),)](
            hidden, weight, hidden if bias is None else bias, labels, order, count,
            lse,
            lse if grad_logps is None else grad_logps.contiguous(),
            lse if grad_entropy is None else grad_entropy.contiguous(),
            lse if entropy is None else entropy.contiguous(),
            dy,
            hidden.stride(0), weight.stride(0), dy.stride(0),
            N, V, H, v_begin, chunk, pre, post,
            HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
            HAS_GRAD_LOGPS=grad_logps is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            EVEN_K=H % cfg.block_k == 0, INPUT_PRECISION=precision,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP=cfg.group, **launch,
        )  # fmt: skip
        _linear_logprobs_bwd_dh_kernel[(n_blocks * h_blocks,)](
            dy, weight, order, count, dh_acc, grad_hidden,
            dy.stride(0), weight.stride(0), dh_acc.stride(0), grad_hidden.stride(0),
            N, V, H, v_begin, chunk,
            FIRST_CHUNK=c == 0, LAST_CHUNK=c == n_chunks - 1, EVEN_H=H % cfg.block_h == 0,
            INPUT_PRECISION=precision,
            BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, GROUP=cfg.group, **launch,
        )  # fmt: skip
        if not weight_grad:
            continue
        _linear_logprobs_bwd_dw_kernel[((chunk // cfg.block_v) * h_blocks,)](
            dy, hidden, order, count, grad_weight, grad_weight if bias is None else grad_bias,
            dy.stride(0), hidden.stride(0), grad_weight.stride(0),
            N, V, H, v_begin, chunk,
            HAS_BIAS=bias is not None, EVEN_H=H % cfg.block_h == 0, INPUT_PRECISION=precision,
            BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, GROUP=cfg.group, **launch,
        )  # fmt: skip
    return grad_hidden, grad_weight, grad_bias
