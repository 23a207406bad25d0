"""Preference losses on per-sequence log-probs: every TRL 1.16 loss type or a weighted mix.

Per pair i (spec §0–§2): xc = pc − rc, xr = pr − rr, scores sc = f(xc), sr = f(xr) (f-divergence
map, §4), z = β·(sc − sr), u = sc/nc − sr/nr (lengths clamped ≥ 1). Term k is ℓ_k,i · ω_i (ω: WPO
pair weight, 1 without WPO) and

    loss = Σ_k w_k · mean_i(ℓ_k,i · ω_i),    grads[:, i] = ∂loss/∂(pc, pr, rc, rr, sft_sum)_i

with each loss's closed-form derivative (§6): the Δ-losses (sigmoid, hinge, exo_pair, robust,
discopop) give dℓ/dz, then ∂/∂pc = β·dℓ/dz·f'(xc) and ∂/∂pr = −β·dℓ/dz·f'(xr); ipo and sigmoid_norm
give dℓ/du, then ∂/∂pc = dℓ/du·f'(xc)/nc and ∂/∂pr = −dℓ/du·f'(xr)/nr; the log-ratio losses give
dℓ/dxc and dℓ/dxr. ∂/∂rc = −∂/∂pc and ∂/∂rr = −∂/∂pr, except for aot and sft:

- aot / aot_unpaired: a = pc − pr, b = rc − rr (aot) or a = xc, b = xr (aot_unpaired). The launcher
  sorts a and b with torch.sort(stable=True), as the reference does, and passes the sorted values
  and each item's rank (the inverse permutation). ℓ at rank j uses d_j = β·(a_(j) − b_(j)); item i
  gets ∂ℓ/∂a_i = g(β·(a_i − b_(rank_a(i)))) and ∂ℓ/∂b_i = −g(β·(a_(rank_b(i)) − b_i)), with
  g(d) = β·(−(1−ε)·σ(−d) + ε·σ(d)): gathers, no scatter.
- sft: ℓ_i = −Σ sft_sum / max(1, Σ sft_count) for every i, so
  ∂loss/∂sft_sum_j = −w·(Σ_i ω_i) / (B·max(1, Σ sft_count)). Without sft_sum the term reads pc and
  its gradient is added to row 0 (row 4 stays 0).

Stable forms (§9): logσ(x) = min(x, 0) − log1p(e^−|x|); σ from e^−|x|, which cannot overflow;
discopop's e^−z·σ(z/τ) = exp(−z + logσ(z/τ)), finite where TRL 1.16 gives NaN (z < −88.7).

One program loops over the pairs in BLOCK_B blocks: with sft, a first pass sums sft_sum, sft_count
and ω; the main pass reads pc, pr, rc, rr (+ lengths, ω): 16–32 bytes per pair, and writes
losses [K, B], grads [5, B], rewards [2, B]: 4·(K + 7) bytes per pair, then the loss and the 6
reward metrics (losses.REWARD_METRICS order).
"""

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dpo_kernels import losses as L
from dpo_kernels.ops._config import dpo_launch_config, empty_f32


def _code(name: str) -> tl.constexpr:
    return tl.constexpr(L.LOSS_TYPES.index(name))


def _code_set(names) -> tl.constexpr:
    return tl.constexpr(sum(1 << L.LOSS_TYPES.index(name) for name in names))


_SIGMOID = _code("sigmoid")
_HINGE = _code("hinge")
_IPO = _code("ipo")
_EXO_PAIR = _code("exo_pair")
_NCA_PAIR = _code("nca_pair")
_ROBUST = _code("robust")
_BCO_PAIR = _code("bco_pair")
_SPPO_HARD = _code("sppo_hard")
_AOT = _code("aot")
_AOT_UNPAIRED = _code("aot_unpaired")
_APO_ZERO = _code("apo_zero")
_APO_DOWN = _code("apo_down")
_DISCOPOP = _code("discopop")
_SFT = _code("sft")
_SIGMOID_NORM = _code("sigmoid_norm")
# Families, as bit sets of loss codes: the branch of _loss_term that handles a code.
_DELTA_LOSSES = _code_set(L.family("delta"))
_RATIO_LOSSES = _code_set(L.family("ratio"))
_LENGTH_LOSSES = _code_set(L.family("length"))
_SORTED_LOSSES = _code_set(L.family("sorted"))

# f-divergence codes (losses.F_DIVERGENCES order)
_REVERSE_KL = tl.constexpr(L.F_DIVERGENCES.index("reverse_kl"))
_FORWARD_KL = tl.constexpr(L.F_DIVERGENCES.index("forward_kl"))
_JS_DIVERGENCE = tl.constexpr(L.F_DIVERGENCES.index("js_divergence"))
_ALPHA_CLAMP = tl.constexpr(L.ALPHA_DIVERGENCE_CLAMP)
_LOG2 = tl.constexpr(math.log(2.0))

# The loss codes reach the kernel as one constexpr integer, CODE_BITS bits per term, sized from the registry so that
# a new loss type widens the field instead of aliasing another code.
CODE_BITS = max(1, (len(L.LOSS_TYPES) - 1).bit_length())
MAX_TERMS = L.MAX_LOSS_TERMS
assert CODE_BITS * MAX_TERMS <= 63, "the packed loss codes must fit one int64 constexpr"


@triton.jit
def _log1p(e):
    # log(1 + e) for 0 <= e <= 1, accurate for small e (Goldberg's correction; tl has no log1p)
    u = 1.0 + e
    du = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, e, tl.log(u) * (e / du))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _f_divergence(x, alpha_coef, F_DIV: tl.constexpr):
    # the score f(x) and f'(x) (spec §4)
    if F_DIV == _REVERSE_KL:
        score = x
        slope = tl.full(x.shape, 1.0, tl.float32)
    elif F_DIV == _FORWARD_KL:
        slope = tl.exp(-x)
        score = 1.0 - slope
    elif F_DIV == _JS_DIVERGENCE:
        score = _LOG2 + _log_sigmoid(x)
        slope = _sigmoid(-x)
    else:
        t = (alpha_coef - 1.0) * x
        e = tl.exp(tl.minimum(t, _ALPHA_CLAMP, propagate_nan=tl.PropagateNan.ALL))
        score = (e - 1.0) / (alpha_coef - 1.0)
        slope = tl.where(t <= _ALPHA_CLAMP, e, 0.0)
    return score, slope


@triton.jit
def _delta_loss(CODE: tl.constexpr, z, eps, tau, log1m_eps, log_eps):
    # ℓ(z) and dℓ/dz of the losses that read z = β·Δ
    if CODE == _SIGMOID:
        ell = -_log_sigmoid(z)
        gz = -_sigmoid(-z)
    elif CODE == _HINGE:
        ell = tl.maximum(1.0 - z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        gz = tl.where(z < 1.0, -1.0, 0.0)
    elif CODE == _EXO_PAIR:
        s_pos = _sigmoid(z)
        s_neg = _sigmoid(-z)
        ell = s_pos * (_log_sigmoid(z) - log1m_eps) + s_neg * (_log_sigmoid(-z) - log_eps)
        gz = s_pos * s_neg * (z - log1m_eps + log_eps)
    elif CODE == _ROBUST:
        ell = (-(1.0 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1.0 - 2.0 * eps)
        gz = (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) / (1.0 - 2.0 * eps)
    else:
        tl.static_assert(CODE == _DISCOPOP)
        # m = σ(z/τ), 1 − m = σ(−z/τ); every e^−z factor is folded into one exponent
        log_m = _log_sigmoid(z / tau)
        log_1m = _log_sigmoid(-z / tau)
        log_sig_z = _log_sigmoid(z)
        e_m = tl.exp(log_m - z)  # e^−z·m
        ell = -log_sig_z * tl.exp(log_1m) + e_m
        dm = tl.exp(log_m + log_1m) / tau  # m' = m(1 − m)/τ
        dm_e = tl.exp(log_m + log_1m - z) / tau  # m'·e^−z
        gz = dm * log_sig_z + dm_e - _sigmoid(-z) * tl.exp(log_1m) - e_m
    return ell, gz


@triton.jit
def _ratio_loss(CODE: tl.constexpr, xc, xr, beta):
    # ℓ, dℓ/dxc, dℓ/dxr of the losses that read the log-ratios
    bc = beta * xc
    br = beta * xr
    if CODE == _NCA_PAIR:
        ell = -_log_sigmoid(bc) - 0.5 * _log_sigmoid(-bc) - 0.5 * _log_sigmoid(-br)
        gc = beta * (0.5 * _sigmoid(bc) - _sigmoid(-bc))
        gr = 0.5 * beta * _sigmoid(br)
    elif CODE == _BCO_PAIR:
        ell = -_log_sigmoid(bc) - _log_sigmoid(-br)
        gc = -beta * _sigmoid(-bc)
        gr = beta * _sigmoid(br)
    elif CODE == _SPPO_HARD:
        h = 0.5 / beta
        ell = (xc - h) * (xc - h) + (xr + h) * (xr + h)
        gc = 2.0 * (xc - h)
        gr = 2.0 * (xr + h)
    elif CODE == _APO_ZERO:
        ell = 1.0 - _sigmoid(bc) + _sigmoid(br)
        gc = -beta * _sigmoid(bc) * _sigmoid(-bc)
        gr = beta * _sigmoid(br) * _sigmoid(-br)
    else:
        tl.static_assert(CODE == _APO_DOWN)
        bm = beta * (xc - xr)
        s_margin = _sigmoid(bm) * _sigmoid(-bm)
        ell = _sigmoid(bc) + 1.0 - _sigmoid(bm)
        gc = beta * (_sigmoid(bc) * _sigmoid(-bc) - s_margin)
        gr = beta * s_margin
    return ell, gc, gr


@triton.jit
def _aot_pair(d, beta, eps):
    # ℓ(d) = −(1−ε)·logσ(d) − ε·logσ(−d) and g = β·dℓ/dd, d = β·(a − b)
    ell = -(1.0 - eps) * _log_sigmoid(d) - eps * _log_sigmoid(-d)
    g = beta * (-(1.0 - eps) * _sigmoid(-d) + eps * _sigmoid(d))
    return ell, g


@triton.jit
def _loss_term(
    CODE: tl.constexpr,
    pc, pr, rc, rr, xc, xr, sc, sr, fpc, fpr, nc, nr,  # [BLOCK_B] inputs of this block
    offs, mask, sorted_ptr, ranks_ptr, B,  # sorted a, b (aot) and ranks
    beta, eps, tau, log1m_eps, log_eps, sft_loss, sft_grad,  # scalars
):  # fmt: skip
    # ℓ_i and ∂ℓ_i/∂(pc, pr, rc, rr, sft_sum) of one loss type (∂/∂sft_sum: summed over the batch)
    zero = tl.zeros_like(xc)  # fp32 (pc may be float64 sums)
    g_sft = zero
    if (_DELTA_LOSSES >> CODE) & 1:
        ell, gz = _delta_loss(CODE, beta * (sc - sr), eps, tau, log1m_eps, log_eps)
        g_pc = beta * gz * fpc
        g_pr = -beta * gz * fpr
        g_rc = -g_pc
        g_rr = -g_pr
    elif (_LENGTH_LOSSES >> CODE) & 1:
        u = sc / nc - sr / nr
        if CODE == _IPO:
            h = 0.5 / beta
            ell = (u - h) * (u - h)
            gu = 2.0 * (u - h)
        else:
            tl.static_assert(CODE == _SIGMOID_NORM)
            ell = -_log_sigmoid(beta * u)
            gu = -beta * _sigmoid(-beta * u)
        g_pc = gu * fpc / nc
        g_pr = -gu * fpr / nr
        g_rc = -g_pc
        g_rr = -g_pr
    elif (_RATIO_LOSSES >> CODE) & 1:
        ell, g_pc, g_pr = _ratio_loss(CODE, xc, xr, beta)
        g_rc = -g_pc
        g_rr = -g_pr
    elif (_SORTED_LOSSES >> CODE) & 1:
        # rows (a, b) of sorted_ptr / ranks_ptr: 0, 1 for aot, 2, 3 for aot_unpaired
        ROW: tl.constexpr = 2 * (CODE - _AOT)
        a_ptr = sorted_ptr + ROW * B
        b_ptr = sorted_ptr + (ROW + 1) * B
        if CODE == _AOT:
            a = (pc - pr).to(tl.float32)
            b = (rc - rr).to(tl.float32)
        else:
            a = xc
            b = xr
        a_rank = tl.load(a_ptr + offs, mask=mask, other=0.0)
        b_rank = tl.load(b_ptr + offs, mask=mask, other=0.0)
        ell, _ = _aot_pair(beta * (a_rank - b_rank), beta, eps)
        rank_a = tl.load(ranks_ptr + ROW * B + offs, mask=mask, other=0)
        rank_b = tl.load(ranks_ptr + (ROW + 1) * B + offs, mask=mask, other=0)
        _, g_a = _aot_pair(beta * (a - tl.load(b_ptr + rank_a, mask=mask, other=0.0)), beta, eps)
        _, g_b = _aot_pair(beta * (tl.load(a_ptr + rank_b, mask=mask, other=0.0) - b), beta, eps)
        g_b = -g_b
        if CODE == _AOT:
            g_pc = g_a
            g_pr = -g_a
            g_rc = g_b
            g_rr = -g_b
        else:
            g_pc = g_a
            g_rc = -g_a
            g_pr = g_b
            g_rr = -g_b
    else:
        tl.static_assert(CODE == _SFT)
        ell = zero + sft_loss
        g_sft = zero + sft_grad
        g_pc = zero
        g_pr = zero
        g_rc = zero
        g_rr = zero
    return ell, g_pc, g_pr, g_rc, g_rr, g_sft


@triton.jit
def _dpo_fwd_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr,  # [B] inputs
    nc_ptr, nr_ptr, pair_weights_ptr, sft_sum_ptr, sft_count_ptr,  # [B] optional inputs
    sorted_ptr, ranks_ptr, loss_weights_ptr,  # aot's [4, B] sorted values and ranks; [K] weights
    loss_ptr, losses_ptr, grads_ptr, rewards_ptr, metrics_ptr,  # outputs
    B, beta, eps, tau, log1m_eps, log_eps, alpha_coef,  # sizes and scalars
    K: tl.constexpr, LOSS_CODES: tl.constexpr, CODE_BITS: tl.constexpr, F_DIV: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    HAS_SFT: tl.constexpr, SFT_ON_PC: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # a single program: (sft only) a pass summing sft_sum, sft_count and ω over the batch, then one
    # pass over the pairs in BLOCK_B blocks writing losses, grads and rewards and accumulating the
    # loss and the metrics
    cols = tl.arange(0, BLOCK_B)
    sft_loss = 0.0
    sft_grad = 0.0
    if HAS_SFT:
        acc_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_count = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_weight = tl.zeros([BLOCK_B], dtype=tl.float32)
        for start in range(0, B, BLOCK_B):
            offs = start + cols
            mask = offs < B
            acc_sum += tl.load(sft_sum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_count += tl.load(sft_count_ptr + offs, mask=mask, other=0).to(tl.float32)
            if HAS_WEIGHTS:
                acc_weight += tl.load(pair_weights_ptr + offs, mask=mask, other=0.0)
        n_sft = tl.maximum(tl.sum(acc_count, 0), 1.0)
        sft_loss = -tl.sum(acc_sum, 0) / n_sft
        if HAS_WEIGHTS:
            sft_grad = -tl.sum(acc_weight, 0) / n_sft
        else:
            sft_grad = -B / n_sft

    acc_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_chosen = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_rejected = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_margin = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_correct = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_pc = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_pr = tl.zeros([BLOCK_B], dtype=tl.float32)
    inv_B = 1.0 / B
    for start in range(0, B, BLOCK_B):
        offs = start + cols
        mask = offs < B
        pc = tl.load(pc_ptr + offs, mask=mask, other=0.0)
        pr = tl.load(pr_ptr + offs, mask=mask, other=0.0)
        rc = tl.load(rc_ptr + offs, mask=mask, other=0.0)
        rr = tl.load(rr_ptr + offs, mask=mask, other=0.0)
        # the log-ratios are differences of sums of thousands of nats: formed in the inputs' precision (float64
        # sequence sums), then fp32 for the rest
        xc = (pc - rc).to(tl.float32)
        xr = (pr - rr).to(tl.float32)
        sc, fpc = _f_divergence(xc, alpha_coef, F_DIV)
        sr, fpr = _f_divergence(xr, alpha_coef, F_DIV)
        nc = tl.full([BLOCK_B], 1.0, tl.float32)
        nr = tl.full([BLOCK_B], 1.0, tl.float32)
        if HAS_LENGTHS:
            nc = tl.maximum(tl.load(nc_ptr + offs, mask=mask, other=1).to(tl.float32), 1.0)
            nr = tl.maximum(tl.load(nr_ptr + offs, mask=mask, other=1).to(tl.float32), 1.0)
        g_pc = tl.zeros([BLOCK_B], dtype=tl.float32)
        g_pr = tl.zeros([BLOCK_B], dtype=tl.float32)
        g_rc = tl.zeros([BLOCK_B], dtype=tl.float32)
        g_rr = tl.zeros([BLOCK_B], dtype=tl.float32)
        g_sft = tl.zeros([BLOCK_B], dtype=tl.float32)
        if HAS_WEIGHTS:
            omega = tl.load(pair_weights_ptr + offs, mask=mask, other=0.0)
        for k in tl.static_range(K):
            w = tl.load(loss_weights_ptr + k)
            # the k-th loss code (CODE_BITS bits each), passed as an expression: a constexpr
            # cannot be re-bound in a loop
            ell, d_pc, d_pr, d_rc, d_rr, d_sft = _loss_term(
                (LOSS_CODES >> (CODE_BITS * k)) & ((1 << CODE_BITS) - 1),
                pc, pr, rc, rr, xc, xr, sc, sr, fpc, fpr, nc, nr,
                offs, mask, sorted_ptr, ranks_ptr, B,
                beta, eps, tau, log1m_eps, log_eps, sft_loss, sft_grad,
            )  # fmt: skip
            w_pair = tl.full([BLOCK_B], 1.0, tl.float32) * w
            if HAS_WEIGHTS:
                ell = ell * omega
                w_pair = w_pair * omega
            tl.store(losses_ptr + k * B + offs, ell, mask=mask)
            acc_loss += tl.where(mask, w * ell, 0.0)
            g_pc += w_pair * d_pc
            g_pr += w_pair * d_pr
            g_rc += w_pair * d_rc
            g_rr += w_pair * d_rr
            # the sft gradient already carries the batch's ω (it is the same for every pair)
            g_sft += w * d_sft
        if SFT_ON_PC:
            g_pc += g_sft
            g_sft = tl.zeros([BLOCK_B], dtype=tl.float32)
        tl.store(grads_ptr + offs, g_pc * inv_B, mask=mask)
        tl.store(grads_ptr + B + offs, g_pr * inv_B, mask=mask)
        tl.store(grads_ptr + 2 * B + offs, g_rc * inv_B, mask=mask)
        tl.store(grads_ptr + 3 * B + offs, g_rr * inv_B, mask=mask)
        tl.store(grads_ptr + 4 * B + offs, g_sft * inv_B, mask=mask)

        chosen = beta * xc
        rejected = beta * xr
        tl.store(rewards_ptr + offs, chosen, mask=mask)
        tl.store(rewards_ptr + B + offs, rejected, mask=mask)
        acc_chosen += tl.where(mask, chosen, 0.0)
        acc_rejected += tl.where(mask, rejected, 0.0)
        acc_margin += tl.where(mask, chosen - rejected, 0.0)
        acc_correct += tl.where(mask & (chosen > rejected), 1.0, 0.0)
        acc_pc += tl.where(mask, pc.to(tl.float32), 0.0)
        acc_pr += tl.where(mask, pr.to(tl.float32), 0.0)
    tl.store(loss_ptr, tl.sum(acc_loss, 0) * inv_B)
    tl.store(metrics_ptr + 0, tl.sum(acc_chosen, 0) * inv_B)
    tl.store(metrics_ptr + 1, tl.sum(acc_rejected, 0) * inv_B)
    tl.store(metrics_ptr + 2, tl.sum(acc_margin, 0) * inv_B)
    tl.store(metrics_ptr + 3, tl.sum(acc_correct, 0) * inv_B)
    tl.store(metrics_ptr + 4, tl.sum(acc_pc, 0) * inv_B)
    tl.store(metrics_ptr + 5, tl.sum(acc_pr, 0) * inv_B)


class DPOFwdOut(NamedTuple):
    loss: torch.Tensor  # fp32 [], Σ_k w_k · mean_i losses[k, i]
    losses: torch.Tensor  # fp32 [K, B], per term and pair (aot: sorted rank), ω-weighted
    grads: torch.Tensor  # fp32 [5, B], ∂loss/∂(pc, pr, rc, rr, sft_sum)
    rewards: torch.Tensor  # fp32 [2, B], β·xc and β·xr
    metrics: torch.Tensor  # fp32 [6], losses.REWARD_METRICS order


@functools.lru_cache(maxsize=64)
def _loss_weights(weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # cached: a training run uses one config, so the host → device copy happens once
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _sorted_inputs(pc, pr, rc, rr) -> tuple[torch.Tensor, torch.Tensor]:
    """aot's sorted values and ranks, [4, B] each: rows (a, b) = (pc − pr, rc − rr) for aot, then
    (xc, xr) for aot_unpaired. torch.sort(stable=True) as in the reference; the rank of each item is
    the inverse permutation (argsort of the order)."""
    ab = torch.stack((pc, rc, pc, pr)) - torch.stack((pr, rr, rc, rr))
    values, order = torch.sort(ab, dim=1, stable=True)
    return values, torch.argsort(order, dim=1)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def dpo_fwd(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    config: L.LossConfig,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    sft_sum: torch.Tensor | None = None,
    sft_count: torch.Tensor | None = None,
) -> DPOFwdOut:
    """Loss, per-pair losses, analytic gradients, rewards and reward metrics of `config`'s loss mix.

    Args:
        pc, pr, rc, rr: [B] policy / reference log-probs of the chosen and rejected completions: all
            four are read in float64 when one is float64 (the log-ratios keep the precision of sums
            of thousands of nats), else in fp32.
        config: a `losses.LossConfig` (at most MAX_TERMS = 15 terms).
        chosen_lengths, rejected_lengths: [B] completion-token counts (any numeric dtype, clamped
            ≥ 1); required by ipo and sigmoid_norm.
        pair_weights: [B] WPO weights ω_i = w_chosen · w_rejected, or None; not with aot*.
        sft_sum, sft_count: [B] chosen-token log-prob sums and counts for sft; sft_sum defaults to
            pc (its gradient then goes to row 0 of grads), sft_count to chosen_lengths.
    Returns:
        DPOFwdOut(loss [], losses [K, B], grads [5, B], rewards [2, B], metrics [6]), all fp32.

    Example:
        ``dpo_fwd(pc, pr, rc, rr, config=losses.loss_config(["sigmoid", "sft"]), sft_count=n)``
    """
    B, device = pc.shape[0], pc.device
    if B == 0:
        raise ValueError("dpo_fwd expects at least one pair, got B = 0")
    codes = config.loss_codes
    K = len(codes)
    if K > MAX_TERMS:
        raise ValueError(f"dpo_fwd handles at most {MAX_TERMS} loss terms, got {K}")
    has_lengths = chosen_lengths is not None and rejected_lengths is not None
    if config.needs_lengths and not has_lengths:
        raise ValueError("loss types ipo / sigmoid_norm need chosen_lengths and rejected_lengths")
    has_weights = pair_weights is not None
    if has_weights and config.needs_sort:
        raise ValueError("WPO pair_weights are not supported with 'aot' / 'aot_unpaired'")
    # float64 log-probs stay float64 (the kernel forms the log-ratios in their precision); others become fp32
    wide = torch.float64 if torch.float64 in (pc.dtype, pr.dtype, rc.dtype, rr.dtype) else torch.float32
    pc, pr, rc, rr = (t.to(wide).contiguous() for t in (pc, pr, rc, rr))
    sft_on_pc = config.has_sft and sft_sum is None
    if config.has_sft:
        sft_sum = pc if sft_sum is None else _f32(sft_sum)
        sft_count = chosen_lengths if sft_count is None else sft_count
        if sft_count is None:
            raise ValueError("loss type sft needs sft_count (or chosen_lengths)")
        sft_count = sft_count.contiguous()
    if config.needs_sort:
        sorted_values, ranks = _sorted_inputs(pc, pr, rc, rr)
        sorted_values = _f32(sorted_values)
    else:
        sorted_values, ranks = pc, pc  # never read
    eps = config.label_smoothing
    exo_logs = (math.log1p(-eps), math.log(eps)) if 0.0 < eps < 1.0 else (0.0, 0.0)

    loss = empty_f32(device=device)
    losses = empty_f32(K, B, device=device)
    grads = empty_f32(5, B, device=device)
    rewards = empty_f32(2, B, device=device)
    metrics = empty_f32(len(L.REWARD_METRICS), device=device)
    BLOCK_B, num_warps = dpo_launch_config(B)
    _dpo_fwd_kernel[(1,)](
        pc, pr, rc, rr,
        chosen_lengths.contiguous() if has_lengths else pc,
        rejected_lengths.contiguous() if has_lengths else pc,
        _f32(pair_weights) if has_weights else pc,
        sft_sum if config.has_sft else pc,
        sft_count if config.has_sft else pc,
        sorted_values, ranks, _loss_weights(config.loss_weights, device),
        loss, losses, grads, rewards, metrics,
        B, config.beta, eps, config.discopop_tau, *exo_logs, config.f_alpha_divergence_coef,
        K=K, LOSS_CODES=sum(code << (CODE_BITS * k) for k, code in enumerate(codes)), CODE_BITS=CODE_BITS,
        F_DIV=config.f_divergence_code, HAS_LENGTHS=has_lengths, HAS_WEIGHTS=has_weights,
        HAS_SFT=config.has_sft, SFT_ON_PC=sft_on_pc, BLOCK_B=BLOCK_B, num_warps=num_warps,
    )  # fmt: skip
    return DPOFwdOut(loss=loss, losses=losses, grads=grads, rewards=rewards, metrics=metrics)
