"""Input checks shared by every backend: one place for every check of a call's tensors and scalar options.

They name the argument and, where a tensor's values are wrong, say which values are allowed. Checks of tensor *values*
read them on the host only where that costs no synchronisation (CPU tensors, outside torch.compile); elsewhere a bad
label gives NaN outputs (the kernels' NaN policy) and a bad `cu_seqlens` a device-side assertion, so that a CUDA call
never waits for the device before its first launch. The loss options are checked with the registry
(`losses.loss_config`).

A public function that calls others (`dpo_loss_from_logits` → `token_logps`, `sequence_logps`) checks the values once:
it runs the nested calls under `values_checked()`, where the host reads of the same labels and `cu_seqlens` are
skipped (shapes, dtypes and devices are still checked: they cost nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from dpo_kernels import losses as L


def check_ld_alpha(ld_alpha: float | None) -> float | None:
    """LD-DPO's α must lie in [0, 1] (TRL documents this but does not check it)."""
    if ld_alpha is None:
        return None
    ld_alpha = float(ld_alpha)
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    return ld_alpha


_VALUES_CHECKED = contextvars.ContextVar("dpo_kernels_values_checked", default=False)


def values_checked() -> contextlib.AbstractContextManager:
    """The rest of a public call whose tensors' values are checked: nested public calls skip reading them again.
    (Under torch.compile values are never read on the host: a no-op context there.)"""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _values_checked()


@contextlib.contextmanager
def _values_checked():
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


def _host_checks(t: torch.Tensor) -> bool:
    """True where reading `t`'s values costs no device synchronisation and no graph break, and no enclosing public
    call has read them already."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not _VALUES_CHECKED.get()


def check_logits_labels(logits, labels, ignore_index: int, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {describe(logits)}")
    integer = isinstance(labels, torch.Tensor) and not (labels.is_floating_point() or labels.is_complex())
    if not integer or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {describe(labels)}")
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
        raise TypeError(f"labels_or_mask must be a tensor of labels or a mask, got {describe(labels_or_mask)}")
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
            raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
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
        raise TypeError(f"{name} must be a tensor, got {describe(value)}")
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
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {describe(cu_seqlens)}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with S+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    if not torch.compiler.is_compiling() and _VALUES_CHECKED.get():
        return  # an enclosing public call checked these values
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


def describe(value) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of dtype {dtype}" if dtype is not None else type(value).__name__


def check_loss_inputs(
    config: L.LossConfig,
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
        needing = [name for name in config.loss_types if name in L.LENGTH_NORMALISED_LOSSES]
        raise ValueError(f"loss_type {needing} needs chosen_lengths and rejected_lengths (completion-token counts)")
    if not config.has_sft:
        return None
    count = chosen_lengths if chosen_token_count is None else chosen_token_count
    if count is None:
        raise ValueError("loss_type 'sft' needs chosen_token_count (or chosen_lengths)")
    return count


def check_layout(x: torch.Tensor, cu_seqlens, name: str, feature: str | None = None) -> int:
    """The one padded / packed layout check: padded [S, T(, feature)] rows, or packed [N(, feature)] tokens with
    `cu_seqlens` [S+1]. Returns S, the number of sequences."""
    dims = "" if feature is None else f", {feature}"
    extra = 0 if feature is None else 1
    if cu_seqlens is None:
        if x.ndim != 2 + extra:
            raise ValueError(
                f"padded {name} must be [S, T{dims}] (or packed [N{dims}] with cu_seqlens), got shape {tuple(x.shape)}"
            )
        return x.shape[0]
    if x.ndim != 1 + extra:
        raise ValueError(f"packed {name} (with cu_seqlens) must be [N{dims}], got shape {tuple(x.shape)}")
    check_cu_seqlens(cu_seqlens, x.shape[0], x.device)
    return cu_seqlens.numel() - 1


def check_sequences(token_logps, labels_or_mask, cu_seqlens, ignore_index: int, ld_alpha) -> float | None:
    """The inputs of `sequence_logps`, on every backend; returns the checked `ld_alpha`."""
    ld_alpha = check_ld_alpha(ld_alpha)
    if not isinstance(token_logps, torch.Tensor) or not token_logps.is_floating_point():
        raise TypeError(f"token_logps must be a floating-point tensor, got {describe(token_logps)}")
    check_labels_or_mask(labels_or_mask, ignore_index)
    if labels_or_mask.shape != token_logps.shape:
        raise ValueError(
            f"labels_or_mask shape {tuple(labels_or_mask.shape)} must equal token_logps shape "
            f"{tuple(token_logps.shape)}"
        )
    S = check_layout(token_logps, cu_seqlens, "token_logps")
    if ld_alpha is not None:
        check_even_rows(S)
    return ld_alpha
