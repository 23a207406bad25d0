"""The public functions: validate once (`checks`), pick a backend once (`dispatch.pick`), then one custom op with its
autograd (`custom_ops`), or the reference (`reference`) on the reference backend."""

from __future__ import annotations

import math

import torch

from dpo_kernels import checks, dispatch
from dpo_kernels import custom_ops as C
from dpo_kernels import losses as L
from dpo_kernels import pairs as P
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


def _unsliced(logits: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """(full, row0, rows) with `logits == full.narrow(-2, row0, rows)`, where `full` is a view of the tensor that
    `logits` was sliced from (e.g. `outputs.logits` for `outputs.logits[:, :-1]`), when `logits` is such a row window
    of a contiguous tensor and a gradient will flow; else None.

    The ops then take `full` and write its gradient whole (zeros outside the window): autograd's slice backward,
    which allocates a zero-filled tensor of the full shape and copies the window's gradient into it, never runs.
    """
    base = logits._base
    if (
        torch.compiler.is_compiling()  # the compiler's own slice backward is fused
        or not torch.is_grad_enabled()
        or logits.grad_fn is None
        or logits.retains_grad  # the window's own .grad or hooks are asked for: keep it in the graph
        or logits._backward_hooks
        or base is None
        or not base.requires_grad
        or not base.is_contiguous()
        or base.dtype != logits.dtype
        or logits.ndim not in (2, 3)
    ):
        return None
    V, rows = logits.shape[-1], logits.shape[-2]
    offset = logits.storage_offset() - base.storage_offset()
    if logits.stride(-1) != 1 or logits.stride(-2) != V or offset % V or base.numel() % V:
        return None
    if logits.ndim == 2:
        full = base.view(-1, V)
    elif logits.shape[0] == 1:
        full = base.view(1, -1, V)
    elif logits.stride(0) % V == 0 and base.numel() == logits.shape[0] * logits.stride(0):
        full = base.view(logits.shape[0], -1, V)
    else:
        return None
    row0 = offset // V
    return (full, row0, rows) if row0 + rows <= full.shape[-2] else None


def _operand(logits: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The logits as the ops take them: (full, row0, rows), the launchers reading `full.narrow(-2, row0, rows)`."""
    window = _unsliced(logits)
    if window is not None:
        return window
    rows = _rows(logits)
    return rows, 0, rows.shape[-2]


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


def _not_in_parallel(**options) -> None:
    """Options the vocabulary-parallel functions (`dpo_kernels.parallel`) do not take: refused when set."""
    for name, (value, default) in options.items():
        if value != default:
            raise ValueError(f"{name}={value!r} is not supported on logits or a head sharded over the vocabulary")


def _token_stats(stats: torch.Tensor, shape: torch.Size) -> TokenStats:
    """The kernels' [4, N] stats rows as `TokenStats` shaped like the labels; only the entropy keeps its graph."""
    rows = {name: (row if name == "entropy" else row.detach()).view(shape) for name, row in zip(STATS, stats)}
    return TokenStats(**{**rows, "is_top1": rows["is_top1"] > 0.5})


# ----------------------------------------------------------------------------------------------------------------
# token_logps


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
    inplace_grad: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Log-probability of each label under softmax(logits / temperature), in fp32.

    Args:
        logits: [..., V] float16 / bfloat16 / float32 (float64 runs on the reference backend). [N, V] and
            [B, T, V] with any batch and row strides (e.g. `logits[:, :-1]`) are read in place, and the gradient
            of a row window of a contiguous tensor (`outputs.logits[:, :-1]`) is written for the whole tensor at
            once (zeros outside the window) instead of through autograd's zero-filled slice backward; more leading
            dims are merged (a copy where they cannot be viewed), and a vocabulary stride other than 1 costs a copy.
        labels: [...] integer, in [0, V) or `ignore_index`; ignored positions get exactly 0 and no gradient.
        temperature: the logits are divided by it (TRL's DPO uses 1.0).
        return_stats: also return `TokenStats` (entropy, mean logit, is_top1 with TRL's first-argmax tie rule,
            log Σ p²); only the entropy carries a gradient.
        inplace_grad: the backward writes the logits' gradient into the logits' own storage (for a row window,
            into the whole tensor it was sliced from), so the extra memory is O(N). The caller promises not to read
            the logits after the backward.
        process_group, vocab_start, vocab_size: logits sharded over the vocabulary, this rank's columns
            [vocab_start, vocab_start + V) of `vocab_size`: computed by `dpo_kernels.parallel` (two all-reduces
            forward, none backward), as for a DTensor sharded on its last dim, which goes there by itself.
        backend: "triton", "cpu" or "reference" to override the automatic choice.

    Returns:
        fp32 (float64 for float64 logits) tensor shaped like `labels`, and the stats when asked.

    Example:
        >>> lp = dk.token_logps(logits[:, :-1], input_ids[:, 1:].masked_fill(~completion_mask[:, 1:], -100))
    """
    if process_group is not None or dispatch.vocab_sharded(logits):
        from dpo_kernels import parallel

        _not_in_parallel(inplace_grad=(inplace_grad, False))
        shard = dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
        options = dict(ignore_index=ignore_index, temperature=temperature, return_stats=return_stats)
        return parallel.token_logps(logits, labels, **shard, **options, backend=backend)
    checks.check_logits_labels(logits, labels, ignore_index)
    temperature = checks.check_temperature(temperature)
    chosen = dispatch.pick(logits, backend)
    if inplace_grad:
        _check_inplace(logits, chosen)
    if chosen == "reference":
        return R.token_logps(
            logits, labels, ignore_index=ignore_index, temperature=temperature, return_stats=return_stats
        )
    operand, flat_labels = _operand(logits), labels.reshape(-1).long()
    logps, _, stats = C.token_logps_fwd(
        *operand, flat_labels, chosen, ignore_index, temperature, return_stats, inplace_grad
    )
    logps = logps.view(labels.shape)
    if not return_stats:
        return logps
    return logps, _token_stats(stats, labels.shape)


# ----------------------------------------------------------------------------------------------------------------
# sequence_logps


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
    seq_starts = C.seq_starts(token_logps.shape, cu_seqlens, token_logps.device)
    # the kernel reads labels: scored → 0, unscored → −1 (its ignore_index), whatever the caller's ignore_index
    mask = R.scored_mask(labels_or_mask, ignore_index).reshape(-1)
    labels = torch.where(mask, 0, -1).long()
    rows = [token_logps.reshape(-1).float()]
    if token_stats is not None:
        rows += [t.reshape(-1).float() for t in token_stats]
    sums, n_tokens = C.segments_fwd(torch.stack(rows), labels, seq_starts, -1, ld_alpha)
    stats = None
    if token_stats is not None:
        stats = SequenceStats(*sums[2:], n_tokens=n_tokens)
    return SequenceLogps(logps=sums[0], n_tokens=n_tokens, raw_logps=sums[1], stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss


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
    loss, losses, rewards, metrics = C.kernel_loss(
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
        metrics=P.metrics(metrics, sequence_stats),
    ).detached_details()


# ----------------------------------------------------------------------------------------------------------------
# The per-sequence end of the from-logits and from-hidden paths


def _reference(ref_chosen_logps, ref_rejected_logps, ref_input, reference_free, B: int, device, compute):
    """The reference's [B] chosen and rejected log-probs: precomputed, zeros (reference_free), or `compute()` of
    `ref_input` (the reference's logits / hidden states) under no_grad; exactly one way (`pairs`)."""
    computed = None if ref_input is None else "ref_input"
    ref = P.precomputed_reference(ref_chosen_logps, ref_rejected_logps, computed, reference_free, B, device)
    if ref is not None:
        return ref
    with torch.no_grad():
        logps = compute()
    return logps[:B], logps[B:]


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    """The outputs' dtype for logits / hidden states of t's dtype: fp32, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss_from_logits


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
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
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
        process_group, vocab_start, vocab_size: logits (and `ref_logits`) sharded over the vocabulary (see
            `token_logps`); a DTensor sharded on its last dim goes to `dpo_kernels.parallel` by itself.
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
    if process_group is not None or dispatch.vocab_sharded(logits):
        from dpo_kernels import parallel

        _not_in_parallel(inplace_grad=(inplace_grad, False))
        shard = dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
        options = dict(ld_alpha=ld_alpha, use_weighting=use_weighting, ignore_index=ignore_index)
        options.update(temperature=temperature, return_stats=return_stats, backend=backend, **loss_options)
        return parallel.dpo_loss_from_logits(
            logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits=ref_logits,
            reference_free=reference_free, cu_seqlens=cu_seqlens, **shard, **options,
        )  # fmt: skip
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

    with checks.values_checked():  # labels and cu_seqlens are checked above: not read again below
        given = (ref_chosen_logps, ref_rejected_logps, ref_logits, reference_free)
        rc, rr = _reference(*given, B, logits.device, lambda: sequences(ref_logits, False, False).logps)
        out_dtype = _out_dtype(logits)
        if chosen != "triton":
            seq = sequences(logits, with_stats, inplace_grad)
            return P.loss_from_sequences(
                seq,
                rc,
                rr,
                config=config,
                use_weighting=use_weighting,
                return_stats=return_stats,
                backend=chosen,
                out_dtype=out_dtype,
            )
        seq_starts = C.seq_starts(labels.shape, cu_seqlens, logits.device)
        loss, losses, rewards, metrics, sums, n_tokens, _, _ = C.dpo_from_logits_fwd(
            *_operand(logits),
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
            *C.config_args(config),
        )
        stats = SequenceStats(*sums[2:], n_tokens=n_tokens) if return_stats else None
        return DPOOutput(
            loss=loss,
            losses=losses,
            chosen_rewards=rewards[0],
            rejected_rewards=rewards[1],
            chosen_logps=sums[0, :B].float(),
            rejected_logps=sums[0, B:].float(),
            metrics=P.metrics(metrics, stats),
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


def _check_head_labels(hidden, weight, labels, ignore_index: int) -> None:
    """The label checks of the logits path, on a [..., V] stand-in for the logits that costs no memory."""
    tensors = isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)
    if not (tensors and hidden.is_floating_point() and weight.is_floating_point() and weight.ndim == 2):
        return  # `_check_linear` says what is wrong with them
    stand_in = hidden.new_empty(()).expand(*hidden.shape[:-1], weight.shape[0])
    checks.check_logits_labels(stand_in, labels, ignore_index, name="hidden @ weightᵀ")


def _check_linear(hidden, weight, labels, bias, ignore_index, softcap, logit_scale) -> tuple[float | None, float]:
    """Shapes, dtypes, devices and the transform's scalars; labels in range (one host read, as for the logits)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {checks.describe(t)}")
    if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape [V, H] with V, H >= 1, got {tuple(weight.shape)}")
    if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape [..., H] with H = {weight.shape[1]}, got {tuple(hidden.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be a [{weight.shape[0]}] tensor, got {checks.describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    _check_head_labels(hidden, weight, labels, ignore_index)
    if softcap is not None:
        softcap = float(softcap)
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    logit_scale = float(logit_scale)
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    return softcap, logit_scale


HEAD_IMPLS = ("tile", "fused")


def _fp32_tile(tile_dtype: torch.dtype | None) -> bool:
    """Checks the head's `tile_dtype`: whether the tiles are fp32 whatever the operands."""
    if tile_dtype is not None and tile_dtype != torch.float32:
        raise ValueError(f"tile_dtype must be None (the GEMM's dtype) or torch.float32, got {tile_dtype!r}")
    return tile_dtype is not None


def _head_options(impl: str, keep_logits: bool | str, deterministic: bool, backend: str) -> str:
    """Checks the head's own options; the backend that runs it ("reference" for float64 and the reference backend:
    `reference.linear_token_logps`, the logits built)."""
    if impl not in HEAD_IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(HEAD_IMPLS)}")
    if not (keep_logits is True or keep_logits is False or keep_logits == "auto"):
        raise ValueError(f"keep_logits must be True, False or 'auto', got {keep_logits!r}")
    if impl == "fused" and backend != "triton":
        raise ValueError(
            f"impl='fused' is the all-Triton head: it needs the triton backend and fp32/bf16/fp16 hidden states; "
            f"this call runs on {backend!r}"
        )
    if impl == "fused" and (keep_logits is True or deterministic):
        raise ValueError(
            "impl='fused' never builds a logits tile: keep_logits=True and deterministic=True need impl='tile'"
        )
    return backend


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
    keep_logits: bool | str = "auto",
    deterministic: bool = False,
    impl: str = "tile",
    tile_dtype: torch.dtype | None = None,
    vocab_parallel: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Per-token log-probs straight from the last hidden states: the lm_head fused in, the logits never built whole.

    z = transform(hidden @ weightᵀ + bias) with transform(y) = y · logit_scale / temperature, or
    (softcap / temperature) · tanh(y · logit_scale / softcap) with a final-logit softcap (Gemma 2); then
    log_softmax(z)[label] in fp32, as `token_logps` on those logits. Ignored positions cost nothing.

    The default head (`impl="tile"`) projects chunks of the scored rows with the vendor GEMM (torch.mm: cuBLAS,
    MKL / oneDNN), into a tile of the matmul's dtype (bf16 for a bf16 model: the logits a bf16 model would output),
    and runs the log-prob row kernels on it; the backward writes dy into the tile and runs two more GEMMs.

    Args:
        hidden: [..., H] float16 / bfloat16 / float32 (float64 runs the reference); unit stride along H (else one
            copy), any other strides (e.g. `hidden[:, :-1]`).
        weight: [V, H] output layer (the tied embedding works as is); an FSDP2 DTensor is gathered with
            `full_tensor()`. Cast to hidden's dtype when it differs (a copy, as autocast would).
        labels: [...] integer, in [0, V) or `ignore_index` (exactly 0 there, no gradient).
        bias: optional [V] output bias (cast like the weight).
        temperature, softcap, logit_scale: the logit transform (TRL's DPO uses temperature 1.0).
        return_stats: also return `TokenStats` on z (entropy, mean logit, is_top1, log Σ p²); only the entropy
            carries a gradient.
        keep_logits: keep the forward's tiles for the backward instead of recomputing them (one GEMM fewer, at
            scored rows × V × 2 bytes in bf16): "auto" keeps them when they fit in `chunked.KEEP_LOGITS_BYTES`
            (2 GiB), True always, False never. Vocabularies split into column blocks (from
            `chunked.VOCAB_SPLIT`, 256k) always recompute.
        deterministic: every GEMM of the head gets the same shape (chunks of `chunked.DETERMINISTIC_ROWS` rows at
            most, the last one padded), so that a row's log-prob and its hidden state's gradient do not depend on
            the other rows of the batch (batch invariance, at the cost of the padding's GEMM rows; README).
        impl: "tile" (the default) or "fused": the all-Triton head of ops/linear_logprobs.py (fp32 logits, never
            rounded to a tile dtype; no keep_logits, no deterministic).
        tile_dtype: None (the default: the dtype the GEMM writes, bf16 for bf16 operands or under bf16 autocast,
            as the model's own logits would be) or torch.float32: fp32 tiles from 16-bit operands, so that
            log-probs and stats come from unrounded logits (the "fused" head's and the vocabulary-parallel head's
            are always fp32). Twice the tile memory (kept tiles included); where torch has no fp32-output GEMM for
            the operands (the CPU), each tile's GEMM runs on fp32 copies of the chunk and of 16384 weight rows at
            a time (16384 × H × 4 bytes). The backward's GEMMs take dy rounded to the default tile's dtype (the
            operands', or autocast's under autocast), as they would without the option.
        vocab_parallel, process_group, vocab_start, vocab_size: a weight (and bias) sharded over the vocabulary,
            a `ColwiseParallel` lm_head's DTensor with `vocab_parallel=True`, or this rank's rows [vocab_start,
            vocab_start + V) of `vocab_size` with `process_group`: computed by `dpo_kernels.parallel` (two
            all-reduces forward, one of grad_hidden backward). Without them an FSDP2-sharded weight is gathered.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cpu" (the native row kernels) or "reference"
            (plain torch, the whole logits built).

    Returns:
        fp32 log-probs shaped like `labels` (float64 for float64 hidden), and the stats when asked; differentiable
        with respect to hidden, weight and bias (dW and db accumulated in fp32 across chunks, no skipped blocks).

    Example:
        >>> h = model.model(input_ids).last_hidden_state                       # [2B, T, H]
        >>> shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # the last position scores nothing
        >>> lp = dk.linear_token_logps(h, model.lm_head.weight, shifted)      # [2B, T]
        (`h[:, :-1]` with `labels[:, 1:]` gives the same values, but its rows are not evenly strided: one copy of the
        hidden states, N·H·itemsize bytes.)
    """
    fp32_tile = _fp32_tile(tile_dtype)
    if vocab_parallel or process_group is not None:
        from dpo_kernels import parallel

        _not_in_parallel(keep_logits=(keep_logits, "auto"), deterministic=(deterministic, False), impl=(impl, "tile"))
        shard = dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
        options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
        return parallel.linear_token_logps(
            hidden, weight, labels, bias=bias, **shard, **options, return_stats=return_stats, backend=backend
        )
    weight, bias = _full_tensor(weight), _full_tensor(bias)
    softcap, logit_scale = _check_linear(hidden, weight, labels, bias, ignore_index, softcap, logit_scale)
    temperature = checks.check_temperature(temperature)
    chosen = _head_options(impl, keep_logits, deterministic, dispatch.pick(hidden, backend))
    options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    if chosen == "reference":
        if not fp32_tile:
            return R.linear_token_logps(hidden, weight, labels, bias=bias, **options, return_stats=return_stats)
        # the matmul in fp32 at least (float64 stays), autocast or not
        hidden, weight, bias = (t if t is None else t.to(torch.promote_types(t.dtype, torch.float32))
                                for t in (hidden, weight, bias))  # fmt: skip
        with torch.autocast(hidden.device.type, enabled=False):
            return R.linear_token_logps(hidden, weight, labels, bias=bias, **options, return_stats=return_stats)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    H = hidden.shape[-1]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    rows = rows.reshape(-1, H)  # a view for evenly strided rows, else a copy
    flat_labels = labels.reshape(-1).long()
    bias = None if bias is None else bias.contiguous()
    head = dict(impl=impl, keep_logits=keep_logits, deterministic=deterministic, fp32_tile=fp32_tile)
    logps, stats = C.linear_logps(rows, weight, bias, flat_labels, chosen, **options, **head, return_stats=return_stats)
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
    keep_logits: bool | str = "auto",
    deterministic: bool = False,
    impl: str = "tile",
    tile_dtype: torch.dtype | None = None,
    vocab_parallel: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
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
            model's hidden states, used without gradient, through `ref_weight` / `ref_bias`; without `ref_weight`
            the policy's `weight` and `bias` (e.g. a frozen shared head under PEFT), with it `ref_bias` or no bias);
            or `reference_free=True`.
        softcap, logit_scale, temperature: the logit transform, for the policy and the reference alike.
        keep_logits, deterministic, impl, tile_dtype: the head's options (see `linear_token_logps`), the
            reference's too; the reference, run without gradient, never keeps its tiles.
        vocab_parallel, process_group, vocab_start, vocab_size: an output layer sharded over the vocabulary (see
            `linear_token_logps`), the reference's too.
        cu_seqlens, ld_alpha, use_weighting, return_stats, **loss_options: as in `dpo_loss_from_logits`.

    Returns:
        `DPOOutput`; `loss` is differentiable with respect to hidden, weight and bias.

    Example:
        >>> h = policy.model(input_ids).last_hidden_state
        >>> shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        >>> out = dk.dpo_loss_from_hidden(h, policy.lm_head.weight, shifted, ref_c, ref_r, beta=0.1)
        >>> out.loss.backward()
    """
    if vocab_parallel or process_group is not None:
        from dpo_kernels import parallel

        _not_in_parallel(keep_logits=(keep_logits, "auto"), deterministic=(deterministic, False), impl=(impl, "tile"))
        _fp32_tile(tile_dtype)  # the vocabulary-parallel head's tiles are fp32 anyway
        shard = dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
        options = dict(ld_alpha=ld_alpha, use_weighting=use_weighting, ignore_index=ignore_index)
        options.update(temperature=temperature, softcap=softcap, logit_scale=logit_scale, return_stats=return_stats)
        return parallel.dpo_loss_from_hidden(
            hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias=bias, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, reference_free=reference_free, cu_seqlens=cu_seqlens,
            **shard, **options, backend=backend, **loss_options,
        )  # fmt: skip
    config = L.loss_config(**loss_options, use_weighting=use_weighting)  # fail before any GEMM
    ld_alpha = checks.check_ld_alpha(ld_alpha)
    B = checks.check_even_rows(checks.check_layout(hidden, cu_seqlens, "hidden", "H"))
    _check_head_labels(hidden, weight, labels, ignore_index)
    if ref_hidden is not None and ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's {tuple(hidden.shape)} but for H"
        )
    chosen = dispatch.pick(hidden, backend)  # the head's, and the [N]- and [2B]-sized steps after it
    transform = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    head = dict(keep_logits=keep_logits, deterministic=deterministic, impl=impl, tile_dtype=tile_dtype, backend=chosen)

    def sequences(h, w, b, with_stats: bool) -> SequenceLogps:
        out = linear_token_logps(h, w, labels, bias=b, **transform, **head, return_stats=with_stats)
        lp, stats = out if with_stats else (out, None)
        # the scored mask, not the labels: labels of only 0s and 1s are labels here
        return sequence_logps(
            lp, labels != ignore_index, ld_alpha=ld_alpha, cu_seqlens=cu_seqlens, token_stats=stats, backend=chosen
        )

    def reference_sequences() -> torch.Tensor:
        w, b = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        return sequences(ref_hidden, w, b, False).logps

    with checks.values_checked():  # labels and cu_seqlens are checked above: not read again below
        given = (ref_chosen_logps, ref_rejected_logps, ref_hidden, reference_free)
        rc, rr = _reference(*given, B, hidden.device, reference_sequences)
        seq = sequences(hidden, weight, bias, return_stats or use_weighting)
        return P.loss_from_sequences(
            seq,
            rc,
            rr,
            config=config,
            use_weighting=use_weighting,
            return_stats=return_stats,
            backend=chosen,
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
