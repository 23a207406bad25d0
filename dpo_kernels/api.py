"""The public functions: validate once, pick a backend once (`dispatch.pick`), call the kernels as torch custom ops
(so that torch.compile keeps them in its graph) with their autograd."""

from __future__ import annotations

import math
from types import ModuleType

import torch

from dpo_kernels import checks, chunked, dispatch
from dpo_kernels import losses as L
from dpo_kernels import reference as R
from dpo_kernels.results import STATS, DPOOutput, SequenceLogps, SequenceStats, TokenStats

BACKENDS = dispatch.BACKENDS


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] → the launchers' [R, T, V] or [N, V] with unit vocab stride, without a copy for [R, T, V] logits of
    any batch and row strides (logits[:, :-1] included); more leading dims are merged (a view when they can be)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.ndim in (2, 3):
        return logits
    if logits.ndim > 3:
        return logits.reshape(-1, *logits.shape[-2:])
    return logits.reshape(-1, logits.shape[-1])


def _overlapping(t: torch.Tensor) -> bool:
    """True when two elements of `t` share memory (e.g. rows of `x.expand(N, V)`): dims sorted by stride, each
    stride must step over everything the smaller strides span."""
    span = 0
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _check_inplace(logits: torch.Tensor, backend: str) -> None:
    """inplace_grad=True writes the gradient over the logits: refused where that would corrupt something."""
    if backend == "reference" or logits.dtype == torch.float64:
        raise ValueError("inplace_grad=True needs the triton or cpu backend (and a non-float64 dtype)")
    if not logits.requires_grad:
        raise ValueError("inplace_grad=True needs logits that require grad")
    if logits.is_leaf or (logits._base is not None and logits._base.is_leaf):
        raise ValueError(
            "inplace_grad=True would overwrite a leaf tensor (or a view of one) with its own gradient (its .grad "
            "would alias its storage): pass the output of a layer, or inplace_grad=False"
        )
    if _overlapping(logits):
        raise ValueError(
            "inplace_grad=True needs logits whose elements do not share memory (e.g. not x.expand(...)): the "
            "gradient rows would overwrite each other"
        )


_ENTROPY = STATS.index("entropy")  # the one differentiable stats row


def _token_stats(stats: torch.Tensor, shape: torch.Size) -> TokenStats:
    """The kernels' [4, N] stats rows as `TokenStats` shaped like the labels; only the entropy keeps its graph."""
    rows = {name: (row if name == "entropy" else row.detach()).view(shape) for name, row in zip(STATS, stats)}
    return TokenStats(**{**rows, "is_top1": rows["is_top1"] > 0.5})


# ----------------------------------------------------------------------------------------------------------------
# token_logps


# The forward and backward are torch custom ops, so that torch.compile(fullgraph=True) keeps them in its graph.
# The in-place backward is an op of its own that declares the mutation of the logits: autograd then refuses a
# later reader of the overwritten logits instead of letting it read the gradient.


@torch.library.custom_op("dpo_kernels::token_logps_fwd", mutates_args=())
def _token_logps_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    backend: str,
    ignore_index: int,
    temperature: float,
    return_stats: bool,
    inplace_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logps, lse, stats = dispatch.token_kernels(backend).logprobs_fwd(
        logits, labels, ignore_index=ignore_index, temperature=temperature, return_stats=return_stats
    )
    return logps, lse, logps.new_empty(0, logps.shape[0]) if stats is None else stats


@_token_logps_fwd.register_fake
def _(logits, labels, backend, ignore_index, temperature, return_stats, inplace_grad):
    N = labels.numel()
    f32 = lambda *shape: logits.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return f32(N), f32(N), f32(4 if return_stats else 0, N)


@torch.library.custom_op("dpo_kernels::token_logps_bwd", mutates_args=())
def _token_logps_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    backend: str,
    ignore_index: int,
    temperature: float,
) -> torch.Tensor:
    return dispatch.token_kernels(backend).logprobs_bwd(
        logits,
        labels,
        lse,
        grad_logps,
        ignore_index=ignore_index,
        temperature=temperature,
        grad_entropy=grad_entropy,
        entropy=entropy,
    )


@_token_logps_bwd.register_fake
def _(logits, labels, lse, grad_logps, grad_entropy, entropy, backend, ignore_index, temperature):
    return logits.new_empty(logits.shape)  # contiguous, as the launchers return it


@torch.library.custom_op("dpo_kernels::token_logps_bwd_", mutates_args=("logits",))
def _token_logps_bwd_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    backend: str,
    ignore_index: int,
    temperature: float,
) -> None:
    dispatch.token_kernels(backend).logprobs_bwd(
        logits,
        labels,
        lse,
        grad_logps,
        ignore_index=ignore_index,
        temperature=temperature,
        grad_entropy=grad_entropy,
        entropy=entropy,
        inplace=True,
    )


@_token_logps_bwd_inplace.register_fake
def _(logits, labels, lse, grad_logps, grad_entropy, entropy, backend, ignore_index, temperature):
    return None


def _token_logps_setup(ctx, inputs, output):
    logits, labels, backend, ignore_index, temperature, _, inplace_grad = inputs
    _, lse, stats = output
    ctx.save_for_backward(logits, labels, lse, stats)
    ctx.options = (backend, ignore_index, temperature)
    ctx.inplace_grad = inplace_grad


def _token_logps_backward(ctx, grad_logps, _grad_lse, grad_stats):
    logits, labels, lse, stats = ctx.saved_tensors
    grad_entropy = grad_stats[_ENTROPY] if grad_stats is not None and stats.shape[0] > 0 else None
    args = (
        logits,
        labels,
        lse,
        None if grad_logps is None else grad_logps.float().contiguous(),
        None if grad_entropy is None else grad_entropy.float().contiguous(),
        None if grad_entropy is None else stats[_ENTROPY],
    )
    if ctx.inplace_grad:
        _token_logps_bwd_inplace(*args, *ctx.options)
        dlogits = logits
    else:
        dlogits = _token_logps_bwd(*args, *ctx.options)
    return dlogits, None, None, None, None, None, None


_token_logps_fwd.register_autograd(_token_logps_backward, setup_context=_token_logps_setup)


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
    inplace_grad: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Log-probability of each label under softmax(logits / temperature), in fp32.

    Args:
        logits: [..., V] float16 / bfloat16 / float32 (float64 runs on the reference backend). [N, V] and
            [B, T, V] with any batch and row strides (e.g. `logits[:, :-1]`) are read in place; more leading dims
            are merged (a copy where they cannot be viewed), and a vocabulary stride other than 1 costs a copy.
        labels: [...] integer, in [0, V) or `ignore_index`; ignored positions get exactly 0 and no gradient.
        temperature: the logits are divided by it (TRL's DPO uses 1.0).
        return_stats: also return `TokenStats` (entropy, mean logit, is_top1 with TRL's first-argmax tie rule,
            log Σ p²); only the entropy carries a gradient.
        inplace_grad: the backward writes the logits' gradient into the logits' own storage, so the extra memory
            is O(N). The caller promises not to read the logits after the backward.
        backend: "triton", "cpu" or "reference" to override the automatic choice.

    Returns:
        fp32 (float64 for float64 logits) tensor shaped like `labels`, and the stats when asked.

    Example:
        >>> lp = dk.token_logps(logits[:, :-1], input_ids[:, 1:].masked_fill(~completion_mask[:, 1:], -100))
    """
    checks.check_logits_labels(logits, labels, ignore_index)
    temperature = checks.check_temperature(temperature)
    chosen = dispatch.pick(logits, backend)
    if inplace_grad:
        _check_inplace(logits, chosen)
    if chosen == "reference":
        return R.token_logps(
            logits, labels, ignore_index=ignore_index, temperature=temperature, return_stats=return_stats
        )
    rows, flat_labels = _rows(logits), labels.reshape(-1).long()
    logps, _, stats = _token_logps_fwd(rows, flat_labels, chosen, ignore_index, temperature, return_stats, inplace_grad)
    logps = logps.view(labels.shape)
    if not return_stats:
        return logps
    return logps, _token_stats(stats, labels.shape)


# ----------------------------------------------------------------------------------------------------------------
# sequence_logps


def _seq_starts(shape: torch.Size, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Start offsets [S+1] of every sequence in the flattened tokens (padded rows or packed cu_seqlens)."""
    if cu_seqlens is not None:
        return cu_seqlens.to(torch.int64)
    S, T = shape
    return torch.arange(S + 1, device=device, dtype=torch.int64) * T


# The Triton segment sums are torch custom ops as well (torch.compile keeps them in its graph). Sums are float64.


@torch.library.custom_op("dpo_kernels::segments_fwd", mutates_args=())
def _segments_fwd(
    values: torch.Tensor, labels: torch.Tensor, seq_starts: torch.Tensor, ignore_index: int, ld_alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from dpo_kernels.ops import segments

    return segments.segments_fwd(values, labels, seq_starts, ignore_index=ignore_index, ld_alpha=ld_alpha)


@_segments_fwd.register_fake
def _(values, labels, seq_starts, ignore_index, ld_alpha):
    S = seq_starts.shape[0] - 1
    return values.new_empty(values.shape[0] + 1, S, dtype=torch.float64), values.new_empty(S, dtype=torch.int64)


@torch.library.custom_op("dpo_kernels::segments_bwd", mutates_args=())
def _segments_bwd(
    grad_weighted: torch.Tensor,
    grad_plain: torch.Tensor,
    labels: torch.Tensor,
    seq_starts: torch.Tensor,
    n_tokens: torch.Tensor,
    ignore_index: int,
    ld_alpha: float | None,
) -> torch.Tensor:
    from dpo_kernels.ops import segments

    return segments.segments_bwd(
        grad_weighted, grad_plain, labels, seq_starts, n_tokens, ignore_index=ignore_index, ld_alpha=ld_alpha
    )


@_segments_bwd.register_fake
def _(grad_weighted, grad_plain, labels, seq_starts, n_tokens, ignore_index, ld_alpha):
    return labels.new_empty(labels.shape, dtype=torch.float32)


def _spread(grad_sums, labels, seq_starts, n_tokens, ignore_index, ld_alpha) -> torch.Tensor:
    """∂/∂(token values) [C, N] of the segment sums [C+1, S] (row 0 LD-weighted, row 1 plain, rows 2.. stats)."""
    grad_sums = grad_sums.float()
    rows = [_segments_bwd(grad_sums[0], grad_sums[1], labels, seq_starts, n_tokens, ignore_index, ld_alpha)]
    if grad_sums.shape[0] > 2:  # stats sums: each scored token's value enters its sequence's plain sum once
        seg = torch.repeat_interleave(torch.diff(seq_starts), output_size=labels.shape[0])
        rows.append(grad_sums[2:, seg] * (labels != ignore_index))
    return torch.cat([rows[0][None], *rows[1:]])


def _segments_setup(ctx, inputs, output):
    _, labels, seq_starts, ignore_index, ld_alpha = inputs
    ctx.save_for_backward(labels, seq_starts, output[1])
    ctx.options = (ignore_index, ld_alpha)


def _segments_backward(ctx, grad_sums, _grad_n):
    labels, seq_starts, n_tokens = ctx.saved_tensors
    return _spread(grad_sums, labels, seq_starts, n_tokens, *ctx.options), None, None, None, None


_segments_fwd.register_autograd(_segments_backward, setup_context=_segments_setup)


def sequence_logps(
    token_logps: torch.Tensor,
    labels_or_mask: torch.Tensor,
    *,
    ld_alpha: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    token_stats: TokenStats | None = None,
    ignore_index: int = -100,
    backend: str | None = None,
) -> SequenceLogps:
    """Per-sequence sums of per-token log-probs over the scored tokens, with token counts and LD-DPO.

    Args:
        token_logps: padded [S, T] or packed [N] (with `cu_seqlens`) per-token log-probs (fp32).
        labels_or_mask: labels shaped like `token_logps` (an integer tensor: scored where ≠ `ignore_index`), or a
            bool mask (True = scored). An integer 0/1 tensor such as TRL's `completion_mask` is labels, not a mask:
            pass `completion_mask.bool()` (on CPU tensors such a tensor is refused with that advice).
        ld_alpha: LD-DPO's α in [0, 1]: rows s and s + S/2 are a pair (chosen rows first); tokens past the shorter
            completion's length weigh α.
        cu_seqlens: [S+1] int32/int64 start offsets of packed sequences (chosen sequences first).
        token_stats: per-token `TokenStats` to sum per sequence as well (for WPO and TRL's metrics).

    Returns:
        `SequenceLogps(logps, n_tokens, raw_logps, stats)`, all [S]; the sums are float64 (a margin between sums
        of thousands of nats needs their precision), differentiable with respect to `token_logps`. Unscored
        positions never reach a sum, whatever their value (NaN and inf included).
    """
    if dispatch.pick(token_logps, backend) != "triton":
        return R.sequence_logps(
            token_logps,
            labels_or_mask,
            ld_alpha=ld_alpha,
            cu_seqlens=cu_seqlens,
            token_stats=token_stats,
            ignore_index=ignore_index,
        )
    ld_alpha = checks.check_sequences(token_logps, labels_or_mask, cu_seqlens, ignore_index, ld_alpha)
    seq_starts = _seq_starts(token_logps.shape, cu_seqlens, token_logps.device)
    # the kernel reads labels: scored → 0, unscored → −1 (its ignore_index), whatever the caller's ignore_index
    mask = R.scored_mask(labels_or_mask, ignore_index).reshape(-1)
    labels = torch.where(mask, 0, -1).long()
    rows = [token_logps.reshape(-1).float()]
    if token_stats is not None:
        rows += [t.reshape(-1).float() for t in token_stats]
    sums, n_tokens = _segments_fwd(torch.stack(rows), labels, seq_starts, -1, ld_alpha)
    stats = None
    if token_stats is not None:
        stats = SequenceStats(*sums[2:], n_tokens=n_tokens)
    return SequenceLogps(logps=sums[0], n_tokens=n_tokens, raw_logps=sums[1], stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss


def _config_args(config: L.LossConfig) -> tuple:
    """A `LossConfig` as the plain arguments a custom op takes (rebuilt by `_config`)."""
    return (
        list(config.loss_codes),
        list(config.loss_weights),
        config.beta,
        config.label_smoothing,
        config.discopop_tau,
        config.f_divergence_type,
        config.f_alpha_divergence_coef,
    )


def _config(loss_codes, loss_weights, beta, label_smoothing, discopop_tau, f_div, f_alpha) -> L.LossConfig:
    # already validated by loss_config on the way in
    names = tuple(L.LOSS_TYPES[code] for code in loss_codes)
    return L.LossConfig(names, tuple(loss_weights), beta, label_smoothing, discopop_tau, f_div, f_alpha)


def _metrics(kernel_metrics: torch.Tensor, stats: SequenceStats | None) -> dict[str, torch.Tensor]:
    metrics = dict(zip(L.REWARD_METRICS, kernel_metrics.unbind(0)))
    if stats is not None:
        metrics.update({k: v.float() for k, v in R.stats_metrics(stats).items()})
    return metrics


@torch.library.custom_op("dpo_kernels::dpo_fwd", mutates_args=())
def _dpo_fwd(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    sft_sum: torch.Tensor,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    pair_weights: torch.Tensor | None,
    sft_count: torch.Tensor | None,
    loss_codes: list[int],
    loss_weights: list[float],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from dpo_kernels.ops import dpo

    config = _config(
        loss_codes, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type, f_alpha_divergence_coef
    )
    out = dpo.dpo_fwd(
        pc,
        pr,
        rc,
        rr,
        config=config,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_weights=pair_weights,
        sft_sum=sft_sum,
        sft_count=sft_count,
    )
    return out.loss, out.losses, out.grads, out.rewards, out.metrics


@_dpo_fwd.register_fake
def _(pc, pr, rc, rr, sft_sum, chosen_lengths, rejected_lengths, pair_weights, sft_count, loss_codes, *_):
    B = pc.shape[0]
    f32 = lambda *shape: pc.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return f32(), f32(len(loss_codes), B), f32(5, B), f32(2, B), f32(len(L.REWARD_METRICS))


def _dpo_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.needs = tuple(t is not None and t.requires_grad for t in inputs[:5])


def _dpo_backward(ctx, grad_loss, *_):
    (grads,) = ctx.saved_tensors
    g = grads * grad_loss
    return (*(g[i] if ctx.needs[i] else None for i in range(5)), *(None,) * 11)


_dpo_fwd.register_autograd(_dpo_backward, setup_context=_dpo_setup)


def _kernel_loss(
    pc, pr, rc, rr, config: L.LossConfig, *, lengths, pair_weights, sft_sum, sft_count
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton loss kernel: (loss, losses, rewards [2, B], metrics), fp32; float64 log-probs are read as such."""
    f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    nc, nr = (None, None) if lengths is None else (f32(lengths[0]), f32(lengths[1]))
    loss, losses, _, rewards, metrics = _dpo_fwd(
        pc, pr, rc, rr, sft_sum, nc, nr, f32(pair_weights), f32(sft_count), *_config_args(config)
    )
    return loss, losses, rewards, metrics


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
    backend: str | None = None,
) -> DPOOutput:
    """TRL 1.16's DPO loss (any of the 15 loss types, or a weighted mix of at most 15 terms) on per-sequence
    log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed log-probs
            (floating point).
        loss_type: a name of `losses.LOSS_TYPES` or a list of them; `loss_weights` one weight each (default 1).
        beta, label_smoothing, discopop_tau, f_divergence_type, f_alpha_divergence_coef: as in TRL's DPOConfig.
        chosen_lengths, rejected_lengths: [B] completion-token counts (needed by ipo and sigmoid_norm).
        wpo_weights: [2B] WPO weights per sequence (chosen first), e.g. `reference.wpo_weights(seq)`.
        chosen_token_logp_sum, chosen_token_count: [B] for `sft` (default: the chosen log-probs and lengths).
        sequence_stats: per-sequence stats sums [2B] for TRL's logits/*, entropy and mean_token_accuracy metrics.

    Returns:
        `DPOOutput` in the promoted dtype of the four log-prob tensors and fp32 (when one is float64 every backend
        computes in float64); `loss` is differentiable with respect to all four and the sft sum; `losses`, the
        rewards and the metrics are detached (on every backend).

    Example:
        >>> out = dk.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
        >>> out.loss.backward(); out.metrics["rewards/accuracies"]
    """
    options = dict(
        loss_type=loss_type,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )
    extra = dict(
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        wpo_weights=wpo_weights,
        chosen_token_logp_sum=chosen_token_logp_sum,
        chosen_token_count=chosen_token_count,
    )
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    wide = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (pc, pr, rc, rr))
    if wide or dispatch.pick(pc, backend) != "triton":  # float64 anywhere: the float64 math
        return R.dpo_loss(pc, pr, rc, rr, **options, **extra, sequence_stats=sequence_stats).detached_details()
    config = L.loss_config(**options, use_weighting=wpo_weights is not None)
    sft_count = checks.check_loss_inputs(config, pc, pr, rc, rr, **extra)
    B = pc.shape[0]
    lengths = None if chosen_lengths is None or rejected_lengths is None else (chosen_lengths, rejected_lengths)
    # Without a separate sft sum the chosen log-probs are it: autograd adds both gradients into pc.
    sft_sum = pc if chosen_token_logp_sum is None else chosen_token_logp_sum
    loss, losses, rewards, metrics = _kernel_loss(
        pc.float(),
        pr.float(),
        rc.float(),
        rr.float(),
        config,
        lengths=lengths,
        pair_weights=None if wpo_weights is None else wpo_weights[:B] * wpo_weights[B:],
        sft_sum=sft_sum.float(),
        sft_count=sft_count,
    )
    return DPOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=rewards[0],
        rejected_rewards=rewards[1],
        chosen_logps=pc,
        rejected_logps=pr,
        metrics=_metrics(metrics, sequence_stats),
    ).detached_details()


# ----------------------------------------------------------------------------------------------------------------
# The per-sequence end of the from-logits and from-hidden paths


def _resolve_reference(ref_chosen_logps, ref_rejected_logps, ref_logits, reference_free, B: int, device, compute):
    """The reference's [B] chosen and rejected log-probs, without gradient (TRL detaches the reference): the
    precomputed ones (floating point, kept in their precision), `compute()` run under no_grad for `ref_logits` /
    `ref_hidden`, or zeros for `reference_free=True`."""
    given = [ref_chosen_logps is not None, ref_rejected_logps is not None]
    if given[0] != given[1]:
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if given[0] + (ref_logits is not None) + bool(reference_free) != 1:
        raise ValueError(
            "give the reference exactly one way: ref_chosen_logps and ref_rejected_logps, or ref_logits, "
            "or reference_free=True"
        )
    if reference_free:
        zeros = torch.zeros(B, dtype=torch.float64, device=device)
        return zeros, zeros
    if ref_logits is not None:
        with torch.no_grad():
            ref = compute()
        return ref[:B], ref[B:]
    for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {checks._describe(value)}")
        checks.check_pair_vector(value, name, B, device)
    return ref_chosen_logps.detach(), ref_rejected_logps.detach()


def _loss_from_sequences(
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
        loss, losses, rewards, metrics = _kernel_loss(
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
        out = DPOOutput(loss, losses, rewards[0], rewards[1], seq.logps[:B], seq.logps[B:], _metrics(metrics, stats))
    else:
        options = dict(use_weighting=use_weighting, return_stats=return_stats, **config.options())
        out = R.dpo_loss_from_sequences(seq, rc, rr, **options)
    return out.to(out_dtype).detached_details()


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    """The outputs' dtype for logits / hidden states of t's dtype: fp32, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss_from_logits


# The fused Triton path is one custom op: logits → token log-probs → sequence sums → loss, with the per-token
# gradient of the (scalar) loss computed in the forward; the backward is one pass over the logits.


@torch.library.custom_op("dpo_kernels::dpo_from_logits_fwd", mutates_args=())
def _dpo_from_logits_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    seq_starts: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    ignore_index: int,
    temperature: float,
    ld_alpha: float | None,
    use_weighting: bool,
    with_stats: bool,
    inplace_grad: bool,
    loss_codes: list[int],
    loss_weights: list[float],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    from dpo_kernels.ops import dpo, logprobs, segments

    config = _config(
        loss_codes, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type, f_alpha_divergence_coef
    )
    logps, lse, stats = logprobs.logprobs_fwd(
        logits, labels, ignore_index=ignore_index, temperature=temperature, return_stats=with_stats
    )
    values = logps[None] if stats is None else torch.cat([logps[None], stats])
    sums, n_tokens = segments.segments_fwd(values, labels, seq_starts, ignore_index=ignore_index, ld_alpha=ld_alpha)
    B = n_tokens.shape[0] // 2
    n = n_tokens.float()
    pair_weights = None
    if use_weighting:
        seq = SequenceLogps(sums[0], n_tokens, sums[1], SequenceStats(*sums[2:], n_tokens=n_tokens))
        w = R.wpo_weights(seq)
        pair_weights = (w[:B] * w[B:]).float()
    out = dpo.dpo_fwd(
        sums[0, :B],
        sums[0, B:],
        rc,
        rr,
        config=config,
        chosen_lengths=n[:B],
        rejected_lengths=n[B:],
        pair_weights=pair_weights,
        sft_sum=sums[1, :B],
        sft_count=n[:B],
    )
    grad_tokens = segments.segments_bwd(
        torch.cat([out.grads[0], out.grads[1]]),
        torch.cat([out.grads[4], torch.zeros_like(out.grads[4])]),
        labels,
        seq_starts,
        n_tokens,
        ignore_index=ignore_index,
        ld_alpha=ld_alpha,
    )
    return out.loss, out.losses, out.rewards, out.metrics, sums, n_tokens, lse, grad_tokens


@_dpo_from_logits_fwd.register_fake
def _(logits, labels, seq_starts, rc, rr, ignore_index, temperature, ld_alpha, use_weighting, with_stats, _inplace,
      loss_codes, *_):  # fmt: skip
    N, S = labels.numel(), seq_starts.shape[0] - 1
    f32 = lambda *shape: logits.new_empty(shape, dtype=torch.float32)  # noqa: E731
    sums = logits.new_empty(6 if with_stats else 2, S, dtype=torch.float64)
    n_tokens = logits.new_empty(S, dtype=torch.int64)
    return (
        f32(),
        f32(len(loss_codes), S // 2),
        f32(2, S // 2),
        f32(len(L.REWARD_METRICS)),
        sums,
        n_tokens,
        f32(N),
        f32(N),
    )


def _dpo_from_logits_setup(ctx, inputs, output):
    logits, labels, seq_starts, _, _, ignore_index, temperature, ld_alpha, _, _, inplace_grad = inputs[:11]
    ctx.save_for_backward(logits, labels, seq_starts, output[5], output[6], output[7])
    ctx.options = (ignore_index, temperature, ld_alpha, inplace_grad)


def _dpo_from_logits_backward(ctx, grad_loss, _losses, _rewards, _metrics, grad_sums, _n, _lse, _grad_tokens):
    logits, labels, seq_starts, n_tokens, lse, grad_tokens = ctx.saved_tensors
    ignore_index, temperature, ld_alpha, inplace_grad = ctx.options
    g = grad_tokens * grad_loss
    if grad_sums is not None:  # a term on out.chosen_logps / rejected_logps (e.g. an RPO-style NLL)
        g = g + _spread(grad_sums[:2], labels, seq_starts, n_tokens, ignore_index, ld_alpha)[0]
    args = (logits, labels, lse, g.contiguous(), None, None, "triton", ignore_index, temperature)
    if inplace_grad:
        _token_logps_bwd_inplace(*args)
        dlogits = logits
    else:
        dlogits = _token_logps_bwd(*args)
    return (dlogits, *(None,) * 17)


_dpo_from_logits_fwd.register_autograd(_dpo_from_logits_backward, setup_context=_dpo_from_logits_setup)


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
    inplace_grad: bool = False,
    backend: str | None = None,
    **loss_options,
) -> DPOOutput:
    """TRL 1.16's DPO loss straight from the policy's logits, in one autograd node.

    Args:
        logits: padded [2B, T, V] (chosen rows first, then rejected rows) or packed [N, V] with `cu_seqlens`.
        labels: [2B, T] or [N], already shifted (labels[..., t] is the token that logits[..., t] predicts),
            `ignore_index` outside the completions.
        ref_chosen_logps, ref_rejected_logps: [B] precomputed reference log-probs (floating point; float64 ones
            are used unrounded); or `ref_logits` shaped like `logits`; or `reference_free=True` (both zero).
            Exactly one of the three. The reference never receives a gradient (as in TRL).
        cu_seqlens: [2B+1] int32/int64 start offsets of the packed sequences (chosen sequences first).
        ld_alpha: LD-DPO's α in [0, 1]; applied to the reference log-probs computed from `ref_logits` too.
        use_weighting: WPO weights from the policy's own token statistics.
        return_stats: add TRL's logits/chosen, logits/rejected, entropy and mean_token_accuracy metrics.
        inplace_grad: write the logits' gradient into the logits' storage (see `token_logps`).
        **loss_options: loss_type, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef (see `dpo_loss`). ipo / sigmoid_norm use the scored-token counts as lengths.

    Returns:
        `DPOOutput` in fp32 (float64 for float64 logits). The per-sequence sums are accumulated and the log-ratios
        formed in float64. `loss` and the policy's `chosen_logps` / `rejected_logps` carry gradients to the logits
        (a term such as an NLL on `chosen_logps` trains), on every backend.

    Example:
        >>> out = dk.dpo_loss_from_logits(logits[:, :-1], labels[:, 1:], ref_chosen, ref_rejected, beta=0.1)
        >>> out.loss.backward()
    """
    checks.check_logits_labels(logits, labels, ignore_index)
    temperature = checks.check_temperature(temperature)
    ld_alpha = checks.check_ld_alpha(ld_alpha)
    config = L.loss_config(**loss_options, use_weighting=use_weighting)
    B = checks.check_even_rows(checks.check_layout(logits, cu_seqlens, "logits", "V"))
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {tuple(logits.shape)}")
    chosen = dispatch.pick(logits, backend)
    if inplace_grad:
        _check_inplace(logits, chosen)
    with_stats = return_stats or use_weighting

    def sequences(x: torch.Tensor, stats: bool, inplace: bool) -> SequenceLogps:
        common = dict(ignore_index=ignore_index, temperature=temperature, backend=chosen)
        out = token_logps(x, labels, **common, return_stats=stats, inplace_grad=inplace)
        lp, token_stats = out if stats else (out, None)
        # the scored mask, not the labels: labels of only 0s and 1s are labels here
        return sequence_logps(
            lp,
            labels != ignore_index,
            ld_alpha=ld_alpha,
            cu_seqlens=cu_seqlens,
            token_stats=token_stats,
            backend=chosen,
        )

    rc, rr = _resolve_reference(
        ref_chosen_logps,
        ref_rejected_logps,
        ref_logits,
        reference_free,
        B,
        logits.device,
        lambda: sequences(ref_logits, False, False).logps,
    )
    out_dtype = _out_dtype(logits)
    if chosen != "triton":
        seq = sequences(logits, with_stats, inplace_grad)
        return _loss_from_sequences(
            seq,
            rc,
            rr,
            config=config,
            use_weighting=use_weighting,
            return_stats=return_stats,
            backend=chosen,
            out_dtype=out_dtype,
        )
    seq_starts = _seq_starts(labels.shape, cu_seqlens, logits.device)
    loss, losses, rewards, metrics, sums, n_tokens, _, _ = _dpo_from_logits_fwd(
        _rows(logits),
        labels.reshape(-1).long(),
        seq_starts,
        rc,
        rr,
        ignore_index,
        temperature,
        ld_alpha,
        use_weighting,
        with_stats,
        inplace_grad,
        *_config_args(config),
    )
    stats = SequenceStats(*sums[2:], n_tokens=n_tokens) if return_stats else None
    return DPOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=rewards[0],
        rejected_rewards=rewards[1],
        chosen_logps=sums[0, :B].float(),
        rejected_logps=sums[0, B:].float(),
        metrics=_metrics(metrics, stats),
    ).detached_details()


# ----------------------------------------------------------------------------------------------------------------
# linear_token_logps (fused lm_head)


def _full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2-sharded DTensor → the whole tensor (all-gathered; differentiable: its backward reduce-scatters the
    gradient back to the shards), as TRL does. Plain tensors pass through (tied embeddings: the same Parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_linear(hidden, weight, labels, bias, ignore_index, softcap, logit_scale) -> tuple[float | None, float]:
    """Shapes, dtypes, devices and the transform's scalars; labels in range (one host read, as for the logits)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {checks._describe(t)}")
    if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape [V, H] with V, H >= 1, got {tuple(weight.shape)}")
    if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape [..., H] with H = {weight.shape[1]}, got {tuple(hidden.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be a [{weight.shape[0]}] tensor, got {checks._describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    # the label checks of the logits path, on a [..., V] stand-in that costs no memory
    stand_in = hidden.new_empty(()).expand(*hidden.shape[:-1], weight.shape[0])
    checks.check_logits_labels(stand_in, labels, ignore_index, name="hidden @ weightᵀ")
    if softcap is not None:
        softcap = float(softcap)
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    logit_scale = float(logit_scale)
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    return softcap, logit_scale


# The fused head is one pair of torch custom ops over either implementation (the Triton kernels of
# ops/linear_logprobs.py, or chunked.py's tiled torch head for the other backends), with one autograd: torch.compile
# keeps them in its graph. The backward runs under the forward's autocast state, so that its recomputed tiles are
# the forward's.


def _head(backend: str) -> ModuleType:
    if backend == "triton":
        from dpo_kernels.ops import linear_logprobs

        return linear_logprobs
    return chunked


def _head_chunks(backend: str, chunks: list[int]) -> dict:
    """chunked.py's tile sizes (tests shrink them); the Triton head sizes its own tiles."""
    return {} if backend == "triton" else dict(token_chunk=chunks[0], vocab_chunk=chunks[1])


@torch.library.custom_op("dpo_kernels::linear_logps_fwd", mutates_args=())
def _linear_logps_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    backend: str,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    return_stats: bool,
    chunks: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    transform = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    logps, lse, stats = _head(backend).linear_logprobs_fwd(
        hidden, weight, labels, bias=bias, **transform, return_stats=return_stats, **_head_chunks(backend, chunks)
    )
    return logps, lse, logps.new_empty(0, hidden.shape[0]) if stats is None else stats


@_linear_logps_fwd.register_fake
def _(hidden, weight, bias, labels, backend, ignore_index, temperature, softcap, logit_scale, return_stats, chunks):
    out = lambda *shape: hidden.new_empty(shape, dtype=_out_dtype(hidden))  # noqa: E731
    N = hidden.shape[0]
    return out(N), out(N), out(4 if return_stats else 0, N)


@torch.library.custom_op("dpo_kernels::linear_logps_bwd", mutates_args=())
def _linear_logps_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    backend: str,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    chunks: list[int],
    weight_grad: bool,
    autocast_enabled: bool,
    autocast_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    transform = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=autocast_enabled):
        dh, dw, db = _head(backend).linear_logprobs_bwd(
            hidden,
            weight,
            labels,
            lse,
            grad_logps,
            bias=bias,
            **transform,
            grad_entropy=grad_entropy,
            entropy=entropy,
            weight_grad=weight_grad,
            **_head_chunks(backend, chunks),
        )
    # a custom op returns tensors (none aliasing another): an empty one stands for "no gradient"
    return dh, hidden.new_empty(0) if dw is None else dw, hidden.new_empty(0) if db is None else db


@_linear_logps_bwd.register_fake
def _(hidden, weight, bias, labels, lse, grad_logps, grad_entropy, entropy, *args):
    weight_grad = args[6]
    dw = torch.empty_like(weight) if weight_grad else hidden.new_empty(0)
    db = torch.empty_like(bias) if weight_grad and bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), dw, db


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type without autocast
        return False, torch.float32


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, backend, ignore_index, temperature, softcap, logit_scale, _, chunks = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1], output[2])
    ctx.options = (backend, ignore_index, temperature, softcap, logit_scale, chunks)
    ctx.autocast = _autocast_state(hidden.device.type)


def _linear_backward(ctx, grad_logps, _grad_lse, grad_stats):
    hidden, weight, bias, labels, lse, stats = ctx.saved_tensors
    has_entropy_grad = grad_stats is not None and stats.shape[0] > 0
    weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dh, dw, db = _linear_logps_bwd(
        hidden,
        weight,
        bias,
        labels,
        lse,
        None if grad_logps is None else grad_logps.to(lse.dtype).contiguous(),
        grad_stats[_ENTROPY].to(lse.dtype).contiguous() if has_entropy_grad else None,
        stats[_ENTROPY] if has_entropy_grad else None,
        *ctx.options,
        weight_grad,
        *ctx.autocast,
    )
    dw = dw if weight_grad else None
    db = db if weight_grad and bias is not None else None
    return dh, dw, db, *(None,) * 8


_linear_logps_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def _linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    backend: str,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    chunks: tuple[int, int] = (chunked.TOKEN_CHUNK, chunked.VOCAB_CHUNK),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused head on [N, H] rows, differentiable: (logps [N], stats [4, N] or [0, N]). No checks: callers
    validate (the public `linear_token_logps`; tests that shrink chunked.py's tiles)."""
    logps, _, stats = _linear_logps_fwd(
        hidden,
        weight,
        bias,
        labels,
        backend,
        ignore_index,
        temperature,
        softcap,
        logit_scale,
        return_stats,
        list(chunks),
    )
    return logps, stats


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
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Per-token log-probs straight from the last hidden states: the lm_head fused in, the logits never built.

    z = transform(hidden @ weightᵀ + bias) with transform(y) = y · logit_scale / temperature, or
    (softcap / temperature) · tanh(y · logit_scale / softcap) with a final-logit softcap (Gemma 2); then
    log_softmax(z)[label] in fp32, as `token_logps` on those logits. Ignored positions cost nothing.

    Args:
        hidden: [..., H] float16 / bfloat16 / float32 (float64 runs the chunked torch path); unit stride along H
            (else one copy), any other strides (e.g. `hidden[:, :-1]`).
        weight: [V, H] output layer (the tied embedding works as is); an FSDP2 DTensor is gathered with
            `full_tensor()`. Cast to hidden's dtype when it differs (a copy, as autocast would).
        labels: [...] integer, in [0, V) or `ignore_index` (exactly 0 there, no gradient).
        bias: optional [V] output bias.
        temperature, softcap, logit_scale: the logit transform (TRL's DPO uses temperature 1.0).
        return_stats: also return `TokenStats` on z (entropy, mean logit, is_top1, log Σ p²); only the entropy
            carries a gradient.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "reference" / "cpu" (the chunked torch path).

    Returns:
        fp32 log-probs shaped like `labels` (float64 for float64 hidden), and the stats when asked; differentiable
        with respect to hidden, weight and bias (fp32 accumulation, no skipped blocks).

    Example:
        >>> h = model.model(input_ids).last_hidden_state                       # [2B, T, H]
        >>> shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # the last position scores nothing
        >>> lp = dk.linear_token_logps(h, model.lm_head.weight, shifted)      # [2B, T]
        (`h[:, :-1]` with `labels[:, 1:]` gives the same values, but its rows are not evenly strided: one copy of the
        hidden states, N·H·itemsize bytes.)
    """
    weight, bias = _full_tensor(weight), _full_tensor(bias)
    softcap, logit_scale = _check_linear(hidden, weight, labels, bias, ignore_index, softcap, logit_scale)
    temperature = checks.check_temperature(temperature)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    H = hidden.shape[-1]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    rows = rows.reshape(-1, H)  # a view for evenly strided rows, else a copy
    flat_labels = labels.reshape(-1).long()
    options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    chosen = dispatch.pick(hidden, backend)
    bias = None if bias is None else bias.contiguous()
    logps, stats = _linear_logps(rows, weight, bias, flat_labels, chosen, **options, return_stats=return_stats)
    logps = logps.view(labels.shape)
    if not return_stats:
        return logps
    return logps, _token_stats(stats, labels.shape)


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss_from_hidden


def dpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    reference_free: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    backend: str | None = None,
    **loss_options,
) -> DPOOutput:
    """TRL 1.16's DPO loss from the policy's last hidden states and output layer, never building the logits.

    The same as `dpo_loss_from_logits(transform(hidden @ weightᵀ + bias), labels, ...)`: `linear_token_logps`,
    then `sequence_logps`, then `dpo_loss` (the per-sequence math is [2B]-sized).

    Args:
        hidden: padded [2B, T, H] (chosen rows first, then rejected rows) or packed [N, H] with `cu_seqlens`,
            already aligned with `labels` (hidden[..., t] predicts labels[..., t]): pass the whole hidden states
            with labels shifted left by one and `ignore_index` in the last column (no copy), or hidden[:, :-1]
            with labels[:, 1:] (one copy of the hidden states).
        weight, bias: the policy's output layer (see `linear_token_logps`).
        labels: [2B, T] or [N], `ignore_index` outside the completions.
        ref_chosen_logps, ref_rejected_logps: [B] precomputed reference log-probs; or `ref_hidden` (the reference
            model's hidden states, used without gradient, through `ref_weight` / `ref_bias`, which default to the
            policy's `weight` / `bias`, e.g. a frozen shared head under PEFT); or `reference_free=True`.
        softcap, logit_scale, temperature: the logit transform, for the policy and the reference alike.
        cu_seqlens, ld_alpha, use_weighting, return_stats, **loss_options: as in `dpo_loss_from_logits`.

    Returns:
        `DPOOutput`; `loss` is differentiable with respect to hidden, weight and bias.

    Example:
        >>> h = policy.model(input_ids).last_hidden_state
        >>> shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        >>> out = dk.dpo_loss_from_hidden(h, policy.lm_head.weight, shifted, ref_c, ref_r, beta=0.1)
        >>> out.loss.backward()
    """
    config = L.loss_config(**loss_options, use_weighting=use_weighting)  # fail before any GEMM
    ld_alpha = checks.check_ld_alpha(ld_alpha)
    B = checks.check_even_rows(checks.check_layout(hidden, cu_seqlens, "hidden", "H"))
    if ref_hidden is not None and ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's {tuple(hidden.shape)} but for H"
        )
    # the [N]- and [2B]-sized steps after the head: the Triton kernels or torch
    small = "triton" if dispatch.pick(hidden, backend) == "triton" else "reference"
    transform = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)

    def sequences(h, w, b, with_stats: bool) -> SequenceLogps:
        out = linear_token_logps(h, w, labels, bias=b, **transform, return_stats=with_stats, backend=backend)
        lp, stats = out if with_stats else (out, None)
        # the scored mask, not the labels: labels of only 0s and 1s are labels here
        return sequence_logps(
            lp, labels != ignore_index, ld_alpha=ld_alpha, cu_seqlens=cu_seqlens, token_stats=stats, backend=small
        )

    def reference_sequences() -> torch.Tensor:
        w, b = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        return sequences(ref_hidden, w, b, False).logps

    rc, rr = _resolve_reference(
        ref_chosen_logps, ref_rejected_logps, ref_hidden, reference_free, B, hidden.device, reference_sequences
    )
    seq = sequences(hidden, weight, bias, return_stats or use_weighting)
    return _loss_from_sequences(
        seq,
        rc,
        rr,
        config=config,
        use_weighting=use_weighting,
        return_stats=return_stats,
        backend=small,
        out_dtype=_out_dtype(hidden),
    )


class DPOLoss(torch.nn.Module):
    """`dpo_loss_from_logits` as a module that holds the loss options.

    Example:
        >>> crit = dk.DPOLoss(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
        >>> out = crit(logits, labels, ref_chosen_logps, ref_rejected_logps); out.loss.backward()
    """

    def __init__(
        self,
        *,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        ignore_index: int = -100,
        temperature: float = 1.0,
        return_stats: bool = False,
        inplace_grad: bool = False,
        backend: str | None = None,
        **loss_options,
    ) -> None:
        super().__init__()
        L.loss_config(**loss_options, use_weighting=use_weighting)  # fail at construction, not at the first step
        self.options = dict(
            ld_alpha=checks.check_ld_alpha(ld_alpha),
            use_weighting=use_weighting,
            ignore_index=ignore_index,
            temperature=checks.check_temperature(temperature),
            return_stats=return_stats,
            inplace_grad=inplace_grad,
            backend=backend,
            **loss_options,
        )

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        *,
        ref_logits: torch.Tensor | None = None,
        reference_free: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> DPOOutput:
        return dpo_loss_from_logits(
            logits,
            labels,
            ref_chosen_logps,
            ref_rejected_logps,
            ref_logits=ref_logits,
            reference_free=reference_free,
            cu_seqlens=cu_seqlens,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
