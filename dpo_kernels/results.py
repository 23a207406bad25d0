"""The public result types of dpo_kernels, and the order of the per-token statistics.

The kernels write the statistics as rows of one [4, N] tensor in the order of `TokenStats`' fields (`STATS`); every
other place reads that order from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(logits / T), shaped like the labels; 0 (False) at ignored positions, NaN
    (is_top1 False) where the log-prob is NaN (the NaN policy of `token_logps`).

    Only `entropy` carries a gradient (as in TRL).
    """

    entropy: torch.Tensor  # −Σ_v p_v log p_v
    mean_logit: torch.Tensor  # mean_v logits_v / T
    is_top1: torch.Tensor  # bool: the label is the first argmax
    log_sum_sq_probs: torch.Tensor  # log Σ_v p_v² (for WPO)


# The kernels' [4, N] stats rows, in this order.
STATS: tuple[str, ...] = TokenStats._fields


class SequenceStats(NamedTuple):
    """Per-sequence sums of the token statistics over scored tokens (is_top1 counted), with the token counts."""

    entropy: torch.Tensor
    mean_logit: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    n_tokens: torch.Tensor  # int64


class SequenceLogps(NamedTuple):
    """Per-sequence log-probs: `logps` with LD-DPO weights (the plain sum without them), `raw_logps` always the
    plain sum, `n_tokens` the scored-token counts (int64), `stats` the summed token statistics when given."""

    logps: torch.Tensor
    n_tokens: torch.Tensor
    raw_logps: torch.Tensor
    stats: SequenceStats | None = None


@dataclass
class DPOOutput:
    """What every DPO entry point returns.

    `losses` [K, B] holds each loss type's per-pair loss (WPO-weighted, before `loss_weights`; for aot the index
    is the sorted rank); `loss` = Σ_k w_k · mean(losses[k]). Rewards are β · (policy − reference) log-ratios,
    detached. `metrics` maps TRL's keys to 0-dim tensors.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    metrics: dict[str, torch.Tensor]

    def detached_details(self) -> DPOOutput:
        """The same output with only `loss` and the policy's `chosen_logps` / `rejected_logps` differentiable (the
        public functions' gradient rule, the same on every backend): `losses`, rewards and metrics detached."""
        return DPOOutput(
            loss=self.loss,
            losses=self.losses.detach(),
            chosen_rewards=self.chosen_rewards.detach(),
            rejected_rewards=self.rejected_rewards.detach(),
            chosen_logps=self.chosen_logps,
            rejected_logps=self.rejected_logps,
            metrics={key: value.detach() for key, value in self.metrics.items()},
        )

    def to(self, dtype: torch.dtype) -> DPOOutput:
        """Every floating-point field in `dtype` (differentiable casts; a no-op where the dtype already is)."""
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        return DPOOutput(
            loss=cast(self.loss),
            losses=cast(self.losses),
            chosen_rewards=cast(self.chosen_rewards),
            rejected_rewards=cast(self.rejected_rewards),
            chosen_logps=cast(self.chosen_logps),
            rejected_logps=cast(self.rejected_logps),
            metrics={key: cast(value) for key, value in self.metrics.items()},
        )
