"""The fused lm_head's tile path: vendor GEMMs for the matmuls, our log-prob row kernels for everything else.

For each chunk of scored rows (prompt and padding rows never reach a GEMM):

    forward   y = h_c @ Wᵀ (+ b)                      torch.mm / addmm: cuBLAS, MKL / oneDNN; fp32 accumulation,
                                                        a tile in the matmul's dtype (bf16 for bf16 models), or
                                                        fp32 with `fp32=True` (below)
              logp, lse, stats = rows(y)               the logits-path kernels (Triton on CUDA, csrc on the CPU), the
                                                        transform z = y · scale / T folded into their temperature
    backward  y again (recomputed, or kept: below)
              dy = rows⁻¹(y)                           the row kernels' backward, written into the tile's storage
              dH_c = dy @ W,  dW += dyᵀ @ h_c,  db += Σ dy   (dW, db accumulated in fp32 across chunks)

So a DPO step runs 3 GEMMs per head call plus the recompute, and the logits never exist beyond one tile of
`chunk_rows` × V. With `keep=True` the forward's tiles are kept (one [scored rows, V] buffer in the tile dtype) and
the backward skips the recompute: 2 GEMMs in the backward instead of 3.

A final-logit softcap, z = (c / T) · tanh(y · scale / c), runs as torch element-wise ops on the tile (one extra
pass each way); only Gemma 2 style models pay it.

`fp32=True` writes fp32 tiles from 16-bit operands (stats and log-probs from unrounded logits, twice the tile
memory): through the GEMM's own fp32 output where torch has one (CUDA), else through fp32 copies of the chunk's
operands (on the CPU: the weight upcast UPCAST_COLUMNS rows at a time, 16384 × H × 4 bytes). The backward's GEMMs
take dy rounded to the default tile's dtype. The vocabulary-parallel head (dpo_kernels.parallel) runs this loop
with fp32 tiles over its weight shard (`vocab_start`): its forward returns the shard's row partials
(`linear_partials_fwd`), its backward this shard's part of grad_hidden.

`pad=True` makes every GEMM the same shape, DETERMINISTIC_ROWS rows or fewer for large vocabularies (the last chunk
padded with zero rows, ignored by the row kernels), so that a row's log-prob does not depend on which rows share its
chunk: the vendor GEMMs pick their kernels (and so their reduction order) by shape. The log-probs are batch-invariant
then, and so is grad_hidden (grad_weight is a sum over the batch's rows).

The launchers here take validated inputs from the api (`hidden` [N, H] rows, `weight` [V, H] unit-stride, labels [N],
`scored`: the indices of the rows to compute) and do no checks of their own.
"""

from __future__ import annotations

from types import ModuleType

import torch

TILE_BYTES = 256 * 2**20  # one [chunk_rows, V] tile: 1046 rows at V = 128256 in bf16
MAX_ROWS = 4096  # rows per chunk at most (small vocabularies): GEMMs this tall already run at the card's rate
DETERMINISTIC_ROWS = 512  # pad=True: every forward GEMM has this many rows at most (the padding costs up to that)
KEEP_LOGITS_BYTES = 2 * 2**30  # keep_logits="auto": keep the forward's tiles when all of them fit in this
VOCAB_SPLIT = 2**18  # vocabularies from 256k columns up run in blocks of at most VOCAB_BLOCK columns
VOCAB_BLOCK = 2**17
UPCAST_COLUMNS = 2**14  # fp32 tiles without an fp32-output GEMM: the weight upcast this many rows at a time


def vocab_blocks(V: int) -> list[tuple[int, int]]:
    """The column blocks [v0, v1) of a tile: the whole vocabulary below VOCAB_SPLIT, else even blocks of at most
    VOCAB_BLOCK columns (their row partials are merged: the kernels' partial mode, as across vocabulary shards)."""
    if V < VOCAB_SPLIT:
        return [(0, V)]
    count = -(-V // VOCAB_BLOCK)
    size = -(-V // count)
    return [(v0, min(V, v0 + size)) for v0 in range(0, V, size)]


def chunk_rows(V: int, tile_dtype: torch.dtype, pad: bool = False) -> int:
    """Rows per chunk: a tile (of one vocabulary block) of at most TILE_BYTES (at least one row, at most MAX_ROWS,
    DETERMINISTIC_ROWS with `pad`); independent of the batch, so that `pad=True` gives every call the same GEMM
    shape."""
    width = max(v1 - v0 for v0, v1 in vocab_blocks(V))
    return max(1, min(DETERMINISTIC_ROWS if pad else MAX_ROWS, TILE_BYTES // (width * tile_dtype.itemsize)))


def tile_dtype(hidden: torch.Tensor, weight: torch.Tensor, fp32: bool = False) -> torch.dtype:
    """The tiles' dtype: fp32 with `fp32`, else the dtype torch.mm writes for these operands under the current
    autocast state."""
    if fp32:
        return torch.float32
    device = hidden.device.type
    try:
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    except RuntimeError:  # a device type without autocast
        pass
    return torch.promote_types(hidden.dtype, weight.dtype)


def fits(rows: int, V: int, dtype: torch.dtype) -> bool:
    """keep_logits="auto": whether `rows` kept tiles of V columns fit in KEEP_LOGITS_BYTES."""
    return rows * V * dtype.itemsize <= KEEP_LOGITS_BYTES


def _chunks(n: int, rows: int):
    for c0 in range(0, n, rows):
        yield c0, min(n, c0 + rows)


def _pad_rows(t: torch.Tensor | None, rows: int, value: float = 0) -> torch.Tensor | None:
    """`t` with rows of `value` appended up to `rows` rows (pad=True: one GEMM shape for every chunk)."""
    if t is None or t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), value)])


def _gemm(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, out=None, fp32: bool = False
) -> torch.Tensor:
    """y = h @ Wᵀ (+ b) for the chunk's rows, padded with zero rows to `rows` when it has fewer (pad=True); into
    `out` when given (its dtype must be the operands': not under autocast); an fp32 tile with `fp32`."""
    h = _pad_rows(h, rows)
    if fp32 and tile_dtype(h, weight) != torch.float32:  # 16-bit operands, or autocast
        y = _gemm_fp32(h, weight, bias)
        return y if out is None else out.copy_(y)
    return torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)


def _gemm_fp32(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An fp32 tile from 16-bit operands (or under autocast): the GEMM's own fp32 output where torch has one
    (CUDA), else on fp32 copies of the operands (a 16-bit weight's UPCAST_COLUMNS rows at a time)."""
    with torch.autocast(h.device.type, enabled=False):
        if h.is_cuda and h.dtype == weight.dtype:
            try:
                y = torch.mm(h, weight.T, out_dtype=torch.float32)
                return y if bias is None else y.add_(bias)
            except (TypeError, RuntimeError):  # a torch without out_dtype for this GEMM
                pass
        h = h.float()
        if weight.dtype == torch.float32:  # fp32 parameters under autocast: no copy
            return torch.mm(h, weight.T) if bias is None else torch.addmm(bias.float(), h, weight.T)
        y = h.new_empty(h.shape[0], weight.shape[0])
        for v0 in range(0, weight.shape[0], UPCAST_COLUMNS):
            w = weight[v0 : v0 + UPCAST_COLUMNS].float()
            b = None if bias is None else bias[v0 : v0 + UPCAST_COLUMNS].float()
            y[:, v0 : v0 + UPCAST_COLUMNS] = torch.mm(h, w.T) if b is None else torch.addmm(b, h, w.T)
        return y


def _add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in acc's fp32: in place when the operands are fp32; for 16-bit operands through the GEMM's own
    fp32 output where torch has one (CUDA), else through one temporary of the product in their dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):  # a torch without out_dtype for this GEMM
            pass
    acc += a @ b


def _softcapped(y: torch.Tensor, softcap: float, logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """u = c · tanh(y · scale / c) in y's dtype (the kernels then divide by T), and du/dy in fp32."""
    t = y.float() * (logit_scale / softcap)
    # 1 / cosh² rather than 1 - tanh²: no cancellation where tanh is near ±1 (cosh overflows to inf → 0 there)
    return (torch.tanh(t) * softcap).to(y.dtype), torch.cosh(t).pow(-2) * logit_scale


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scored: torch.Tensor,
    *,
    kernels: ModuleType,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    rows: int,
    pad: bool = False,
    keep: bool = False,
    fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logps [N], lse [N], stats [4, N] or None, kept tiles or None): fp32, 0 at the rows not in `scored`.

    `kernels`: the row kernels' launchers (`logprobs_fwd`, `logprobs_bwd`). `rows`: rows per chunk. `kept`: the
    tiles y of every chunk, [chunks · rows, V] with pad, else [len(scored), V], in the tile dtype."""
    N, V = hidden.shape[0], weight.shape[0]
    n = scored.numel()
    logps = hidden.new_zeros(N, dtype=torch.float32)
    lse = hidden.new_zeros(N, dtype=torch.float32)
    stats = hidden.new_zeros(4, N, dtype=torch.float32) if return_stats else None
    temp = temperature if softcap is not None else temperature / logit_scale
    kept = None
    dtype = tile_dtype(hidden, weight, fp32)
    blocks = vocab_blocks(V)
    if keep and n and len(blocks) == 1:  # split vocabularies recompute (a kept tile would be all of V)
        kept = hidden.new_empty(-(-n // rows) * rows if pad else n, V, dtype=dtype)
    for c0, c1 in _chunks(n, rows):
        idx = scored[c0:c1]
        h = hidden.index_select(0, idx)
        if len(blocks) > 1:
            transform = (ignore_index, temp, softcap, logit_scale, return_stats, rows if pad else 0, fp32)
            lp, ls, st = _split_fwd(h, weight, bias, labels[idx], blocks, kernels, transform)
        else:
            # the GEMM writes the kept tile in place where it can (no autocast cast in between), else a copy
            into = kept[c0 : c0 + (rows if pad else c1 - c0)] if kept is not None and dtype == hidden.dtype else None
            y = _gemm(h, weight, bias, rows if pad else 0, out=into, fp32=fp32)
            if kept is not None and into is None:
                kept[c0 : c0 + y.shape[0]] = y
            y = y[: c1 - c0]
            z = y if softcap is None else _softcapped(y, softcap, logit_scale)[0]
            lp, ls, st = kernels.logprobs_fwd(
                z, labels[idx], ignore_index=ignore_index, temperature=temp, return_stats=return_stats
            )
            del y, z  # before the next chunk's tile exists
        logps[idx], lse[idx] = lp, ls
        if stats is not None:
            stats[:, idx] = st
    return logps, lse, stats, kept


def _chunk_partials(h, weight, bias, labels, blocks, kernels, transform, vocab_start: int, vocab_total: int):
    """One chunk of rows over column blocks of the weight, whose columns are [vocab_start, vocab_start + V) of a
    vocabulary of `vocab_total` (a shard, or the whole): each block's row partials, merged ([3 | 7, n])."""
    from dpo_kernels import parallel

    ignore_index, temp, softcap, logit_scale, stats, pad_rows, fp32 = transform
    n = h.shape[0]
    parts = []
    for v0, v1 in blocks:
        y = _gemm(h, weight[v0:v1], None if bias is None else bias[v0:v1], pad_rows, fp32=fp32)[:n]
        z = y if softcap is None else _softcapped(y, softcap, logit_scale)[0]
        options = dict(ignore_index=ignore_index, temperature=temp, return_stats=stats)
        parts.append(
            kernels.logprobs_partial_fwd(z, labels, vocab_start=vocab_start + v0, vocab_size=vocab_total, **options)
        )
        del y, z
    return parallel.merge_partials(parts)


def _split_fwd(h, weight, bias, labels, blocks, kernels, transform):
    """One chunk of rows over a split vocabulary: the blocks' merged row partials, finalized (the combine of
    `dpo_kernels.parallel` over one process: nothing to reduce)."""
    from dpo_kernels import parallel

    V = weight.shape[0]
    merged = _chunk_partials(h, weight, bias, labels, blocks, kernels, transform, 0, V)
    ((lp, ls, st),) = parallel.combine_partials([merged], labels, parallel.VocabShard(None, 0, V, V), transform[0])
    return lp, ls, st


def linear_partials_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scored: torch.Tensor,
    *,
    kernels: ModuleType,
    vocab_start: int,
    vocab_total: int,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    rows: int,
    fp32: bool = False,
) -> torch.Tensor:
    """The row partials (`parallel.PARTIALS`, [3 | 7, N] fp32, 0 at the rows not in `scored`) of a weight shard:
    its columns are [vocab_start, vocab_start + V) of a vocabulary of `vocab_total`, `labels` index the whole
    vocabulary. The vocabulary-parallel head's forward; `parallel.combine_partials` finalizes them."""
    from dpo_kernels import parallel

    out = hidden.new_zeros(len(parallel.PARTIALS) if return_stats else 3, hidden.shape[0], dtype=torch.float32)
    temp = temperature if softcap is not None else temperature / logit_scale
    transform = (ignore_index, temp, softcap, logit_scale, return_stats, 0, fp32)
    blocks = vocab_blocks(weight.shape[0])
    for c0, c1 in _chunks(scored.numel(), rows):
        idx = scored[c0:c1]
        h = hidden.index_select(0, idx)
        out[:, idx] = _chunk_partials(
            h, weight, bias, labels[idx], blocks, kernels, transform, vocab_start, vocab_total
        )
    return out


def _split_bwd(h, weight, bias, labels, lse, g, g_h, h_e, blocks, kernels, options, grads, vocab_start) -> torch.Tensor:
    """One chunk of rows (padded already with pad=True) over a split vocabulary, backward: each block's tile
    recomputed, its dy from the whole rows' lse (and entropy), dH summed over the blocks in fp32, dW / db written or
    accumulated block by block. Returns dH of the chunk."""
    ignore_index, temp, softcap, logit_scale, fp32 = options
    grad_weight, grad_bias, one_chunk = grads
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for v0, v1 in blocks:
        y = _gemm(h, weight[v0:v1], None if bias is None else bias[v0:v1], 0, fp32=fp32)
        u, du_dy = (y, None) if softcap is None else _softcapped(y, softcap, logit_scale)
        dy = kernels.logprobs_bwd(u, labels, lse, g, ignore_index=ignore_index, temperature=temp, grad_entropy=g_h,
                                  entropy=h_e, inplace=True, vocab_start=(vocab_start or 0) + v0)  # fmt: skip
        if du_dy is not None:
            dy = (dy.float() * du_dy).to(dy.dtype)
        dy = dy.to(tile_dtype(h, weight))  # an fp32 tile's dy, rounded for the GEMMs (else a no-op)
        dh += torch.mm(dy, weight[v0:v1])
        if grad_weight is not None and one_chunk:
            grad_weight[v0:v1] = torch.mm(dy.T, h)
        elif grad_weight is not None:
            _add_mm(grad_weight[v0:v1], dy.T, h)
        if grad_bias is not None:
            grad_bias[v0:v1] += dy.sum(0, dtype=torch.float32)
        del y, u, dy
    return dh


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scored: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    *,
    kernels: ModuleType,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
    weight_grad: bool = True,
    rows: int,
    pad: bool = False,
    fp32: bool = False,
    vocab_start: int | None = None,
    grad_hidden_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden, grad_weight or None, grad_bias or None) in the dtypes of hidden (or `grad_hidden_dtype`),
    weight and bias, of Σ grad_logps · logp + grad_entropy · entropy. The tiles are recomputed under the caller's
    autocast state (the api restores the forward's), or read from `kept` (never modified: a second backward reads
    them again). `vocab_start`: the weight is a vocabulary shard whose columns start there (`labels`, `lse` and
    `entropy` are the whole vocabulary's; grad_hidden is this shard's part of the sum over the shards)."""
    n = scored.numel()
    temp = temperature if softcap is not None else temperature / logit_scale
    grad_hidden = torch.zeros_like(hidden, dtype=grad_hidden_dtype or hidden.dtype)
    one_chunk = 0 < n <= rows
    grad_weight = grad_bias = None
    blocks = vocab_blocks(weight.shape[0])
    if weight_grad:  # one chunk: one GEMM in the weight's dtype (per block); more (or none): accumulated in fp32
        if one_chunk and len(blocks) > 1:
            grad_weight = torch.empty_like(weight)
        elif not one_chunk:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        if bias is not None:
            grad_bias = torch.zeros_like(bias, dtype=torch.float32)
    scratch = None
    for c0, c1 in _chunks(n, rows):
        idx = scored[c0:c1]
        # with pad, every GEMM has `rows` rows (as in the forward), so that dH of a row does not depend on the other
        # rows of the batch either; the padded rows are ignored (dy = 0 there, nothing read)
        m = rows if pad else c1 - c0
        h = _pad_rows(hidden.index_select(0, idx), m)
        y_lab, y_lse = _pad_rows(labels[idx], m, ignore_index), _pad_rows(lse[idx], m)
        g = _pad_rows(None if grad_logps is None else grad_logps[idx], m)
        g_h = _pad_rows(None if grad_entropy is None else grad_entropy[idx], m)
        h_e = _pad_rows(None if grad_entropy is None else entropy[idx], m)
        if len(blocks) > 1:
            options = (ignore_index, temp, softcap, logit_scale, fp32)
            grads = (grad_weight, grad_bias, one_chunk)
            dh = _split_bwd(h, weight, bias, y_lab, y_lse, g, g_h, h_e, blocks, kernels, options, grads, vocab_start)
            grad_hidden[idx] = dh[: c1 - c0].to(grad_hidden.dtype)
            del dh, h
            continue
        if kept is None:
            y = _gemm(h, weight, bias, 0, fp32=fp32)
        else:  # the kept tile is read, the gradient written into a scratch tile (reused across chunks)
            y = kept[c0 : c0 + m]
            scratch = torch.empty_like(y) if scratch is None or scratch.shape[0] < y.shape[0] else scratch
        u, du_dy = (y, None) if softcap is None else _softcapped(y, softcap, logit_scale)
        write_into = u if kept is None or softcap is not None else scratch[:m]
        dy = kernels.logprobs_bwd(
            u,
            y_lab,
            y_lse,
            g,
            ignore_index=ignore_index,
            temperature=temp,
            grad_entropy=g_h,
            entropy=h_e,
            out=None if write_into is u else write_into,
            inplace=write_into is u,
            vocab_start=vocab_start,
        )
        if du_dy is not None:
            dy = (dy.float() * du_dy).to(dy.dtype)
        dy = dy.to(tile_dtype(h, weight))  # an fp32 tile's dy, rounded for the GEMMs (else a no-op)
        grad_hidden[idx] = torch.mm(dy, weight)[: c1 - c0].to(grad_hidden.dtype)  # under autocast: in its dtype
        if weight_grad and one_chunk:
            grad_weight = torch.mm(dy.T, h)
        elif weight_grad:
            _add_mm(grad_weight, dy.T, h)
        if grad_bias is not None:
            grad_bias += dy.sum(0, dtype=torch.float32)
        del y, u, dy, h  # before the next chunk's tile exists
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
