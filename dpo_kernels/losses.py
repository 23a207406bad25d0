"""The loss-type registry: names, defaults, parameter checks and metric names, shared by every backend.

Names and defaults are TRL 1.16's (`DPOConfig`). Everything that can be wrong about a combination of options is
checked here, once, so that the reference, the Triton kernels and the CPU backend accept exactly the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


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


def check_ld_alpha(ld_alpha: float | None) -> float | None:
    """LD-DPO's α must lie in [0, 1] (TRL documents this but does not check it)."""
    if ld_alpha is None:
        return None
    ld_alpha = float(ld_alpha)
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    return ld_alpha


# Input checks shared by every backend. They name the argument and, where a tensor's values are wrong, say which
# values are allowed. Checks of tensor *values* read them on the host only where that costs no synchronisation
# (CPU tensors, outside torch.compile); elsewhere a bad label gives NaN outputs (the kernels' policy) and a bad
# `cu_seqlens` a device-side assertion, so a CUDA call never waits for the device before its first launch.


def _host_checks(t: torch.Tensor) -> bool:
    """True where reading `t`'s values costs no device synchronisation and no graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_logits_labels(logits, labels, ignore_index: int, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_describe(logits)}")
    integer = isinstance(labels, torch.Tensor) and not (labels.is_floating_point() or labels.is_complex())
    if not integer or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {_describe(labels)}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal {name} shape without its last dimension "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but {name} are on {logits.device}")
    if not _host_checks(labels):  # the kernels give NaN for a bad label instead
        return
    V = logits.shape[-1]
    bad = (labels < 0) | (labels >= V)
    bad &= labels != ignore_index
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {V}) or equal ignore_index={ignore_index}; "
            f"found {labels[bad].flatten()[:4].tolist()}"
        )


def check_labels_or_mask(labels_or_mask, ignore_index: int) -> None:
    """An integer tensor is read as labels; one of only 0s and 1s without any `ignore_index` is almost surely a 0/1
    mask (TRL's int64 `completion_mask`), which read as labels would score every position: refused where its values
    can be read for free (see `_host_checks`)."""
    if not isinstance(labels_or_mask, torch.Tensor) or labels_or_mask.is_complex():
        raise TypeError(f"labels_or_mask must be a tensor of labels or a mask, got {_describe(labels_or_mask)}")
    t = labels_or_mask
    if t.dtype == torch.bool or t.is_floating_point() or t.numel() == 0 or not _host_checks(t):
        return
    if ignore_index not in (0, 1) and bool(((t == 0) | (t == 1)).all()):
        raise ValueError(
            f"labels_or_mask is an integer tensor of only 0s and 1s without ignore_index={ignore_index}: it would be "
            "read as labels, scoring every position. Pass a mask as bool (e.g. completion_mask.bool()), or labels "
            "with ignore_index at the unscored positions"
        )


# The kernels scale by 2 / T in fp32: below this T that factor is not finite.
MIN_TEMPERATURE = 2.0 / torch.finfo(torch.float32).max


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature <= MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must exceed {MIN_TEMPERATURE:.3g} (2 / T must be finite in fp32), got {temperature}"
        )
    return temperature


def check_pair_logps(pc, pr, rc, rr) -> None:
    """The four per-sequence log-prob tensors: floating, 1-D, one shape, one device, at least one pair."""
    named = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D [B], got shape {tuple(t.shape)}")
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape [B], got {shapes}")
    devices = {name: str(t.device) for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"the four log-prob tensors must be on one device, got {devices}")
    if pc.shape[0] == 0:
        raise ValueError("expected at least one pair, got B = 0")


def check_pair_vector(value, name: str, B: int, device) -> None:
    """An optional per-pair ([B]) or per-sequence ([2B]) tensor argument."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {_describe(value)}")
    if value.shape != (B,):
        raise ValueError(f"{name} must have shape [{B}], got {tuple(value.shape)}")
    if value.device != torch.device(device):
        raise ValueError(f"{name} is on {value.device} but the log-probs are on {device}")


def check_even_rows(S: int, what: str = "sequences") -> int:
    """Chosen rows then rejected rows: S must be even; returns B = S / 2."""
    if S % 2 != 0 or S == 0:
        raise ValueError(
            f"expected an even, non-zero number of {what} (chosen rows first, then rejected rows), got {S}"
        )
    return S // 2


def check_cu_seqlens(cu_seqlens, N: int, device) -> None:
    """Packed layout: cu_seqlens [S+1] integer, 0 = cu[0] <= cu[1] <= ... <= cu[S] = N."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {_describe(cu_seqlens)}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with S+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == N) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    if not _host_checks(cu_seqlens):
        # no host read: the device raises (asynchronously) instead
        torch._assert_async(valid, f"cu_seqlens must start at 0, be non-decreasing and end at N = {N}")
        return
    if bool(valid):
        return
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if last != N:
        raise ValueError(f"cu_seqlens must end at the number of tokens N = {N}, got {last}")
    raise ValueError("cu_seqlens must be non-decreasing")


def _describe(value) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of dtype {dtype}" if dtype is not None else type(value).__name__


def check_loss_inputs(
    config: LossConfig,
    pc,
    pr,
    rc,
    rr,
    *,
    chosen_lengths=None,
    rejected_lengths=None,
    wpo_weights=None,
    chosen_token_logp_sum=None,
    chosen_token_count=None,
):
    """Checks the tensors of a `dpo_loss` call against its config; returns the sft token count to use
    (`chosen_token_count`, else `chosen_lengths`; None when no sft term needs it)."""
    check_pair_logps(pc, pr, rc, rr)
    B, device = pc.shape[0], pc.device
    for name, value, size in (
        ("chosen_lengths", chosen_lengths, B),
        ("rejected_lengths", rejected_lengths, B),
        ("wpo_weights", wpo_weights, 2 * B),
        ("chosen_token_logp_sum", chosen_token_logp_sum, B),
        ("chosen_token_count", chosen_token_count, B),
    ):
        if value is not None:
            check_pair_vector(value, name, size, device)
    if config.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        needing = [name for name in config.loss_types if name in LENGTH_NORMALISED_LOSSES]
        raise ValueError(f"loss_type {needing} needs chosen_lengths and rejected_lengths (completion-token counts)")
    if not config.has_sft:
        return None
    count = chosen_lengths if chosen_token_count is None else chosen_token_count
    if count is None:
        raise ValueError("loss_type 'sft' needs chosen_token_count (or chosen_lengths)")
    return count
