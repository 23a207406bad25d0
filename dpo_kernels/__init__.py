"""dpo_kernels: fused kernels for Direct Preference Optimization with exactly TRL 1.16's math."""

from dpo_kernels import losses, reference
from dpo_kernels.api import (
    DPOLoss,
    dpo_loss,
    dpo_loss_from_hidden,
    dpo_loss_from_logits,
    linear_token_logps,
    sequence_logps,
    token_logps,
)
from dpo_kernels.reference import DPOOutput, SequenceLogps, SequenceStats, TokenStats

__version__ = "0.1.0"

__all__ = [
    "DPOLoss",
    "DPOOutput",
    "SequenceLogps",
    "SequenceStats",
    "TokenStats",
    "dpo_loss",
    "dpo_loss_from_hidden",
    "dpo_loss_from_logits",
    "linear_token_logps",
    "losses",
    "reference",
    "sequence_logps",
    "token_logps",
    "__version__",
]
