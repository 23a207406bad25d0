"""Vocabulary-parallel log-probs, fused lm_head and DPO loss over torch.distributed.

When the logits are sharded over the vocabulary (`[N, V/tp]` per rank, e.g. the output of a `ColwiseParallel`
lm_head, or a DTensor with `Shard(-1)` as torch's `loss_parallel` takes it) or the output layer's weight is
(`[V/tp, H]` per rank), every rank computes the same per-token log-probs, TRL's statistics and DPO losses as one
process holding the whole vocabulary would, without gathering the logits.

Forward: the local row kernels (`logprobs_partial_fwd`, Triton or native) write per-row partials of their shard
(`PARTIALS`: the shard's max m of z = logits / T, Σ e with e = exp(z − m), the label's z where the shard holds
it; with stats Σ e·(z − m), Σ e², the shard's part of the mean logit and the max of z before the label's column).
Then exactly two collectives per call, over the shards' process group:

    1. all_reduce(MAX) of [m, max before the label]                    → the row max M, is_top1's bound
    2. all_reduce(SUM) of the partials moved to M (α = exp(m − M)):
       α Σ e,  z_y − M (its owner only),  α (Σ e(z − m) + (m − M) Σ e),  α² Σ e²,  mean part,  is_top1 vote

    lse = M + log L,  logp = (z_y − M) − log L,  entropy = log L − S1 / L,  log Σ p² = log S2 − 2 log L

with L, S1, S2 the summed rows. The first-argmax tie rule of is_top1 holds across shards: the label's owner votes
1 when z_y ≥ M and z_y exceeds every z of a lower column, the max before the label being the maximum over all
shards. fp32 payload per token: 4 + 8 bytes (log-probs only), 8 + 24 with stats; all-gathering bf16 logits instead
moves 2·(tp − 1)/tp·V bytes per token and rank (`bench/bench_parallel.py`). With `ref_logits` / `ref_hidden` the
reference's partials ride in the same two collectives.

Backward. Logits in: the local kernel with the combined lse and entropy writes the shard's gradient; no
communication. Weight in: the tiles are recomputed, grad_weight and grad_bias stay local (each rank owns its rows),
grad_hidden is summed over the shards with one all-reduce. The weight's tiles are chunked.py's (vendor GEMMs into
fp32 tiles, the shard's columns offset by its vocab_start), the loop of one process's head with
`tile_dtype=torch.float32`; only the finalize differs (the partials' combine instead of the finalized kernels).

Every rank of the group must call with the same labels, options and upstream gradients (a loss computed from the
replicated outputs, as with torch's `loss_parallel`); the outputs are plain tensors, the same on every rank.
Shards may be uneven and in any order of ranks, but together must tile [0, V) exactly once (DTensors do). The
kernels run on the "triton" backend (CUDA, or the interpreter) or the native "cpu" one; float64 and the reference
backend are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dpo_kernels import api, checks, chunked, dispatch
from dpo_kernels import losses as L
from dpo_kernels import pairs as P
from dpo_kernels.results import STATS, DPOOutput, SequenceLogps, TokenStats

__all__ = [
    "PARTIALS",
    "VocabShard",
    "dpo_loss_from_hidden",
    "dpo_loss_from_logits",
    "linear_token_logps",
    "token_logps",
    "vocab_shard",
]

# The rows of the kernels' partial output (`logprobs_partial_fwd`), the first three without stats.
PARTIALS = ("max", "sum_exp", "label_logit", "sum_exp_shift", "sum_exp_sq", "mean_part", "max_before_label")
_ENTROPY = STATS.index("entropy")


@dataclass(frozen=True)
class VocabShard:
    """This rank's columns [start, start + size) of a vocabulary of `total`, and the group of all the shards."""

    group: dist.ProcessGroup | None
    start: int
    size: int
    total: int

    @property
    def stop(self) -> int:
        return self.start + self.size


def vocab_shard(
    x: torch.Tensor,
    dim: int,
    *,
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    name: str = "logits",
) -> tuple[torch.Tensor, VocabShard]:
    """The local shard of `x` along its vocabulary dimension `dim` and where it lies.

    A DTensor must be sharded on `dim` over a 1-D mesh (`Shard(dim)`, torch.chunk's even split, as
    `distribute_tensor` and `ColwiseParallel` make it); its local tensor keeps the autograd graph. A plain tensor is
    the shard itself and needs `process_group`, `vocab_start` (its first global column) and `vocab_size` (V).
    """
    if _is_dtensor(x):
        from torch.distributed.tensor import Shard

        if process_group is not None or vocab_start is not None or vocab_size is not None:
            raise ValueError(
                f"{name} is a DTensor: its mesh and placement say where its shard lies; drop "
                "process_group, vocab_start and vocab_size"
            )
        dim = dim % x.ndim
        if x.device_mesh.ndim != 1 or tuple(x.placements) != (Shard(dim),):
            raise ValueError(
                f"{name} must be a DTensor sharded on its vocabulary dimension over a 1-D mesh "
                f"(placements (Shard({dim}),)), got {tuple(x.placements)} on a {x.device_mesh.ndim}-D "
                "mesh"
            )
        total, parts, rank = x.shape[dim], x.device_mesh.size(), x.device_mesh.get_local_rank()
        chunk = -(-total // parts)  # torch.chunk's split: ceil(V / tp) columns, the last ranks fewer or none
        start = min(rank * chunk, total)
        local = x.to_local()
        shard = VocabShard(x.device_mesh.get_group(), start, local.shape[dim], total)
        if shard.size != min(chunk, total - start):
            raise ValueError(
                f"{name}: a local shard of {shard.size} columns at rank {rank} is not torch.chunk's "
                f"split of V = {total} over {parts} ranks"
            )
    else:
        if process_group is None or vocab_start is None or vocab_size is None:
            raise ValueError(
                f"a plain {name} tensor is one vocabulary shard: pass process_group, vocab_start (its "
                "first global column) and vocab_size (V), or a DTensor sharded on the vocabulary"
            )
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        local = x
        shard = VocabShard(process_group, int(vocab_start), x.shape[dim] if x.ndim else 0, int(vocab_size))
        if not 0 <= shard.start <= shard.stop <= shard.total:
            raise ValueError(
                f"{name}: the shard [{shard.start}, {shard.stop}) (vocab_start, vocab_start + its "
                f"{shard.size} columns) must lie in the vocabulary [0, {shard.total})"
            )
    if local.ndim and local.shape[dim] == 0:
        raise ValueError(
            f"{name}: this rank's vocabulary shard is empty (V = {shard.total} over more ranks than "
            "columns): every rank needs at least one column"
        )
    return local, shard


def _kernels(x: torch.Tensor, backend: str | None, name: str):
    """The launchers (`logprobs_partial_fwd`, `logprobs_bwd`) for `x`'s device and dtype: Triton or native."""
    chosen = dispatch.pick(x, backend)
    if chosen == "reference":
        raise ValueError(
            f"vocabulary-parallel {name} run on the triton or cpu kernels; {x.dtype} on {x.device} "
            "picks the reference backend (float64, or the native CPU kernels not built)"
        )
    return dispatch.token_kernels(chosen)


# ----------------------------------------------------------------------------------------------------------------
# The combine: two collectives for any number of partial tensors


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is None:  # one process holds every block (chunked.py's vocabulary split): nothing to reduce
        return t
    dist.all_reduce(t, op=op, group=group)  # through the module attribute: the tests count the calls
    return t


def _shift(m: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, α): d = m − M moves sums relative to m onto M, α = e^d. A shard of −inf only (m = −inf) adds nothing: d =
    0, α = 0; d ≥ −1e4 (e^d is 0 already), so that d · Σe is never −inf · 0. NaN in m or M stays NaN."""
    empty = m == -math.inf
    d = torch.where(empty, 0.0, (m - M).clamp(min=-1e4))
    return d, torch.where(empty, 0.0, d.exp())


def merge_partials(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Partials of consecutive column tiles of one shard ([P, n] each) → the shard's partials."""
    if len(pieces) == 1:
        return pieces[0]
    p = torch.stack(pieces)  # [C, P, n]
    M = p[:, 0].amax(0)
    d, alpha = _shift(p[:, 0], M)
    rows = [M, (alpha * p[:, 1]).sum(0), p[:, 2].sum(0)]
    if p.shape[1] == len(PARTIALS):
        rows += [(alpha * (p[:, 3] + d * p[:, 1])).sum(0), (alpha * alpha * p[:, 4]).sum(0), p[:, 5].sum(0)]
        rows.append(p[:, 6].amax(0))
    return torch.stack(rows)


def combine_partials(
    parts: list[torch.Tensor], labels: torch.Tensor, shard: VocabShard, ignore_index: int
) -> list[tuple]:
    """Each [P, N] partials tensor of this rank → (logps, lse, stats [4, N] | None), the same on every rank, in two
    all-reduces for all of them together."""
    with_stats = [p.shape[0] == len(PARTIALS) for p in parts]
    maxes = [p[[0, 6]] if s else p[:1] for p, s in zip(parts, with_stats)]
    # the shards' tiling rides along: max(−start), max(stop) here, Σ columns in the SUM (exact in fp32 below 2^24)
    span = torch.tensor([-shard.start, shard.stop], dtype=torch.float32, device=parts[0].device)
    flat = _all_reduce(torch.cat([*(m.reshape(-1) for m in maxes), span]), dist.ReduceOp.MAX, shard.group)
    flat, span = flat[:-2], flat[-2:]
    maxes = [m.view_as(ref) for m, ref in zip(flat.split([m.numel() for m in maxes]), maxes)]
    owned = (labels >= shard.start) & (labels < shard.stop)
    sums = []
    for p, s, mx in zip(parts, with_stats, maxes):
        M = mx[0]
        d, alpha = _shift(p[0], M)
        rows = [alpha * p[1], torch.where(owned, p[2] - M, 0.0)]
        if s:
            top1 = owned & (p[2] >= M) & (p[2] > mx[1])
            rows += [alpha * (p[3] + d * p[1]), alpha * alpha * p[4], p[5], top1.float()]
        sums.append(torch.stack(rows))
    columns = torch.tensor([float(shard.size)], device=parts[0].device)
    flat = _all_reduce(torch.cat([*(t.reshape(-1) for t in sums), columns]), dist.ReduceOp.SUM, shard.group)
    flat, columns = flat[:-1], flat[-1]
    _check_tiling(span, columns, shard)
    ignored = labels == ignore_index
    # the NaN policy: a NaN or +inf logit anywhere makes L NaN, a row of −inf only L = 0, a label outside [0, V)
    valid = (labels >= 0) & (labels < shard.total)
    out = []
    for t, mx, s in zip(flat.split([t.numel() for t in sums]), maxes, with_stats):
        t = t.view(-1, labels.shape[0])
        L_, log_L = t[0], t[0].log()
        ok = (L_ > 0) & valid
        logps, lse = _final(t[1] - log_L, ok, ignored), _final(mx[0] + log_L, ok, ignored)
        stats = None
        if s:
            top1 = (ok & ~ignored & (t[5] > 0.5)).float()
            rows = (log_L - t[2] / L_, t[4], top1, t[3].log() - 2.0 * log_L)  # STATS' order
            stats = torch.stack([row if row is top1 else _final(row, ok, ignored) for row in rows])
        out.append((logps, lse, stats))
    return out


def _check_tiling(span: torch.Tensor, columns: torch.Tensor, shard: VocabShard) -> None:
    """The ranks' shards must tile [0, V) exactly once, or every output is silently wrong: the first column 0, the
    last V, V columns in all (an overlap or a gap alone always shows; only an overlap and a gap of the same width
    together would not). Read on the host for CPU tensors, a device-side assertion elsewhere (no sync)."""
    ok = (span[0] == 0) & (span[1] == shard.total) & (columns == shard.total)
    message = (
        f"the ranks' vocabulary shards must tile [0, {shard.total}) exactly once (each rank's vocab_start is its "
        "first global column, and the column counts add up to vocab_size)"
    )
    if span.device.type != "cpu":
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(f"{message}; this rank has [{shard.start}, {shard.stop})")


def _final(value: torch.Tensor, ok: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """The NaN policy on a combined output: 0 at ignored rows, NaN where the row is not ok."""
    return torch.where(ignored, 0.0, torch.where(ok, value, math.nan))


# ----------------------------------------------------------------------------------------------------------------
# Logits sharded over the vocabulary


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] → the launchers' [R, T, V] or [N, V] with unit vocab stride ([R, T, V] views are read in place)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x if x.ndim in (2, 3) else x.reshape(-1, x.shape[-1])


class _ShardedLogps(torch.autograd.Function):
    """Log-probs (and stats) of the policy's logits shard, and optionally of the reference's (no gradient), in one
    combine. Backward: the local kernel, no communication."""

    @staticmethod
    def forward(ctx, local, labels, ref_local, shard, kernels, ignore_index, temperature, return_stats):
        opts = dict(vocab_start=shard.start, vocab_size=shard.total, ignore_index=ignore_index, temperature=temperature)
        parts = [kernels.logprobs_partial_fwd(local, labels, **opts, return_stats=return_stats)]
        if ref_local is not None:
            parts.append(kernels.logprobs_partial_fwd(ref_local, labels, **opts))
        outs = combine_partials(parts, labels, shard, ignore_index)
        logps, lse, stats = outs[0]
        stats = logps.new_empty(0, logps.shape[0]) if stats is None else stats
        ref_logps = outs[1][0] if ref_local is not None else logps.new_empty(0)
        ctx.save_for_backward(local, labels, lse, stats)
        ctx.options = (shard, kernels, ignore_index, temperature)
        ctx.mark_non_differentiable(ref_logps)
        return logps, stats, ref_logps

    @staticmethod
    def backward(ctx, grad_logps, grad_stats, _):
        local, labels, lse, stats = ctx.saved_tensors
        shard, kernels, ignore_index, temperature = ctx.options
        has_entropy = grad_stats is not None and stats.shape[0] > 0
        dlocal = kernels.logprobs_bwd(
            local,
            labels,
            lse,
            None if grad_logps is None else grad_logps.float().contiguous(),
            ignore_index=ignore_index,
            temperature=temperature,
            grad_entropy=grad_stats[_ENTROPY].float().contiguous() if has_entropy else None,
            entropy=stats[_ENTROPY].contiguous() if has_entropy else None,
            vocab_start=shard.start,
        )
        return dlocal, *(None,) * 7


def _token_stats(stats: torch.Tensor, shape: torch.Size) -> TokenStats:
    """[4, N] stats rows → `TokenStats` shaped like the labels; only the entropy keeps its graph."""
    rows = {name: (row if name == "entropy" else row.detach()).view(shape) for name, row in zip(STATS, stats)}
    return TokenStats(**{**rows, "is_top1": rows["is_top1"] > 0.5})


def _check_global_labels(local: torch.Tensor, labels, shard: VocabShard, ignore_index: int, name: str) -> None:
    """The checks of the single-process call, on a [..., V] stand-in of the whole logits (no memory)."""
    stand_in = local.new_empty(()).expand(*local.shape[:-1], shard.total)
    checks.check_logits_labels(stand_in, labels, ignore_index, name=name)


def _sharded_logps(logits, labels, ref_logits, *, shard_args, ignore_index, temperature, return_stats, backend):
    """(logps [...], stats [4, N] | None, ref logps [...] | None, the local logits) of sharded logits."""
    local, shard = vocab_shard(logits, -1, **shard_args)
    _check_global_labels(local, labels, shard, ignore_index, "logits")
    temperature = checks.check_temperature(temperature)
    kernels = _kernels(local, backend, "log-probs")
    ref_local = None
    if ref_logits is not None:
        ref_local, ref_shard = vocab_shard(ref_logits, -1, **shard_args, name="ref_logits")
        if ref_local.shape != local.shape or (ref_shard.start, ref_shard.total) != (shard.start, shard.total):
            raise ValueError(
                f"ref_logits must be sharded as logits are: local shape {tuple(ref_local.shape)} at "
                f"column {ref_shard.start}, logits' {tuple(local.shape)} at {shard.start}"
            )
        ref_local = _rows(ref_local.detach())
    flat = labels.reshape(-1).long()
    args = (flat, ref_local, shard, kernels, ignore_index, temperature, return_stats)
    logps, stats, ref_logps = _ShardedLogps.apply(_rows(local), *args)
    ref_logps = ref_logps.view(labels.shape) if ref_local is not None else None
    return logps.view(labels.shape), (stats if return_stats else None), ref_logps, local


_SHARD_DOC = """process_group, vocab_start, vocab_size: for a plain tensor that is this rank's shard: the group of all
            the shards, its first global column and V. Leave them out for a DTensor sharded on the vocabulary."""


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """`dpo_kernels.token_logps` of logits sharded over the vocabulary: two all-reduces forward, none backward.

    Args:
        logits: this rank's shard [..., V_shard] of the logits [..., V] (fp32 / bf16 / fp16): a DTensor with
            `Shard(-1)` on a 1-D mesh, or a plain tensor with the three arguments below.
        labels: [...] global labels in [0, V) or `ignore_index`, the same on every rank.
        {shard}
        ignore_index, temperature, return_stats, backend: as in `dpo_kernels.token_logps`.

    Returns:
        fp32 log-probs shaped like `labels` (and `TokenStats`), the same on every rank; differentiable with respect
        to the local shard (the gradient of the DTensor is a DTensor of the same placement).

    Example:
        >>> # lm_head = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False): a DTensor of the logits
        >>> lp = dpo_kernels.parallel.token_logps(model(input_ids).logits, shifted_labels)
    """
    logps, stats, _, _ = _sharded_logps(
        logits,
        labels,
        None,
        shard_args=dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size),
        ignore_index=ignore_index,
        temperature=temperature,
        return_stats=return_stats,
        backend=backend,
    )
    return (logps, _token_stats(stats, labels.shape)) if return_stats else logps


def _loss(
    lp,
    stats,
    ref_lp,
    labels,
    rc_rr,
    *,
    cu_seqlens,
    ld_alpha,
    use_weighting,
    return_stats,
    ignore_index,
    config: L.LossConfig,
    backend: str,
) -> DPOOutput:
    """Token log-probs (the same on every rank) → sequence sums → the loss, as the single-process functions do
    (`pairs.loss_from_sequences`, on `backend`: the one the kernels ran on)."""
    mask = labels != ignore_index  # the scored mask, not the labels: labels of only 0s and 1s are labels here
    sums = dict(ld_alpha=ld_alpha, cu_seqlens=cu_seqlens, backend=backend)
    token_stats = _token_stats(stats, labels.shape) if stats is not None else None
    seq: SequenceLogps = api.sequence_logps(lp, mask, token_stats=token_stats, **sums)
    if rc_rr is None:
        ref = api.sequence_logps(ref_lp, mask, **sums).logps.detach()
        B = ref.shape[0] // 2
        rc_rr = ref[:B], ref[B:]
    options = dict(config=config, use_weighting=use_weighting, return_stats=return_stats)
    return P.loss_from_sequences(seq, *rc_rr, **options, backend=backend, out_dtype=torch.float32)


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
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: str | None = None,
    **loss_options,
) -> DPOOutput:
    """`dpo_kernels.dpo_loss_from_logits` of logits sharded over the vocabulary: two all-reduces forward (the
    reference's `ref_logits`, sharded alike, ride in them), none backward.

    Args:
        logits: this rank's shard of padded [2B, T, V] or packed [N, V] logits (see `token_logps`).
        {shard}
        everything else: as in `dpo_kernels.dpo_loss_from_logits` (all 15 loss types and their mixes, LD-DPO, WPO,
            TRL's metrics).

    Returns:
        `DPOOutput` (fp32), the same on every rank; `loss` is differentiable with respect to the local shard.
    """
    config = L.loss_config(**loss_options, use_weighting=use_weighting)
    ld_alpha = checks.check_ld_alpha(ld_alpha)
    shard_args = dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {tuple(logits.shape)}")
    B = checks.check_even_rows(checks.check_layout(logits, cu_seqlens, "logits", "V"))
    computed = None if ref_logits is None else "ref_logits"
    rc_rr = P.precomputed_reference(ref_chosen_logps, ref_rejected_logps, computed, reference_free, B, logits.device)
    lp, stats, ref_lp, local = _sharded_logps(
        logits,
        labels,
        ref_logits,
        shard_args=shard_args,
        ignore_index=ignore_index,
        temperature=temperature,
        return_stats=return_stats or use_weighting,
        backend=backend,
    )
    return _loss(
        lp,
        stats,
        ref_lp,
        labels,
        rc_rr,
        cu_seqlens=cu_seqlens,
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        return_stats=return_stats,
        ignore_index=ignore_index,
        config=config,
        backend=dispatch.pick(local, backend),
    )


# ----------------------------------------------------------------------------------------------------------------
# The output layer's weight sharded over the vocabulary (a ColwiseParallel lm_head)


@dataclass(frozen=True)
class _Head:
    """The fused head's options: the shard, the kernels, the logit transform."""

    shard: VocabShard
    kernels: object
    ignore_index: int
    temperature: float
    softcap: float | None
    logit_scale: float

    def options(self, weight: torch.Tensor) -> dict:
        """The keywords of chunked.py's tile loop for this shard, with fp32 tiles: the numerics of one process's
        head with `tile_dtype=torch.float32`."""
        return dict(
            kernels=self.kernels,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            rows=chunked.chunk_rows(weight.shape[0], torch.float32),
            fp32=True,
        )


def _head_partials(hidden, weight, bias, labels, head: _Head, return_stats: bool) -> torch.Tensor:
    """The shard's partials [3 | 7, N] through the tile head of chunked.py (ignored rows: zeros, never read)."""
    scored = torch.nonzero(labels != head.ignore_index).squeeze(1)
    shard = dict(vocab_start=head.shard.start, vocab_total=head.shard.total)
    opts = head.options(weight)
    return chunked.linear_partials_fwd(
        hidden, weight, labels, scored, bias=bias, **shard, **opts, return_stats=return_stats
    )


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type without autocast
        return False, torch.float32


class _ShardedLinearLogps(torch.autograd.Function):
    """Log-probs (and stats) through the local weight shard, the reference's (no gradient) in the same combine.
    Backward: the tiles recomputed, grad_hidden all-reduced once (fp32), grad_weight and grad_bias local."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref, head, return_stats):
        parts = [_head_partials(hidden, weight, bias, labels, head, return_stats)]
        if ref is not None:
            parts.append(_head_partials(*ref, labels, head, False))
        outs = combine_partials(parts, labels, head.shard, head.ignore_index)
        logps, lse, stats = outs[0]
        stats = logps.new_empty(0, logps.shape[0]) if stats is None else stats
        ref_logps = outs[1][0] if ref is not None else logps.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, stats)
        ctx.head = head
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.mark_non_differentiable(ref_logps)
        return logps, stats, ref_logps

    @staticmethod
    def backward(ctx, grad_logps, grad_stats, _):
        hidden, weight, bias, labels, lse, stats = ctx.saved_tensors
        head = ctx.head
        has_entropy = grad_stats is not None and stats.shape[0] > 0
        scored = torch.nonzero(labels != head.ignore_index).squeeze(1)
        with torch.autocast(hidden.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            dh, dw, db = chunked.linear_logprobs_bwd(
                hidden,
                weight,
                labels,
                scored,
                lse,
                None if grad_logps is None else grad_logps.float().contiguous(),
                bias=bias,
                grad_entropy=grad_stats[_ENTROPY].float().contiguous() if has_entropy else None,
                entropy=stats[_ENTROPY].contiguous() if has_entropy else None,
                weight_grad=ctx.needs_input_grad[1] or ctx.needs_input_grad[2],
                vocab_start=head.shard.start,
                grad_hidden_dtype=torch.float32,
                **head.options(weight),
            )
        _all_reduce(dh, dist.ReduceOp.SUM, head.shard.group)  # the one collective of the backward
        return dh.to(hidden.dtype), dw, db, None, None, None, None


def _check_head(hidden, weight, shard: VocabShard, softcap, logit_scale, name="hidden") -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {checks.describe(hidden)}")
    if weight.ndim != 2 or hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name} must be [..., H] and the weight shard [V_shard, H] with one H, got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if softcap is not None and not (float(softcap) > 0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if not (float(logit_scale) > 0 and math.isfinite(float(logit_scale))):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")


def _bias_shard(bias, shard: VocabShard, shard_args: dict, name: str = "bias") -> torch.Tensor | None:
    """The local [V_shard] bias of the weight shard `shard` (a DTensor sharded alike, or this rank's plain shard)."""
    if bias is None:
        return None
    if bias.ndim != 1 or (not _is_dtensor(bias) and bias.shape[0] != shard.size):
        raise ValueError(
            f"{name} must be this rank's [{shard.size}] shard of the output bias, got shape {tuple(bias.shape)}"
        )
    local, bias_shard = vocab_shard(bias, 0, **shard_args, name=name)
    if (bias_shard.start, bias_shard.size) != (shard.start, shard.size):
        raise ValueError(f"{name} must be sharded as the weight is")
    return local


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _head_operands(hidden, weight, bias) -> tuple:
    """[N, H] rows of the hidden states, the weight and the bias in one dtype, the promoted one (a copy of the
    lower-precision operand where they differ; its gradient comes back in its own dtype)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return tuple(None if t is None else t.to(dtype) for t in (hidden.reshape(-1, hidden.shape[-1]), weight, bias))


def _sharded_linear_logps(
    hidden,
    weight,
    labels,
    *,
    bias,
    ref,
    shard_args,
    ignore_index,
    temperature,
    softcap,
    logit_scale,
    return_stats,
    backend,
):
    """(logps [...], stats [4, N] | None, ref logps [...] | None) through a weight shard; `ref` is (hidden, weight,
    bias) of the reference or None."""
    local_w, shard = vocab_shard(weight, 0, **shard_args, name="weight")
    local_b = _bias_shard(bias, shard, shard_args)
    _check_head(hidden, local_w, shard, softcap, logit_scale)
    _check_global_labels(hidden, labels, shard, ignore_index, "hidden @ weightᵀ")
    kernels = _kernels(hidden, backend, "fused heads")
    head = _Head(
        shard,
        kernels,
        ignore_index,
        checks.check_temperature(temperature),
        None if softcap is None else float(softcap),
        float(logit_scale),
    )
    flat = labels.reshape(-1).long()
    ref_args = None
    if ref is not None:
        ref_hidden, ref_weight, ref_bias = ref
        ref_w, ref_shard = vocab_shard(ref_weight, 0, **shard_args, name="ref_weight")
        if (ref_shard.start, ref_shard.size) != (shard.start, shard.size):
            raise ValueError("ref_weight must be sharded as weight is")
        ref_b = _bias_shard(ref_bias, shard, shard_args, name="ref_bias")
        _check_head(ref_hidden, ref_w, shard, softcap, logit_scale, name="ref_hidden")
        ref_args = tuple(None if t is None else t.detach() for t in _head_operands(ref_hidden, ref_w, ref_b))
    logps, stats, ref_logps = _ShardedLinearLogps.apply(
        *_head_operands(hidden, local_w, local_b), flat, ref_args, head, return_stats
    )
    ref_logps = ref_logps.view(labels.shape) if ref is not None else None
    return logps.view(labels.shape), (stats if return_stats else None), ref_logps


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """`dpo_kernels.linear_token_logps` through an output layer sharded over the vocabulary (a `ColwiseParallel`
    lm_head): the hidden states whole on every rank, the weight [V_shard, H] (and bias [V_shard]) this rank's rows.

    Per chunk of scored rows (and of the shard's columns from `chunked.VOCAB_SPLIT` up): one vendor GEMM into an fp32
    tile, the logit transform, the partial row kernel; then the two all-reduces. Backward: the tiles recomputed
    (chunked.py's backward with the shard's offset), grad_weight and grad_bias local, grad_hidden all-reduced once.

    Args:
        hidden: [..., H], the same on every rank.
        weight, bias: a DTensor sharded on dim 0 (`Shard(0)` on a 1-D mesh, what `ColwiseParallel` makes of
            lm_head.weight and .bias), or this rank's plain shard with the three arguments below.
        {shard}
        everything else: as in `dpo_kernels.linear_token_logps`.

    Returns:
        fp32 log-probs shaped like `labels` (and `TokenStats`), the same on every rank.
    """
    logps, stats, _ = _sharded_linear_logps(
        hidden,
        weight,
        labels,
        bias=bias,
        ref=None,
        shard_args=dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size),
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        return_stats=return_stats,
        backend=backend,
    )
    return (logps, _token_stats(stats, labels.shape)) if return_stats else logps


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
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: str | None = None,
    **loss_options,
) -> DPOOutput:
    """`dpo_kernels.dpo_loss_from_hidden` through an output layer sharded over the vocabulary: two all-reduces
    forward (the reference's, through `ref_weight` sharded alike or the policy's weight, ride in them), one
    all-reduce of grad_hidden backward, none for grad_weight.

    Args:
        hidden: padded [2B, T, H] or packed [N, H] (with `cu_seqlens`), the same on every rank.
        weight, bias, ref_weight, ref_bias: shards of the output layers (see `linear_token_logps`).
        {shard}
        everything else: as in `dpo_kernels.dpo_loss_from_hidden`.

    Returns:
        `DPOOutput` (fp32), the same on every rank; `loss` is differentiable with respect to hidden and the shards.
    """
    config = L.loss_config(**loss_options, use_weighting=use_weighting)  # fail before any GEMM
    ld_alpha = checks.check_ld_alpha(ld_alpha)
    B = checks.check_even_rows(checks.check_layout(hidden, cu_seqlens, "hidden", "H"))
    if ref_hidden is not None and ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's {tuple(hidden.shape)} but for H"
        )
    computed = None if ref_hidden is None else "ref_hidden"
    rc_rr = P.precomputed_reference(ref_chosen_logps, ref_rejected_logps, computed, reference_free, B, hidden.device)
    ref = None
    if ref_hidden is not None:
        ref = (ref_hidden, weight, bias) if ref_weight is None else (ref_hidden, ref_weight, ref_bias)
    lp, stats, ref_lp = _sharded_linear_logps(
        hidden,
        weight,
        labels,
        bias=bias,
        ref=ref,
        shard_args=dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size),
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        return_stats=return_stats or use_weighting,
        backend=backend,
    )
    return _loss(
        lp,
        stats,
        ref_lp,
        labels,
        rc_rr,
        cu_seqlens=cu_seqlens,
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        return_stats=return_stats,
        ignore_index=ignore_index,
        config=config,
        backend=dispatch.pick(hidden, backend),
    )


for _fn in (token_logps, dpo_loss_from_logits, linear_token_logps, dpo_loss_from_hidden):
    _fn.__doc__ = _fn.__doc__.replace("{shard}", _SHARD_DOC)
del _fn
