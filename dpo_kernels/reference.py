"""Plain PyTorch reference of all of dpo_kernels' math: the oracle of the tests and the fallback backend.

Dtype-generic and differentiable with autograd: call it on float64 inputs for the test oracle. Everything follows
TRL 1.16 (`shared/spec/dpo_losses.md`), except where TRL crashes or returns NaN on a finite problem; those places
say so in their docstrings:

- `discopop` evaluates exp(−z)·σ(z/τ) as exp(−z + logσ(z/τ)): finite for z < −88.7, where TRL 1.16 returns NaN.
- WPO weights work with `hinge` and `sft` (TRL 1.16 fails on an in-place multiply there).
- the alpha divergence accepts float64 (TRL 1.16 raises KeyError); its clamp is 80 for every dtype but float16 (11).
- `sft` over a batch without chosen completion tokens gives 0 instead of 0/0.
"""

from __future__ import annotations

import math

import torch

from dpo_kernels import checks
from dpo_kernels import losses as L
from dpo_kernels.results import DPOOutput, SequenceLogps, SequenceStats, TokenStats

# ----------------------------------------------------------------------------------------------------------------
# Per-token log-probs


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """log_softmax(logits / temperature)[label] in fp32 (float64 for float64 logits), with every backend's NaN policy.

    Labels of any integer dtype. Ignored positions: exactly 0, every stat 0 (is_top1 False) and no gradient, whatever
    their logits hold (NaN included). A row with a NaN or +inf logit, a row of −inf only, or a label outside [0, V)
    that is not ignore_index (reachable without the input checks, e.g. under torch.compile): NaN log-prob, entropy,
    mean logit and log Σp², is_top1 False, and a NaN gradient on every column of the row. −inf logits elsewhere are
    p = 0 (zero gradient through the entropy too). Everything is relative to the row's maximum, so any finite
    logits / temperature give the right value.
    """
    checks.check_logits_labels(logits, labels, ignore_index)
    temperature = checks.check_temperature(temperature)
    labels = labels.long()  # gather needs int64
    dtype = _out_dtype(logits.dtype)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    nan = torch.full((), float("nan"), dtype=dtype, device=logits.device)
    ignored = labels == ignore_index
    bad_label = ((labels < 0) | (labels >= logits.shape[-1])) & ~ignored
    # torch.where before the math, not a mask multiplied in afterwards: nothing of an ignored row (a NaN included)
    # reaches a value or a gradient.
    x = torch.where(ignored.unsqueeze(-1), zero, logits.to(dtype)) / temperature
    with torch.no_grad():
        m = x.amax(-1)  # NaN with a NaN in the row, +inf with a +inf, -inf for a row of -inf only
        nan_row = bad_label | m.isnan() | m.isinf()
    # NaN rows are zeroed as well, so that the math below stays finite; their NaN values and NaN gradient come from
    # `poison`: NaN there, and exactly 0 with a zero gradient (no 0 · NaN) on every other row.
    x_ok = torch.where(nan_row.unsqueeze(-1), zero, x)
    poison = torch.where(nan_row.unsqueeze(-1), x, zero).sum(-1) * torch.where(nan_row, nan, zero)
    shifted = x_ok - torch.where(nan_row, zero, m).unsqueeze(-1)  # z - max: <= 0, no cancellation at any size
    log_l = torch.logsumexp(shifted, dim=-1)
    safe = torch.where(ignored | bad_label, 0, labels).unsqueeze(-1)
    logps = torch.where(ignored, zero, shifted.gather(-1, safe).squeeze(-1) - log_l + poison)
    if not return_stats:
        return logps
    log_p = shifted - log_l.unsqueeze(-1)
    p = log_p.exp()
    # Where p = 0 (a −inf logit) p·log p is 0·(−inf): mask log p itself, not the product, so the gradient stays finite.
    # −Σ p log p with log p relative to the max, not lse − Σ p x, which cancels when one logit dominates.
    entropy = -(p * torch.where(p > 0, log_p, zero)).sum(-1)
    with torch.no_grad():
        mean_logit = x_ok.mean(-1, dtype=torch.float64).to(dtype)  # a float64 sum: no overflow at any finite z
        is_top1 = (shifted.argmax(-1) == labels) & ~nan_row & ~ignored  # argmax: the first maximal index (TRL)
        log_sum_sq_probs = torch.logsumexp(2.0 * log_p, dim=-1)
        nan_stat = torch.where(nan_row, nan, zero)
    stats = TokenStats(
        entropy=torch.where(ignored, zero, entropy + poison),
        mean_logit=torch.where(ignored, zero, mean_logit + nan_stat),
        is_top1=is_top1,
        log_sum_sq_probs=torch.where(ignored, zero, log_sum_sq_probs + nan_stat),
    )
    return logps, stats


def logit_transform(
    y: torch.Tensor, *, temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0
) -> torch.Tensor:
    """The output layer's logits y → the z whose softmax is scored: y · scale / T, or (softcap / T) ·
    tanh(y · scale / softcap) with a final-logit softcap (Gemma 2)."""
    if softcap is None:
        return y * (logit_scale / temperature)
    return torch.tanh(y * (logit_scale / softcap)) * (softcap / temperature)


def linear_token_logps(
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
    tile_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """`token_logps` of z = transform(hidden @ weightᵀ + bias), the whole [..., V] logits built (the fused head's
    math, for the oracle and the reference backend).

    The matmul runs in the promoted dtype of hidden and weight (float64 for the oracle). `tile_dtype` rounds
    y = hidden @ weightᵀ + bias to that dtype before the transform, as a GEMM writing a bf16 / fp16 tile does (the
    rounding passes the gradient through unchanged).
    """
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    y = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        y = y + bias.to(dtype)
    if tile_dtype is not None:
        y = y + (y.detach().to(tile_dtype).to(dtype) - y.detach())  # rounded value, identity gradient
    z = logit_transform(y, temperature=1.0, softcap=softcap, logit_scale=logit_scale)
    return token_logps(z, labels, ignore_index=ignore_index, temperature=temperature, return_stats=return_stats)


# ----------------------------------------------------------------------------------------------------------------
# Token → sequence sums


def scored_mask(labels_or_mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Bool mask of scored tokens: from labels (an integer tensor: scored where ≠ ignore_index) or a mask (bool, or a
    floating-point 0/1 tensor). An integer 0/1 tensor is labels: pass a mask as bool."""
    if labels_or_mask.dtype == torch.bool:
        return labels_or_mask
    if labels_or_mask.is_floating_point():
        return labels_or_mask != 0
    return labels_or_mask != ignore_index


def _segment_ids(shape: torch.Size, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    """Sequence index of every token (flattened) and the number of sequences."""
    if cu_seqlens is None:
        S, T = shape
        return torch.arange(S, device=device).repeat_interleave(T), S
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    S = lengths.numel()
    # output_size: the token count is known, so no device → host read of the lengths
    return torch.arange(S, device=device).repeat_interleave(lengths, output_size=shape[0]), S


def sequence_logps(
    token_logps: torch.Tensor,
    labels_or_mask: torch.Tensor,
    *,
    ld_alpha: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    token_stats: TokenStats | None = None,
    ignore_index: int = -100,
) -> SequenceLogps:
    """Sums per-token log-probs over each sequence's scored tokens.

    Padded: `token_logps` [S, T] with labels (or a mask) [S, T]. Packed: `token_logps` [N] with labels [N] and
    `cu_seqlens` [S+1]. With `ld_alpha` (LD-DPO), sequences s and s + S/2 form a pair; the k-th scored token of a
    sequence weighs 1 if k ≤ min(n_s, n_pair), else `ld_alpha`. Sums are float64 (an unscored token's value, NaN
    or inf included, never reaches them).
    """
    ld_alpha = checks.check_sequences(token_logps, labels_or_mask, cu_seqlens, ignore_index, ld_alpha)
    device = token_logps.device
    seg, S = _segment_ids(token_logps.shape, cu_seqlens, device)
    mask = scored_mask(labels_or_mask, ignore_index).reshape(-1)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    lp = torch.where(mask, token_logps.reshape(-1).to(torch.float64), zero)

    def seg_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(S, dtype=values.dtype, device=device).index_add(0, seg, values)

    n_tokens = seg_sum(mask.long())
    raw = seg_sum(lp)
    if ld_alpha is None:
        weighted = raw
    else:
        B = S // 2
        rank = torch.cumsum(mask.long(), 0) - (torch.cumsum(n_tokens, 0) - n_tokens)[seg]  # 1-based
        shared = torch.minimum(n_tokens[:B], n_tokens[B:]).repeat(2)
        # (a float32 α rounded up to float64 would be off by 1e-8: build the weights in lp's dtype)
        alpha = torch.tensor(ld_alpha, dtype=lp.dtype, device=device)
        weight = torch.where(rank <= shared[seg], torch.ones_like(alpha), alpha)
        weighted = seg_sum(lp * weight)
    stats = None
    if token_stats is not None:
        stats = SequenceStats(
            *(seg_sum(torch.where(mask, t.reshape(-1).to(lp.dtype), zero)) for t in token_stats), n_tokens=n_tokens
        )
    return SequenceLogps(logps=weighted, n_tokens=n_tokens, raw_logps=raw, stats=stats)


def wpo_weights(seq: SequenceLogps) -> torch.Tensor:
    """WPO weight of each sequence, exp(mean over its tokens of (log p − log Σ p²)), without gradient."""
    if seq.stats is None:
        raise ValueError("WPO weights need the token statistics: pass token_stats to sequence_logps")
    n = seq.n_tokens.clamp(min=1).to(seq.raw_logps.dtype)
    return torch.exp((seq.raw_logps - seq.stats.log_sum_sq_probs) / n).detach()


# ----------------------------------------------------------------------------------------------------------------
# The preference losses


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """logσ(x), stable for any x (and, on small CPU tensors, much cheaper than F.logsigmoid's parallel kernel)."""
    # One branch per sign, each fed only its own side so that no inf appears (and the gradient at 0 is σ(0)).
    pos, neg = torch.clamp(x, min=0.0), torch.clamp(x, max=0.0)
    return torch.where(x >= 0, -torch.log1p(torch.exp(-pos)), neg - torch.log1p(torch.exp(neg)))


def f_divergence_score(x: torch.Tensor, config: L.LossConfig) -> torch.Tensor:
    """The f-divergence map f(log-ratio) of spec §4 (identity for reverse_kl)."""
    kind = L.F_DIVERGENCES[config.f_divergence_code]
    if kind == "reverse_kl":
        return x
    if kind == "forward_kl":
        return 1.0 - torch.exp(-x)
    if kind == "js_divergence":
        return math.log(2.0) + _log_sigmoid(x)
    a = config.f_alpha_divergence_coef
    clamp = 11.0 if x.dtype == torch.float16 else L.ALPHA_DIVERGENCE_CLAMP
    return (torch.exp(torch.clamp((a - 1.0) * x, max=clamp)) - 1.0) / (a - 1.0)


def _pair_losses(name: str, v: dict, config: L.LossConfig) -> torch.Tensor:
    """Per-pair loss ℓ [B] of one loss type (spec §1). `v` holds the prepared inputs."""
    beta, eps = config.beta, config.label_smoothing
    z = beta * (v["sc"] - v["sr"])
    if name == "sigmoid":
        return -_log_sigmoid(z)
    if name == "hinge":
        return torch.relu(1.0 - z)
    if name in ("ipo", "sigmoid_norm"):
        u = v["sc"] / v["nc"] - v["sr"] / v["nr"]
        return (u - 1.0 / (2.0 * beta)) ** 2 if name == "ipo" else -_log_sigmoid(beta * u)
    if name == "exo_pair":
        return torch.sigmoid(z) * (_log_sigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            _log_sigmoid(-z) - math.log(eps)
        )
    if name == "nca_pair":
        bc, br = beta * v["xc"], beta * v["xr"]
        return -_log_sigmoid(bc) - 0.5 * _log_sigmoid(-bc) - 0.5 * _log_sigmoid(-br)
    if name == "robust":
        return (-(1.0 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    if name == "bco_pair":
        return -_log_sigmoid(beta * v["xc"]) - _log_sigmoid(-beta * v["xr"])
    if name == "sppo_hard":
        return (v["xc"] - 1.0 / (2.0 * beta)) ** 2 + (v["xr"] + 1.0 / (2.0 * beta)) ** 2
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            a, b = v["pc"] - v["pr"], v["rc"] - v["rr"]
        else:
            a, b = v["xc"], v["xr"]
        d = beta * (torch.sort(a, stable=True).values - torch.sort(b, stable=True).values)
        return -(1.0 - eps) * _log_sigmoid(d) - eps * _log_sigmoid(-d)
    if name == "apo_zero":
        return 1.0 - torch.sigmoid(beta * v["xc"]) + torch.sigmoid(beta * v["xr"])
    if name == "apo_down":
        xc, xr = v["xc"], v["xr"]
        return torch.sigmoid(beta * xc) + 1.0 - torch.sigmoid(beta * (xc - xr))
    if name == "discopop":
        tau = config.discopop_tau
        # exp(−z)·σ(z/τ) as one exponent: TRL's product is inf·0 = NaN for z < −88.7 (fp32).
        return -_log_sigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(-z + _log_sigmoid(z / tau))
    if name == "sft":
        n = v["sft_count"].sum().clamp(min=1).to(v["sft_sum"].dtype)
        return (-v["sft_sum"].sum() / n).expand(v["pc"].shape[0])
    raise AssertionError(f"no formula for {name}")  # losses.LOSS_TYPES and this function disagree


def stats_metrics(stats: SequenceStats) -> dict[str, torch.Tensor]:
    """TRL's token-weighted metrics (logits/*, entropy, mean_token_accuracy) from per-sequence sums [2B]."""
    B = checks.check_even_rows(stats.n_tokens.shape[0])
    n = stats.n_tokens.to(stats.entropy.dtype)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    return {
        "logits/chosen": ratio(stats.mean_logit[:B].sum(), n[:B].sum()),
        "logits/rejected": ratio(stats.mean_logit[B:].sum(), n[B:].sum()),
        "entropy": ratio(stats.entropy.sum(), n.sum()).detach(),
        "mean_token_accuracy": ratio(stats.is_top1[:B].sum(), n[:B].sum()),
    }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    wpo_weights: torch.Tensor | None = None,
    chosen_token_logp_sum: torch.Tensor | None = None,
    chosen_token_count: torch.Tensor | None = None,
    sequence_stats: SequenceStats | None = None,
) -> DPOOutput:
    """TRL 1.16's DPO loss on per-sequence log-probs [B]; see `dpo_kernels.dpo_loss` for the arguments."""
    config = L.loss_config(
        loss_type,
        loss_weights,
        beta,
        label_smoothing,
        discopop_tau,
        f_divergence_type,
        f_alpha_divergence_coef,
        use_weighting=wpo_weights is not None,
    )
    pc, pr, rc, rr = (
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    sft_count = checks.check_loss_inputs(
        config,
        pc,
        pr,
        rc,
        rr,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        wpo_weights=wpo_weights,
        chosen_token_logp_sum=chosen_token_logp_sum,
        chosen_token_count=chosen_token_count,
    )
    # at least fp32, as every backend: bf16 sums of thousands of nats would round the margin away
    dtype = torch.promote_types(torch.promote_types(pc.dtype, pr.dtype), torch.promote_types(rc.dtype, rr.dtype))
    dtype = torch.promote_types(dtype, torch.float32)
    pc, pr, rc, rr = (t.to(dtype) for t in (pc, pr, rc, rr))
    B = pc.shape[0]

    v = {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "xc": pc - rc, "xr": pr - rr}
    v["sc"], v["sr"] = f_divergence_score(v["xc"], config), f_divergence_score(v["xr"], config)
    if config.needs_lengths:
        v["nc"] = chosen_lengths.to(dtype).clamp(min=1)
        v["nr"] = rejected_lengths.to(dtype).clamp(min=1)
    if config.has_sft:
        v["sft_sum"] = pc if chosen_token_logp_sum is None else chosen_token_logp_sum.to(dtype)
        v["sft_count"] = sft_count
    if wpo_weights is not None:
        pair_weight = (wpo_weights[:B] * wpo_weights[B:]).detach().to(dtype)

    terms = []
    for name in config.loss_types:
        ell = _pair_losses(name, v, config)
        terms.append(ell * pair_weight if wpo_weights is not None else ell)
    losses = torch.stack(terms)
    loss = sum(w * ell.mean() for w, ell in zip(config.loss_weights, terms))

    chosen_rewards = (config.beta * v["xc"]).detach()
    rejected_rewards = (config.beta * v["xr"]).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    if sequence_stats is not None:
        metrics.update(stats_metrics(sequence_stats))
    return DPOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=pc,
        rejected_logps=pr,
        metrics=metrics,
    )


def dpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
    reference_free: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
    **loss_options,
) -> DPOOutput:
    """token_logps → sequence_logps → dpo_loss; see `dpo_kernels.dpo_loss_from_logits` for the arguments. Outputs
    are float64 (the sequence sums are); the reference log-probs get no gradient."""

    def sequences(x: torch.Tensor, with_stats: bool) -> SequenceLogps:
        out = token_logps(x, labels, ignore_index=ignore_index, temperature=temperature, return_stats=with_stats)
        lp, stats = out if with_stats else (out, None)
        return sequence_logps(lp, labels != ignore_index, ld_alpha=ld_alpha, cu_seqlens=cu_seqlens, token_stats=stats)

    given = [ref_chosen_logps is not None, ref_rejected_logps is not None]
    if given[0] != given[1] or given[0] + (ref_logits is not None) + bool(reference_free) != 1:
        raise ValueError("give the reference exactly one way: both ref log-probs, ref_logits or reference_free=True")
    seq = sequences(logits, return_stats or use_weighting)
    B = checks.check_even_rows(seq.logps.shape[0])
    if reference_free:
        rc = rr = torch.zeros(B, dtype=seq.logps.dtype, device=seq.logps.device)
    elif ref_logits is not None:
        with torch.no_grad():
            ref = sequences(ref_logits, False).logps
        rc, rr = ref[:B], ref[B:]
    else:
        rc, rr = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    return dpo_loss_from_sequences(seq, rc, rr, use_weighting=use_weighting, return_stats=return_stats, **loss_options)


def dpo_loss_from_sequences(
    seq: SequenceLogps,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    use_weighting: bool,
    return_stats: bool,
    **loss_options,
) -> DPOOutput:
    """The per-sequence end of the from-logits and from-hidden math: the policy's sequence sums [2B] (chosen first)
    and the reference's [B] → `dpo_loss`, with the token counts as lengths, the plain chosen sums for sft, WPO
    weights and the stats metrics."""
    B = checks.check_even_rows(seq.logps.shape[0])
    return dpo_loss(
        seq.logps[:B],
        seq.logps[B:],
        rc,
        rr,
        chosen_lengths=seq.n_tokens[:B],
        rejected_lengths=seq.n_tokens[B:],
        chosen_token_logp_sum=seq.raw_logps[:B],
        chosen_token_count=seq.n_tokens[:B],
        wpo_weights=wpo_weights(seq) if use_weighting else None,
        sequence_stats=seq.stats if return_stats else None,
        **loss_options,
    )
