"""The loss-type registry: names, families, defaults, parameter checks and metric names, shared by every backend.

Names and defaults are TRL 1.16's (`DPOConfig`). Everything that can be wrong about a combination of loss options is
checked here (`loss_config`), once, so that the reference, the Triton kernels and the CPU backend accept exactly the
same options; the checks of a call's tensors are in `checks.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class LossType(NamedTuple):
    """One loss type of TRL 1.16: everything the backends need to know about it, in one record.

    family: which inputs its per-pair loss reads (the branch of the Triton kernel that computes it):
        "delta"  z = β·(f(xc) − f(xr)), the f-divergence scores of the log-ratios;
        "length" u = f(xc)/nc − f(xr)/nr, each score over its completion's token count;
        "ratio"  the log-ratios xc, xr themselves;
        "sorted" sorted batch-wide differences (the per-pair loss index is a rank, not a pair);
        "sft"    the batch's chosen-token NLL (every pair gets the same value).
    f_divergence: whether a non-default `f_divergence_type` applies to it (TRL refuses it with the others).
    """

    name: str
    family: str
    f_divergence: bool


# The 15 loss types of TRL 1.16, in the order of its documentation. A loss type's code is its index here; the
# Triton kernel branches on it.
REGISTRY: tuple[LossType, ...] = (
    LossType("sigmoid", "delta", f_divergence=True),
    LossType("hinge", "delta", f_divergence=True),
    LossType("ipo", "length", f_divergence=True),
    LossType("exo_pair", "delta", f_divergence=True),
    LossType("nca_pair", "ratio", f_divergence=False),
    LossType("robust", "delta", f_divergence=True),
    LossType("bco_pair", "ratio", f_divergence=False),
    LossType("sppo_hard", "ratio", f_divergence=False),
    LossType("aot", "sorted", f_divergence=False),
    LossType("aot_unpaired", "sorted", f_divergence=False),
    LossType("apo_zero", "ratio", f_divergence=False),
    LossType("apo_down", "ratio", f_divergence=False),
    LossType("discopop", "delta", f_divergence=True),
    LossType("sft", "sft", f_divergence=True),
    LossType("sigmoid_norm", "length", f_divergence=True),
)
LOSS_TYPES: tuple[str, ...] = tuple(t.name for t in REGISTRY)


def family(name: str) -> frozenset[str]:
    """The names of the loss types of one family (see `LossType`)."""
    if name not in {t.family for t in REGISTRY}:
        raise KeyError(f"no loss family {name!r}")
    return frozenset(t.name for t in REGISTRY if t.family == name)


# The most terms one loss mix may have (every backend: the Triton kernel packs the codes into one 64-bit constexpr).
MAX_LOSS_TERMS = 15

F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Derived sets, for the checks and the backends.
F_DIVERGENCE_LOSSES = frozenset(t.name for t in REGISTRY if t.f_divergence)
LENGTH_NORMALISED_LOSSES = family("length")
SORTED_LOSSES = family("sorted")

# Upper clamp of (a − 1)·x inside the alpha divergence, as TRL uses for fp32/bf16 (we use it for fp64 too).
ALPHA_DIVERGENCE_CLAMP = 80.0
# |a − 1| below this makes the alpha divergence the reverse KL (TRL's rule).
ALPHA_DIVERGENCE_EPS = 1e-6

# TRL's metric keys, in the order DPOTrainer logs them.
REWARD_METRICS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
STATS_METRICS: tuple[str, ...] = (
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
)


@dataclass(frozen=True)
class LossConfig:
    """A validated set of loss options; build it with `loss_config`, never directly."""

    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    discopop_tau: float
    f_divergence_type: str
    f_alpha_divergence_coef: float

    @property
    def loss_codes(self) -> tuple[int, ...]:
        return tuple(LOSS_TYPES.index(name) for name in self.loss_types)

    @property
    def f_divergence_code(self) -> int:
        """Index into F_DIVERGENCES; an alpha divergence with a ≈ 1 is the reverse KL (code 0)."""
        if (
            self.f_divergence_type == "alpha_divergence"
            and abs(self.f_alpha_divergence_coef - 1.0) < ALPHA_DIVERGENCE_EPS
        ):
            return 0
        return F_DIVERGENCES.index(self.f_divergence_type)

    @property
    def needs_lengths(self) -> bool:
        return any(name in LENGTH_NORMALISED_LOSSES for name in self.loss_types)

    @property
    def needs_sort(self) -> bool:
        return any(name in SORTED_LOSSES for name in self.loss_types)

    @property
    def has_sft(self) -> bool:
        return "sft" in self.loss_types

    def options(self) -> dict:
        """The keyword arguments of `loss_config` (and of `dpo_loss`) that give this config back."""
        return dict(
            loss_type=list(self.loss_types),
            loss_weights=list(self.loss_weights),
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.discopop_tau,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
        )


# TRL's DPOConfig names of the loss options: what `loss_config` takes.
LOSS_OPTIONS: tuple[str, ...] = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "discopop_tau",
    "f_divergence_type",
    "f_alpha_divergence_coef",
)


def loss_options(config) -> dict:
    """The loss options of anything that carries them under TRL's names (a TRL `DPOConfig`, the training script's
    knobs), as keyword arguments of `loss_config` / `dpo_loss`; a single loss_type name becomes a list."""
    options = {name: getattr(config, name) for name in LOSS_OPTIONS}
    loss_type = options["loss_type"]
    options["loss_type"] = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    return options


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    names = tuple(value)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"loss_type must be a name or a non-empty list of names, got {value!r}")
    return names


def loss_config(
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
) -> LossConfig:
    """Checks a combination of loss options and returns it as a `LossConfig`.

    Raises `ValueError` naming the offending option. Stricter than TRL 1.16 where TRL accepts options that give
    inf/NaN or a division by zero (`beta <= 0`, `discopop_tau <= 0`, `robust` with ε ∉ [0, 0.5), `exo_pair` with
    ε ≥ 1); as strict as TRL everywhere else (unknown names, `loss_weights` length, `exo_pair` with ε = 0,
    non-default f-divergence with a loss that ignores it, WPO with `aot`/`aot_unpaired`).
    """
    names = _names(loss_type)
    if len(names) > MAX_LOSS_TERMS:
        raise ValueError(f"a loss mix has at most {MAX_LOSS_TERMS} terms, got {len(names)}")
    for name in names:
        if name not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {name!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")
    if loss_weights is None:
        weights = (1.0,) * len(names)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(names):
            raise ValueError(
                f"loss_weights has {len(weights)} entries but loss_type has {len(names)} ({', '.join(names)})"
            )
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"loss_weights must be finite, got {list(weights)}")
    beta, eps, tau = float(beta), float(label_smoothing), float(discopop_tau)
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")
    if "exo_pair" in names and not 0.0 < eps < 1.0:
        raise ValueError(f"loss_type 'exo_pair' needs label_smoothing in (0, 1), got {eps}")
    if "robust" in names and not 0.0 <= eps < 0.5:
        raise ValueError(f"loss_type 'robust' needs label_smoothing in [0, 0.5), got {eps}")
    if "discopop" in names and not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"discopop_tau must be a finite number > 0, got {tau}")
    if f_divergence_type != "reverse_kl":
        ignoring = [name for name in names if name not in F_DIVERGENCE_LOSSES]
        if ignoring:
            raise ValueError(
                f"f_divergence_type {f_divergence_type!r} is not supported with loss_type "
                f"{', '.join(repr(n) for n in ignoring)}; it applies to: {', '.join(sorted(F_DIVERGENCE_LOSSES))}"
            )
    if use_weighting and any(name in SORTED_LOSSES for name in names):
        raise ValueError("WPO weights (use_weighting / wpo_weights) are not supported with 'aot' / 'aot_unpaired'")
    return LossConfig(
        loss_types=names,
        loss_weights=weights,
        beta=beta,
        label_smoothing=eps,
        discopop_tau=tau,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=float(f_alpha_divergence_coef),
    )
