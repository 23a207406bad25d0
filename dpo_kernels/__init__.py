"""dpo_kernels: fused kernels for Direct Preference Optimization with exactly TRL 1.16's math.

The public names are loaded on first use, so that `import dpo_kernels` (and `python -m dpo_kernels.train --help`)
does not import torch and triton until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(
        (
            "DPOLoss",
            "dpo_loss",
            "dpo_loss_from_hidden",
            "dpo_loss_from_logits",
            "linear_token_logps",
            "sequence_logps",
            "token_logps",
        ),
        "dpo_kernels.api",
    ),
    **dict.fromkeys(("DPOOutput", "SequenceLogps", "SequenceStats", "TokenStats"), "dpo_kernels.results"),
}
_MODULES = ("losses", "reference")

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

if TYPE_CHECKING:  # what type checkers and IDEs see
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
    from dpo_kernels.results import DPOOutput, SequenceLogps, SequenceStats, TokenStats


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"dpo_kernels.{name}")
    if name in _EXPORTS:
        value = globals()[name] = getattr(importlib.import_module(_EXPORTS[name]), name)
        return value
    raise AttributeError(f"module 'dpo_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
