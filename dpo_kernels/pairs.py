"""The per-sequence end of the from-logits and from-hidden paths, single-process (`api`) and vocabulary-parallel
(`parallel`): the reference's [B] log-probs given exactly one way, then the policy's sequence sums → `DPOOutput`."""

from __future__ import annotations

import torch

from dpo_kernels import checks
from dpo_kernels import custom_ops as C
from dpo_kernels import losses as L
from dpo_kernels import reference as R
from dpo_kernels.results import DPOOutput, SequenceLogps, SequenceStats


def precomputed_reference(
    ref_chosen_logps, ref_rejected_logps, computed: str | None, reference_free: bool, B: int, device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reference's [B] chosen and rejected log-probs when precomputed (floating point, detached, kept in their
    precision) or `reference_free=True` (zeros); None when the caller computes them from `computed` (the name of
    its reference input, e.g. "ref_logits", given; None when not). Exactly one way is accepted."""
    given = [ref_chosen_logps is not None, ref_rejected_logps is not None]
    if given[0] != given[1]:
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if given[0] + (computed is not None) + bool(reference_free) != 1:
        raise ValueError(
            "give the reference exactly one way: ref_chosen_logps and ref_rejected_logps, or the reference's "
            "logits / hidden states (ref_logits / ref_hidden), or reference_free=True"
        )
    if reference_free:
        zeros = torch.zeros(B, dtype=torch.float64, device=device)
        return zeros, zeros
    if computed is not None:
        return None
    for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {checks.describe(value)}")
        checks.check_pair_vector(value, name, B, device)
    return ref_chosen_logps.detach(), ref_rejected_logps.detach()


def metrics(kernel_metrics: torch.Tensor, stats: SequenceStats | None) -> dict[str, torch.Tensor]:
    """The Triton loss kernel's reward metrics (`losses.REWARD_METRICS` order) and, with stats, TRL's stats metrics."""
    out = dict(zip(L.REWARD_METRICS, kernel_metrics.unbind(0)))
    if stats is not None:
        out.update({k: v.float() for k, v in R.stats_metrics(stats).items()})
    return out


def loss_from_sequences(
    seq: SequenceLogps,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    config: L.LossConfig,
    use_weighting: bool,
    return_stats: bool,
    backend: str,
    out_dtype: torch.dtype,
) -> DPOOutput:
    """The policy's sequence sums [2B] (chosen first, float64) and the reference's [B] → `DPOOutput` in `out_dtype`,
    with the token counts as lengths, the plain chosen sums for sft, WPO weights and the stats metrics. The
    log-ratios are formed in float64; the Triton kernel does the rest in fp32, the reference in float64."""
    B = seq.n_tokens.shape[0] // 2
    n = seq.n_tokens
    if backend == "triton" and out_dtype != torch.float64:
        pair_weights = None
        if use_weighting:
            w = R.wpo_weights(seq)
            pair_weights = w[:B] * w[B:]
        stats = seq.stats if return_stats else None
        loss, losses, rewards, kernel_metrics = C.kernel_loss(
            seq.logps[:B],
            seq.logps[B:],
            rc,
            rr,
            config,
            lengths=(n[:B], n[B:]),
            pair_weights=pair_weights,
            sft_sum=seq.raw_logps[:B],
            sft_count=n[:B],
        )
        out = DPOOutput(
            loss, losses, rewards[0], rewards[1], seq.logps[:B], seq.logps[B:], metrics(kernel_metrics, stats)
        )
    else:
        options = dict(use_weighting=use_weighting, return_stats=return_stats, **config.options())
        out = R.dpo_loss_from_sequences(seq, rc, rr, **options)
    return out.to(out_dtype).detached_details()
