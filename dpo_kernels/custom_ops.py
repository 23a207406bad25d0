"""The kernels as torch custom ops, with their autograd: what the public functions of `api.py` call once they have
checked their inputs and picked a backend. Custom ops keep torch.compile(fullgraph=True) tracing through them; each
op's fake implementation gives its output shapes.

No checks here: the api validates every call once. The ops take the launchers' layouts: logits as (full, row0,
rows), the launchers reading `full.narrow(-2, row0, rows)` (so that a row window such as `outputs.logits[:, :-1]` gets
the gradient of the whole tensor, written once), flat labels, float64 sequence sums.
"""

from __future__ import annotations

import torch

from dpo_kernels import chunked, dispatch
from dpo_kernels import losses as L
from dpo_kernels import reference as R
from dpo_kernels.results import STATS, SequenceLogps, SequenceStats


def _window(full: torch.Tensor, row0: int, rows: int) -> torch.Tensor:
    return full if row0 == 0 and rows == full.shape[-2] else full.narrow(-2, row0, rows)


def _zero_outside(grad: torch.Tensor, row0: int, rows: int) -> None:
    """Zeros the rows of `grad` outside its window [row0, row0 + rows) on dim -2."""
    grad.narrow(-2, 0, row0).zero_()
    grad.narrow(-2, row0 + rows, grad.shape[-2] - row0 - rows).zero_()


_ENTROPY = STATS.index("entropy")  # the one differentiable stats row


# The forward and backward are torch custom ops, so that torch.compile(fullgraph=True) keeps them in its graph.
# The in-place backward is an op of its own that declares the mutation of the logits: autograd then refuses a
# later reader of the overwritten logits instead of letting it read the gradient.


@torch.library.custom_op("dpo_kernels::token_logps_fwd", mutates_args=())
def token_logps_fwd(
    logits: torch.Tensor,
    row0: int,
    rows: int,
    labels: torch.Tensor,
    backend: str,
    ignore_index: int,
    temperature: float,
    return_stats: bool,
    inplace_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logps, lse, stats = dispatch.token_kernels(backend).logprobs_fwd(
        _window(logits, row0, rows),
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        return_stats=return_stats,
    )
    return logps, lse, logps.new_empty(0, logps.shape[0]) if stats is None else stats


@token_logps_fwd.register_fake
def _(logits, row0, rows, labels, backend, ignore_index, temperature, return_stats, inplace_grad):
    N = labels.numel()
    f32 = lambda *shape: logits.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return f32(N), f32(N), f32(4 if return_stats else 0, N)


@torch.library.custom_op("dpo_kernels::token_logps_bwd", mutates_args=())
def _token_logps_bwd(
    logits: torch.Tensor,
    row0: int,
    rows: int,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    backend: str,
    ignore_index: int,
    temperature: float,
) -> torch.Tensor:
    """The gradient of the whole `logits` (zero outside the window), contiguous."""
    window = _window(logits, row0, rows)
    grad = None if window is logits else torch.empty_like(logits)  # the un-sliced logits are contiguous
    if grad is not None:
        _zero_outside(grad, row0, rows)
    out = dispatch.token_kernels(backend).logprobs_bwd(
        window,
        labels,
        lse,
        grad_logps,
        ignore_index=ignore_index,
        temperature=temperature,
        grad_entropy=grad_entropy,
        entropy=entropy,
        out=None if grad is None else _window(grad, row0, rows),
    )
    return out if grad is None else grad


@_token_logps_bwd.register_fake
def _(logits, row0, rows, labels, lse, grad_logps, grad_entropy, entropy, backend, ignore_index, temperature):
    return logits.new_empty(logits.shape)  # contiguous, as the launchers return it


@torch.library.custom_op("dpo_kernels::token_logps_bwd_", mutates_args=("logits",))
def _token_logps_bwd_inplace(
    logits: torch.Tensor,
    row0: int,
    rows: int,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    backend: str,
    ignore_index: int,
    temperature: float,
) -> None:
    """Overwrites the whole `logits` with its gradient (zero outside the window)."""
    _zero_outside(logits, row0, rows)  # the window's rows are read below, the others never
    dispatch.token_kernels(backend).logprobs_bwd(
        _window(logits, row0, rows),
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
def _(logits, row0, rows, labels, lse, grad_logps, grad_entropy, entropy, backend, ignore_index, temperature):
    return None


def _token_logps_setup(ctx, inputs, output):
    logits, row0, rows, labels, backend, ignore_index, temperature, _, inplace_grad = inputs
    _, lse, stats = output
    ctx.save_for_backward(logits, labels, lse, stats)
    ctx.window = (row0, rows)
    ctx.options = (backend, ignore_index, temperature)
    ctx.inplace_grad = inplace_grad


def _token_logps_backward(ctx, grad_logps, _grad_lse, grad_stats):
    logits, labels, lse, stats = ctx.saved_tensors
    grad_entropy = grad_stats[_ENTROPY] if grad_stats is not None and stats.shape[0] > 0 else None
    args = (
        logits,
        *ctx.window,
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
    return dlogits, *(None,) * 8


token_logps_fwd.register_autograd(_token_logps_backward, setup_context=_token_logps_setup)


def seq_starts(shape: torch.Size, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Start offsets [S+1] of every sequence in the flattened tokens (padded rows or packed cu_seqlens)."""
    if cu_seqlens is not None:
        return cu_seqlens.to(torch.int64)
    S, T = shape
    return torch.arange(S + 1, device=device, dtype=torch.int64) * T


# The Triton segment sums are torch custom ops as well (torch.compile keeps them in its graph). Sums are float64.


@torch.library.custom_op("dpo_kernels::segments_fwd", mutates_args=())
def segments_fwd(
    values: torch.Tensor, labels: torch.Tensor, seq_starts: torch.Tensor, ignore_index: int, ld_alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from dpo_kernels.ops import segments

    return segments.segments_fwd(values, labels, seq_starts, ignore_index=ignore_index, ld_alpha=ld_alpha)


@segments_fwd.register_fake
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


segments_fwd.register_autograd(_segments_backward, setup_context=_segments_setup)


def config_args(config: L.LossConfig) -> tuple:
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


def kernel_loss(
    pc, pr, rc, rr, config: L.LossConfig, *, lengths, pair_weights, sft_sum, sft_count
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton loss kernel: (loss, losses, rewards [2, B], metrics), fp32; float64 log-probs are read as such."""
    f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    nc, nr = (None, None) if lengths is None else (f32(lengths[0]), f32(lengths[1]))
    loss, losses, _, rewards, metrics = _dpo_fwd(
        pc, pr, rc, rr, sft_sum, nc, nr, f32(pair_weights), f32(sft_count), *config_args(config)
    )
    return loss, losses, rewards, metrics


# The fused Triton path is one custom op: logits → token log-probs → sequence sums → loss, with the per-token
# gradient of the (scalar) loss computed in the forward; the backward is one pass over the logits.


@torch.library.custom_op("dpo_kernels::dpo_from_logits_fwd", mutates_args=())
def dpo_from_logits_fwd(
    logits: torch.Tensor,
    row0: int,
    rows: int,
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
        _window(logits, row0, rows),
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        return_stats=with_stats,
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


@dpo_from_logits_fwd.register_fake
def _(logits, row0, rows, labels, seq_starts, rc, rr, ignore_index, temperature, ld_alpha, use_weighting, with_stats,
      _inplace, loss_codes, *_):  # fmt: skip
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
    logits, row0, rows, labels, seq_starts, _, _, ignore_index, temperature, ld_alpha, _, _, inplace_grad = inputs[:13]
    ctx.save_for_backward(logits, labels, seq_starts, output[5], output[6], output[7])
    ctx.window = (row0, rows)
    ctx.options = (ignore_index, temperature, ld_alpha, inplace_grad)


def _dpo_from_logits_backward(ctx, grad_loss, _losses, _rewards, _metrics, grad_sums, _n, _lse, _grad_tokens):
    logits, labels, seq_starts, n_tokens, lse, grad_tokens = ctx.saved_tensors
    ignore_index, temperature, ld_alpha, inplace_grad = ctx.options
    g = grad_tokens * grad_loss
    if grad_sums is not None:  # a term on out.chosen_logps / rejected_logps (e.g. an RPO-style NLL)
        g = g + _spread(grad_sums[:2], labels, seq_starts, n_tokens, ignore_index, ld_alpha)[0]
    args = (logits, *ctx.window, labels, lse, g.contiguous(), None, None, "triton", ignore_index, temperature)
    if inplace_grad:
        _token_logps_bwd_inplace(*args)
        dlogits = logits
    else:
        dlogits = _token_logps_bwd(*args)
    return (dlogits, *(None,) * 19)


dpo_from_logits_fwd.register_autograd(_dpo_from_logits_backward, setup_context=_dpo_from_logits_setup)


# The fused head is one pair of torch custom ops over two implementations: the tile path (chunked.py: vendor GEMMs +
# the row kernels of the call's backend; the default) and, with impl="fused", the all-Triton head of
# ops/linear_logprobs.py. One autograd for both, so torch.compile keeps them in its graph. The backward runs under
# the forward's autocast state, so that its recomputed tiles are the forward's.


@torch.library.custom_op("dpo_kernels::linear_logps_fwd", mutates_args=())
def _linear_logps_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    backend: str,
    impl: str,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    return_stats: bool,
    rows: int,
    pad: bool,
    keep_logits: str,
    fp32_tile: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps, lse, stats or [0, N], the scored rows' indices, the kept tiles or [0, V])."""
    transform = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    scored = torch.nonzero(labels != ignore_index).squeeze(1)
    kept = None
    if impl == "fused":
        from dpo_kernels.ops import linear_logprobs

        logps, lse, stats = linear_logprobs.linear_logprobs_fwd(
            hidden, weight, labels, bias=bias, **transform, return_stats=return_stats
        )
    else:
        dtype = chunked.tile_dtype(hidden, weight, fp32_tile)
        rows = rows or chunked.chunk_rows(weight.shape[0], dtype, pad)
        n = scored.numel()
        total = -(-n // rows) * rows if pad else n  # the kept tiles' rows
        keep = keep_logits == "always" or (keep_logits == "auto" and chunked.fits(total, weight.shape[0], dtype))
        logps, lse, stats, kept = chunked.linear_logprobs_fwd(
            hidden,
            weight,
            labels,
            scored,
            kernels=dispatch.token_kernels(backend),
            bias=bias,
            **transform,
            return_stats=return_stats,
            rows=rows,
            pad=pad,
            keep=keep,
            fp32=fp32_tile,
        )
    empty = hidden.new_empty(0, hidden.shape[0], dtype=torch.float32)
    return logps, lse, empty if stats is None else stats, scored, weight.new_empty(0, 0) if kept is None else kept


@_linear_logps_fwd.register_fake
def _(hidden, weight, bias, labels, backend, impl, ignore_index, temperature, softcap, logit_scale, return_stats, *_):
    N = hidden.shape[0]
    f32 = lambda *shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    ctx = torch.library.get_ctx()
    scored = hidden.new_empty(ctx.new_dynamic_size(), dtype=torch.int64)
    kept = hidden.new_empty(ctx.new_dynamic_size(), ctx.new_dynamic_size())
    return f32(N), f32(N), f32(4 if return_stats else 0, N), scored, kept


@torch.library.custom_op("dpo_kernels::linear_logps_bwd", mutates_args=())
def _linear_logps_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scored: torch.Tensor,
    kept: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None,
    backend: str,
    impl: str,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    rows: int,
    pad: bool,
    weight_grad: bool,
    autocast_enabled: bool,
    autocast_dtype: torch.dtype,
    fp32_tile: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    transform = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    grads = dict(grad_entropy=grad_entropy, entropy=entropy, weight_grad=weight_grad)
    with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=autocast_enabled):
        if impl == "fused":
            from dpo_kernels.ops import linear_logprobs

            dh, dw, db = linear_logprobs.linear_logprobs_bwd(
                hidden, weight, labels, lse, grad_logps, bias=bias, **transform, **grads
            )
        else:
            dh, dw, db = chunked.linear_logprobs_bwd(
                hidden,
                weight,
                labels,
                scored,
                lse,
                grad_logps,
                kernels=dispatch.token_kernels(backend),
                bias=bias,
                **transform,
                **grads,
                kept=kept if kept.numel() else None,
                rows=rows or chunked.chunk_rows(weight.shape[0], chunked.tile_dtype(hidden, weight, fp32_tile), pad),
                pad=pad,
                fp32=fp32_tile,
            )
    # a custom op returns tensors (none aliasing another): an empty one stands for "no gradient"
    return dh, hidden.new_empty(0) if dw is None else dw, hidden.new_empty(0) if db is None else db


@_linear_logps_bwd.register_fake
def _(hidden, weight, bias, labels, scored, kept, lse, grad_logps, grad_entropy, entropy, *args):
    weight_grad = args[8]
    dw = torch.empty_like(weight) if weight_grad else hidden.new_empty(0)
    db = torch.empty_like(bias) if weight_grad and bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), dw, db


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type without autocast
        return False, torch.float32


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, backend, impl, ignore_index, temperature, softcap, logit_scale, *flags = inputs
    _, rows, pad, _, fp32_tile = flags  # return_stats, rows, pad, keep_logits, fp32_tile
    _, lse, stats, scored, kept = output
    ctx.save_for_backward(hidden, weight, bias, labels, scored, kept, lse, stats)
    ctx.set_materialize_grads(False)  # no zero gradient for the outputs nothing reads (the kept tiles)
    ctx.options = (backend, impl, ignore_index, temperature, softcap, logit_scale, rows, pad)
    ctx.autocast = _autocast_state(hidden.device.type)
    ctx.fp32_tile = fp32_tile


def _linear_backward(ctx, grad_logps, _grad_lse, grad_stats, _scored, _kept):
    hidden, weight, bias, labels, scored, kept, lse, stats = ctx.saved_tensors
    has_entropy_grad = grad_stats is not None and stats.shape[0] > 0
    weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dh, dw, db = _linear_logps_bwd(
        hidden,
        weight,
        bias,
        labels,
        scored,
        kept,
        lse,
        None if grad_logps is None else grad_logps.float().contiguous(),
        grad_stats[_ENTROPY].float().contiguous() if has_entropy_grad else None,
        stats[_ENTROPY] if has_entropy_grad else None,
        *ctx.options,
        weight_grad,
        *ctx.autocast,
        ctx.fp32_tile,
    )
    dw = dw if weight_grad else None
    db = db if weight_grad and bias is not None else None
    return dh, dw, db, *(None,) * 12


_linear_logps_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    backend: str,
    *,
    impl: str = "tile",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    keep_logits: bool | str = "auto",
    deterministic: bool = False,
    fp32_tile: bool = False,
    rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused head on [N, H] rows, differentiable: (logps [N], stats [4, N] or [0, N]). No checks: callers
    validate (the public functions; tests that shrink the chunks with `rows`)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    keep = {True: "always", False: "never", "auto": "auto"}[keep_logits] if needs_grad else "never"
    logps, _, stats, _, _ = _linear_logps_fwd(
        hidden,
        weight,
        bias,
        labels,
        backend,
        impl,
        ignore_index,
        temperature,
        softcap,
        logit_scale,
        return_stats,
        rows,
        deterministic,
        keep,
        fp32_tile,
    )
    return logps, stats
