"""The public functions: validate once, pick a backend, call the kernels; the autograd Functions over them.

Backends (the one place that picks them is `_pick_backend`):
- "triton": the kernels in `ops/` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests);
- "cpu": the native C++ kernels of `csrc/` (per-token log-probs; the small per-sequence math runs in torch);
- "reference": plain PyTorch (`reference.py`), any device and dtype.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from dpo_kernels import chunked
from dpo_kernels import losses as L
from dpo_kernels import reference as R
from dpo_kernels.reference import DPOOutput, SequenceLogps, SequenceStats, TokenStats

BACKENDS = ("triton", "cpu", "reference")


def _cpu() -> ModuleType:
    """The native backend's module (imported on first use: it builds the extension)."""
    from dpo_kernels import cpu

    return cpu


@torch.compiler.assume_constant_result  # torch.compile reads it once instead of tracing a build
def _cpu_available() -> bool:
    return _cpu().available()


def _pick_backend(tensor: torch.Tensor, backend: str | None) -> str:
    """CUDA → triton; CPU under TRITON_INTERPRET=1 → triton (interpreted); CPU → cpu when it builds, else
    reference; other devices → reference. `backend=` overrides the choice."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if backend == "triton" and not (tensor.is_cuda or (interpret and tensor.device.type == "cpu")):
            raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {tensor.device}")
        if backend == "cpu" and (tensor.device.type != "cpu" or not _cpu_available()):
            raise ValueError(f"backend 'cpu' needs CPU tensors and the native extension (tensor on {tensor.device})")
        return backend
    if tensor.is_cuda:
        return "triton"
    if tensor.device.type == "cpu":
        if interpret:
            return "triton"
        if _cpu_available():
            return "cpu"
    return "reference"


def _logprob_kernels(backend: str) -> ModuleType:
    if backend == "triton":
        from dpo_kernels.ops import logprobs

        return logprobs
    return _cpu()


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] → [N, V] with unit vocab stride: a view when the rows are evenly strided, else a copy (e.g. the
    rows of logits[:, :-1] are not)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, logits.shape[-1])


def _token_stats(stats: torch.Tensor, shape: torch.Size) -> TokenStats:
    """The kernels' [4, N] stats rows as `TokenStats` shaped like the labels; only the entropy keeps its graph."""
    return TokenStats(
        entropy=stats[0].view(shape),
        mean_logit=stats[1].detach().view(shape),
        is_top1=stats[2].detach().view(shape) > 0.5,
        log_sum_sq_probs=stats[3].detach().view(shape),
    )


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
    logps, lse, stats = _logprob_kernels(backend).logprobs_fwd(
        logits, labels, ignore_index=ignore_index, temperature=temperature, return_stats=return_stats
    )
    return logps, lse, logps.new_empty(0, logits.shape[0]) if stats is None else stats


@_token_logps_fwd.register_fake
def _(logits, labels, backend, ignore_index, temperature, return_stats, inplace_grad):
    N = logits.shape[0]
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
    return _logprob_kernels(backend).logprobs_bwd(
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
    return torch.empty_like(logits)


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
    _logprob_kernels(backend).logprobs_bwd(
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
    grad_entropy = grad_stats[0] if grad_stats is not None and stats.shape[0] > 0 else None
    args = (
        logits,
        labels,
        lse,
        None if grad_logps is None else grad_logps.float().contiguous(),
        None if grad_entropy is None else grad_entropy.float().contiguous(),
        None if grad_entropy is None else stats[0],
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
        logits: [..., V] float16 / bfloat16 / float32 (float64 runs on the reference backend). Any row stride; a
            vocabulary stride other than 1 costs a copy.
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
    L.check_logits_labels(logits, labels, ignore_index)
    temperature = L.check_temperature(temperature)
    chosen = _pick_backend(logits, backend)
    if chosen == "reference" or logits.dtype == torch.float64:
        if inplace_grad:
            raise ValueError("inplace_grad=True needs the triton or cpu backend (and a non-float64 dtype)")
        return R.token_logps(
            logits, labels, ignore_index=ignore_index, temperature=temperature, return_stats=return_stats
        )
    if inplace_grad and not logits.requires_grad:
        raise ValueError("inplace_grad=True needs logits that require grad")
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


class _SequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, labels, seq_starts, ignore_index, ld_alpha):
        from dpo_kernels.ops import segments

        sums, n_tokens = segments.segments_fwd(values, labels, seq_starts, ignore_index=ignore_index, ld_alpha=ld_alpha)
        ctx.save_for_backward(labels, seq_starts, n_tokens)
        ctx.options = (ignore_index, ld_alpha, values.shape[0])
        ctx.mark_non_differentiable(n_tokens)
        return sums, n_tokens

    @staticmethod
    def backward(ctx, grad_sums, _grad_n):
        from dpo_kernels.ops import segments

        labels, seq_starts, n_tokens = ctx.saved_tensors
        ignore_index, ld_alpha, C = ctx.options
        grad_tokens = segments.segments_bwd(
            grad_sums[0].contiguous(),
            grad_sums[1].contiguous(),
            labels,
            seq_starts,
            n_tokens,
            ignore_index=ignore_index,
            ld_alpha=ld_alpha,
        )
        grad_values = torch.zeros(C, grad_tokens.shape[0], dtype=torch.float32, device=grad_tokens.device)
        grad_values[0] = grad_tokens
        # Stats sums: each token's value enters its sequence's plain sum once.
        if C > 1:
            seg = torch.repeat_interleave(torch.diff(seq_starts))
            scored = labels != ignore_index
            grad_values[1:] = grad_sums[2:, seg] * scored
        return grad_values, None, None, None, None


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
        labels_or_mask: labels shaped like `token_logps` (scored where ≠ `ignore_index`) or a bool mask.
        ld_alpha: LD-DPO's α in [0, 1]: rows s and s + S/2 are a pair (chosen rows first); tokens past the shorter
            completion's length weigh α.
        cu_seqlens: [S+1] int32/int64 start offsets of packed sequences (chosen sequences first).
        token_stats: per-token `TokenStats` to sum per sequence as well (for WPO and TRL's metrics).

    Returns:
        `SequenceLogps(logps, n_tokens, raw_logps, stats)`, all [S].
    """
    chosen = _pick_backend(token_logps, backend)
    if chosen != "triton" or token_logps.dtype == torch.float64:
        return R.sequence_logps(
            token_logps,
            labels_or_mask,
            ld_alpha=ld_alpha,
            cu_seqlens=cu_seqlens,
            token_stats=token_stats,
            ignore_index=ignore_index,
        )
    # The reference validates the same way; run its checks on a zero-size problem would not catch shape errors,
    # so the kernel path checks here.
    ld_alpha = L.check_ld_alpha(ld_alpha)
    if labels_or_mask.shape != token_logps.shape:
        raise ValueError(
            f"labels_or_mask shape {tuple(labels_or_mask.shape)} must equal token_logps shape "
            f"{tuple(token_logps.shape)}"
        )
    if cu_seqlens is None and token_logps.ndim != 2:
        raise ValueError(f"padded token_logps must be 2-D [S, T], got shape {tuple(token_logps.shape)}")
    if cu_seqlens is not None:
        if token_logps.ndim != 1:
            raise ValueError(f"packed token_logps must be 1-D [N], got shape {tuple(token_logps.shape)}")
        L.check_cu_seqlens(cu_seqlens, token_logps.numel(), token_logps.device)
    seq_starts = _seq_starts(token_logps.shape, cu_seqlens, token_logps.device)
    if ld_alpha is not None:
        L.check_even_rows(seq_starts.numel() - 1)
    mask = R.scored_mask(labels_or_mask, ignore_index).reshape(-1)
    labels = torch.where(mask, 0, ignore_index).long()
    rows = [token_logps.reshape(-1).float()]
    if token_stats is not None:
        rows += [t.reshape(-1).float() for t in token_stats]
    sums, n_tokens = _SequenceLogps.apply(torch.stack(rows), labels, seq_starts, ignore_index, ld_alpha)
    stats = None
    if token_stats is not None:
        stats = SequenceStats(*sums[2:], n_tokens=n_tokens)
    return SequenceLogps(logps=sums[0], n_tokens=n_tokens, raw_logps=sums[1], stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss


@dataclass(frozen=True)
class _LossInputs:
    """The optional per-pair inputs of the loss kernel, validated."""

    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    pair_weights: torch.Tensor | None = None
    sft_count: torch.Tensor | None = None


def _metrics(kernel_metrics: torch.Tensor, stats: SequenceStats | None) -> dict[str, torch.Tensor]:
    metrics = dict(zip(L.REWARD_METRICS, kernel_metrics.unbind(0)))
    if stats is not None:
        metrics.update(R.stats_metrics(stats))
    return metrics


class _DPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pc, pr, rc, rr, sft_sum, config, inputs):
        from dpo_kernels.ops import dpo

        out = dpo.dpo_fwd(
            pc,
            pr,
            rc,
            rr,
            config=config,
            chosen_lengths=inputs.chosen_lengths,
            rejected_lengths=inputs.rejected_lengths,
            pair_weights=inputs.pair_weights,
            sft_sum=sft_sum,
            sft_count=inputs.sft_count,
        )
        ctx.save_for_backward(out.grads)
        ctx.mark_non_differentiable(out.losses, out.rewards, out.metrics)
        return out.loss, out.losses, out.rewards, out.metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (grads,) = ctx.saved_tensors
        g = grads * grad_loss
        return g[0], g[1], g[2], g[3], g[4], None, None


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
    """TRL 1.16's DPO loss (any of the 15 loss types, or a weighted mix) on per-sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed log-probs.
        loss_type: a name of `losses.LOSS_TYPES` or a list of them; `loss_weights` one weight each (default 1).
        beta, label_smoothing, discopop_tau, f_divergence_type, f_alpha_divergence_coef: as in TRL's DPOConfig.
        chosen_lengths, rejected_lengths: [B] completion-token counts (needed by ipo and sigmoid_norm).
        wpo_weights: [2B] WPO weights per sequence (chosen first), e.g. `reference.wpo_weights(seq)`.
        chosen_token_logp_sum, chosen_token_count: [B] for `sft` (default: the chosen log-probs and lengths).
        sequence_stats: per-sequence stats sums [2B] for TRL's logits/*, entropy and mean_token_accuracy metrics.

    Returns:
        `DPOOutput`; `loss` is differentiable with respect to the four log-prob tensors and the sft sum (on the
        triton backend the per-pair `losses` carry no gradient).

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
        sequence_stats=sequence_stats,
    )
    chosen = _pick_backend(policy_chosen_logps, backend)
    if chosen != "triton" or policy_chosen_logps.dtype == torch.float64:
        return R.dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **options, **extra
        )
    config = L.loss_config(**options, use_weighting=wpo_weights is not None)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    sft_count = L.check_loss_inputs(config, pc, pr, rc, rr, **{k: v for k, v in extra.items() if k != "sequence_stats"})
    B = pc.shape[0]
    f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    inputs = _LossInputs(
        chosen_lengths=f32(chosen_lengths),
        rejected_lengths=f32(rejected_lengths),
        pair_weights=None if wpo_weights is None else f32(wpo_weights[:B] * wpo_weights[B:]),
        sft_count=f32(sft_count),
    )
    # Without a separate sft sum the chosen log-probs are it: autograd adds both gradients into pc.
    sft_sum = pc if chosen_token_logp_sum is None else chosen_token_logp_sum
    loss, losses, rewards, metrics = _DPOLoss.apply(
        pc.float(), pr.float(), rc.float(), rr.float(), sft_sum.float(), config, inputs
    )
    return DPOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=rewards[0],
        rejected_rewards=rewards[1],
        chosen_logps=pc,
        rejected_logps=pr,
        metrics=_metrics(metrics, sequence_stats),
    )


# ----------------------------------------------------------------------------------------------------------------
# dpo_loss_from_logits


@dataclass(frozen=True)
class _Plan:
    """The options of one fused from-logits call."""

    config: L.LossConfig
    ld_alpha: float | None
    use_weighting: bool
    return_stats: bool
    ignore_index: int
    temperature: float
    inplace_grad: bool


class _DPOLossFromLogits(torch.autograd.Function):
    """logits → token log-probs → sequence sums → loss in the forward; the backward is one pass over the logits
    with the per-token gradient the forward already computed (the loss is scalar, so only its scale is missing)."""

    @staticmethod
    def forward(ctx, logits, labels, seq_starts, rc, rr, plan):
        from dpo_kernels.ops import dpo, logprobs, segments

        with_stats = plan.return_stats or plan.use_weighting
        logps, lse, stats = logprobs.logprobs_fwd(
            logits, labels, ignore_index=plan.ignore_index, temperature=plan.temperature, return_stats=with_stats
        )
        values = logps[None] if stats is None else torch.cat([logps[None], stats])
        sums, n_tokens = segments.segments_fwd(
            values, labels, seq_starts, ignore_index=plan.ignore_index, ld_alpha=plan.ld_alpha
        )
        B = n_tokens.shape[0] // 2
        n = n_tokens.float()
        pair_weights = None
        if plan.use_weighting:
            seq = SequenceLogps(sums[0], n_tokens, sums[1], SequenceStats(*sums[2:], n_tokens=n_tokens))
            w = R.wpo_weights(seq)
            pair_weights = w[:B] * w[B:]
        out = dpo.dpo_fwd(
            sums[0, :B],
            sums[0, B:],
            rc,
            rr,
            config=plan.config,
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
            ignore_index=plan.ignore_index,
            ld_alpha=plan.ld_alpha,
        )
        ctx.save_for_backward(logits, labels, lse, grad_tokens)
        ctx.plan = plan
        ctx.mark_non_differentiable(out.losses, out.rewards, out.metrics, sums, n_tokens)
        return out.loss, out.losses, out.rewards, out.metrics, sums, n_tokens

    @staticmethod
    def backward(ctx, grad_loss, *_):
        from dpo_kernels.ops import logprobs

        logits, labels, lse, grad_tokens = ctx.saved_tensors
        plan = ctx.plan
        dlogits = logprobs.logprobs_bwd(
            logits,
            labels,
            lse,
            grad_tokens * grad_loss,
            ignore_index=plan.ignore_index,
            temperature=plan.temperature,
            inplace=plan.inplace_grad,
        )
        if plan.inplace_grad:  # a later reader of the overwritten logits fails instead of reading the gradient
            torch.autograd.graph.increment_version(logits)
        return dlogits, None, None, None, None, None


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
        ref_chosen_logps, ref_rejected_logps: [B] precomputed reference log-probs; or `ref_logits` shaped like
            `logits` (used without gradient); or `reference_free=True` (both zero). Exactly one of the three.
        cu_seqlens: [2B+1] int32/int64 start offsets of the packed sequences (chosen sequences first).
        ld_alpha: LD-DPO's α in [0, 1]; applied to the reference log-probs computed from `ref_logits` too.
        use_weighting: WPO weights from the policy's own token statistics.
        return_stats: add TRL's logits/chosen, logits/rejected, entropy and mean_token_accuracy metrics.
        inplace_grad: write the logits' gradient into the logits' storage (see `token_logps`).
        **loss_options: loss_type, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef (see `dpo_loss`). ipo / sigmoid_norm use the scored-token counts as lengths.

    Returns:
        `DPOOutput`; only `loss` carries a gradient (to the logits).

    Example:
        >>> out = dk.dpo_loss_from_logits(logits[:, :-1], labels[:, 1:], ref_chosen, ref_rejected, beta=0.1)
        >>> out.loss.backward()
    """
    L.check_logits_labels(logits, labels, ignore_index)
    temperature = L.check_temperature(temperature)
    ld_alpha = L.check_ld_alpha(ld_alpha)
    config = L.loss_config(**loss_options, use_weighting=use_weighting)
    if cu_seqlens is None and logits.ndim != 3:
        raise ValueError(
            f"logits must be padded [2B, T, V], or packed [N, V] with cu_seqlens; got shape {tuple(logits.shape)}"
        )
    if cu_seqlens is not None:
        if logits.ndim != 2:
            raise ValueError(f"packed logits (with cu_seqlens) must be [N, V], got shape {tuple(logits.shape)}")
        L.check_cu_seqlens(cu_seqlens, logits.shape[0], logits.device)
    S = logits.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    B = L.check_even_rows(S)
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {tuple(logits.shape)}")
    if inplace_grad and not logits.requires_grad:
        raise ValueError("inplace_grad=True needs logits that require grad")
    chosen = _pick_backend(logits, backend)
    common = dict(ignore_index=ignore_index, temperature=temperature)

    def seq_logps(x: torch.Tensor) -> torch.Tensor:
        lp = token_logps(x, labels, **common, backend=chosen)
        return sequence_logps(lp, labels, ld_alpha=ld_alpha, cu_seqlens=cu_seqlens, backend=chosen).logps

    if chosen != "triton" or logits.dtype == torch.float64:
        token_fn = lambda x, y, **kw: token_logps(x, y, inplace_grad=inplace_grad, backend=chosen, **kw)  # noqa: E731
        return R.dpo_loss_from_logits(
            logits,
            labels,
            ref_chosen_logps,
            ref_rejected_logps,
            ref_logits=ref_logits,
            reference_free=reference_free,
            cu_seqlens=cu_seqlens,
            ld_alpha=ld_alpha,
            use_weighting=use_weighting,
            return_stats=return_stats,
            token_logps_fn=token_fn,
            **common,
            **loss_options,
        )
    rc, rr = R.reference_logps(
        ref_chosen_logps, ref_rejected_logps, ref_logits, reference_free, lambda: seq_logps(ref_logits)
    )
    if rc is None:
        rc = rr = torch.zeros(B, dtype=torch.float32, device=logits.device)
    for name, value in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
        L.check_pair_vector(value, name, B, logits.device)
    plan = _Plan(config, ld_alpha, use_weighting, return_stats, ignore_index, temperature, inplace_grad)
    seq_starts = _seq_starts(labels.shape, cu_seqlens, logits.device)
    rows = _rows(logits)
    loss, losses, rewards, metrics, sums, n_tokens = _DPOLossFromLogits.apply(
        rows, labels.reshape(-1).long(), seq_starts, rc.detach().float(), rr.detach().float(), plan
    )
    stats = SequenceStats(*sums[2:], n_tokens=n_tokens) if return_stats else None
    return DPOOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=rewards[0],
        rejected_rewards=rewards[1],
        chosen_logps=sums[0, :B],
        rejected_logps=sums[0, B:],
        metrics=_metrics(metrics, stats),
    )


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
            raise TypeError(f"{name} must be a floating-point tensor, got {L._describe(t)}")
    if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape [V, H] with V, H >= 1, got {tuple(weight.shape)}")
    if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape [..., H] with H = {weight.shape[1]}, got {tuple(hidden.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be a [{weight.shape[0]}] tensor, got {L._describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    # the label checks of the logits path, on a [..., V] stand-in that costs no memory
    stand_in = hidden.new_empty(()).expand(*hidden.shape[:-1], weight.shape[0])
    L.check_logits_labels(stand_in, labels, ignore_index, name="hidden @ weightᵀ")
    if softcap is not None:
        softcap = float(softcap)
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    logit_scale = float(logit_scale)
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    return softcap, logit_scale


def _linear_backend(hidden: torch.Tensor, backend: str | None) -> str:
    """Returns "triton" or "chunked"; unlike `_pick_backend`, no native CPU kernel exists here (none is built)."""
    if backend is None:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        use_triton = hidden.is_cuda or (interpret and hidden.device.type == "cpu")
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    else:
        use_triton = backend == "triton" and _pick_backend(hidden, "triton") == "triton"
    return "triton" if use_triton and hidden.dtype != torch.float64 else "chunked"


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options, return_stats):
        from dpo_kernels.ops import linear_logprobs

        logps, lse, stats = linear_logprobs.linear_logprobs_fwd(
            hidden, weight, labels, bias=bias, **options, return_stats=return_stats
        )
        if stats is None:
            stats = logps.new_empty(0, hidden.shape[0])
        ctx.save_for_backward(hidden, weight, bias, labels, lse, stats)
        ctx.options = options
        return logps, stats

    @staticmethod
    def backward(ctx, grad_logps, grad_stats):
        from dpo_kernels.ops import linear_logprobs

        hidden, weight, bias, labels, lse, stats = ctx.saved_tensors
        has_entropy_grad = grad_stats is not None and stats.shape[0] > 0
        grad_hidden, grad_weight, grad_bias = linear_logprobs.linear_logprobs_bwd(
            hidden,
            weight,
            labels,
            lse,
            grad_logps.float().contiguous() if grad_logps is not None else None,
            bias=bias,
            **ctx.options,
            grad_entropy=grad_stats[0].float().contiguous() if has_entropy_grad else None,
            entropy=stats[0] if has_entropy_grad else None,
            weight_grad=ctx.needs_input_grad[1] or ctx.needs_input_grad[2],
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None


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
    temperature = L.check_temperature(temperature)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    H = hidden.shape[-1]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    rows = rows.reshape(-1, H)  # a view for evenly strided rows, else a copy
    flat_labels = labels.reshape(-1).long()
    options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    if _linear_backend(hidden, backend) == "triton":
        logps, stats = _LinearTokenLogps.apply(
            rows, weight, None if bias is None else bias.contiguous(), flat_labels, options, return_stats
        )
    else:
        logps, stats = chunked.chunked_linear_token_logps(
            rows, weight, flat_labels, bias=bias, **options, return_stats=return_stats
        )
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
    L.loss_config(**loss_options, use_weighting=use_weighting)  # fail before any GEMM
    ld_alpha = L.check_ld_alpha(ld_alpha)
    if cu_seqlens is None and hidden.ndim != 3:
        raise ValueError(
            f"hidden must be padded [2B, T, H], or packed [N, H] with cu_seqlens; got shape {tuple(hidden.shape)}"
        )
    if cu_seqlens is not None and hidden.ndim != 2:
        raise ValueError(f"packed hidden (with cu_seqlens) must be [N, H], got shape {tuple(hidden.shape)}")
    if ref_hidden is not None and ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's {tuple(hidden.shape)} but for H"
        )
    chosen = _linear_backend(hidden, backend)
    small = "triton" if chosen == "triton" else "reference"  # backend of the [N]- and [2B]-sized steps
    transform = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)

    def sequences(h, w, b, with_stats: bool) -> R.SequenceLogps:
        out = linear_token_logps(h, w, labels, bias=b, **transform, return_stats=with_stats, backend=backend)
        lp, stats = out if with_stats else (out, None)
        return sequence_logps(
            lp,
            labels,
            ld_alpha=ld_alpha,
            cu_seqlens=cu_seqlens,
            token_stats=stats,
            ignore_index=ignore_index,
            backend=small,
        )

    def reference_sequences() -> torch.Tensor:
        w, b = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        return sequences(ref_hidden, w, b, False).logps

    rc, rr = R.reference_logps(ref_chosen_logps, ref_rejected_logps, ref_hidden, reference_free, reference_sequences)
    seq = sequences(hidden, weight, bias, return_stats or use_weighting)
    return R.dpo_loss_from_sequences(
        seq,
        rc,
        rr,
        use_weighting=use_weighting,
        return_stats=return_stats,
        dpo_loss_fn=lambda *args, **kw: dpo_loss(*args, **kw, backend=small),
        **loss_options,
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
            ld_alpha=L.check_ld_alpha(ld_alpha),
            use_weighting=use_weighting,
            ignore_index=ignore_index,
            temperature=L.check_temperature(temperature),
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
