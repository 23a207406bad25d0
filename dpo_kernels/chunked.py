"""Per-token log-probs from hidden states in plain PyTorch, tile by tile: the fallback of the fused lm_head.

The same math and tiling as `ops/linear_logprobs.py`, for CPU tensors (and any device without the Triton
kernels), so that a training script has one code path. For a token chunk × vocabulary chunk tile:

    y = hidden[rows] @ weight[cols]ᵀ (+ bias[cols]),   z = transform(y)   (fp32; float64 for float64 inputs)

folded into per-token running sums with an online maximum m (natural base here): l = Σ e^(z-m),
s1 = Σ e^(z-m) (z-m), s2 = Σ e^(2(z-m)), Σ z, the label's z and the first argmax, giving

    logp = z_y - lse,  lse = m + log l,  entropy = log l - s1 / l,  log Σ p² = log s2 - 2 log l.

The logits never exist beyond one tile. Only the scored tokens (label != ignore_index) are computed (index_select
of their rows, results scattered back). The backward recomputes every tile and accumulates grad_hidden and
grad_weight in fp32 (float64 for float64 inputs):

    dz = g (1[v = y] - p) - gH p (z - (lse - entropy)),   dy = dz · dz/dy,   dH += dy W,  dW += dyᵀ h,  db += Σ dy

Under torch.autocast the tile's matmul runs in the autocast dtype (y is then rounded to it) and the rest in fp32; the
api saves the forward's autocast state and runs the backward under that same state, wherever the backward runs, so
that the recomputed p is exactly the forward's softmax (Σp = 1, a bias gradient summing to 0).

NaN policy, that of every backend (ops/logprobs.py): ignored tokens give 0 everywhere and no gradient (their hidden
rows are never read); a token whose logits hold a NaN or +inf or are all -inf, or whose label is outside [0, V),
gives NaN logp, lse, entropy, mean z and log Σ p², is_top1 0, and a NaN dz row. Any finite z works (sums relative to
the running max, clamped exponents, the mean summed as Σ z 2^-k with 2^k >= V).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

TOKEN_CHUNK = 2048
VOCAB_CHUNK = 16384  # 2048 x 16384 fp32 tiles: 128 MiB each, a few alive at a time


class _Options(NamedTuple):
    ignore_index: int
    temperature: float
    softcap: float | None
    logit_scale: float
    return_stats: bool
    token_chunk: int
    vocab_chunk: int


def logit_transform(
    y: torch.Tensor, *, temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """z = y · scale / T, or (softcap / T) · tanh(y · scale / softcap); and dz/dy (a float without softcap)."""
    if softcap is None:
        return y * (logit_scale / temperature), logit_scale / temperature
    u = y * (logit_scale / softcap)
    # 1 / cosh² rather than 1 - tanh²: no cancellation where tanh is near ±1 (cosh overflows to inf → 0 there)
    return torch.tanh(u) * (softcap / temperature), torch.cosh(u).pow(-2) * (logit_scale / temperature)


def _tiles(hidden_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, opts: _Options, compute):
    """Yields (v0, v1, w, z, dz/dy) over the vocabulary chunks for one token chunk (already in `compute`)."""
    V = weight.shape[0]
    for v0 in range(0, V, opts.vocab_chunk):
        v1 = min(V, v0 + opts.vocab_chunk)
        w = weight[v0:v1].to(compute)
        y = (hidden_rows @ w.T).to(compute)  # under autocast: the matmul in its dtype, the rest in `compute`
        if bias is not None:
            y += bias[v0:v1].to(compute)
        z, dz_dy = logit_transform(y, temperature=opts.temperature, softcap=opts.softcap, logit_scale=opts.logit_scale)
        yield v0, v1, w, z, dz_dy


def _label_column(z: torch.Tensor, labels: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """z at each row's label when the label falls in [v0, v1), else 0."""
    inside = (labels >= v0) & (labels < v1)
    col = (labels - v0).clamp(0, v1 - v0 - 1)
    return torch.where(inside, z.gather(1, col[:, None]).squeeze(1), torch.zeros((), dtype=z.dtype))


def _options(ignore_index, temperature, softcap, logit_scale, return_stats, token_chunk, vocab_chunk) -> _Options:
    return _Options(
        ignore_index, float(temperature), softcap, float(logit_scale), return_stats, token_chunk, vocab_chunk
    )


def linear_logprobs_fwd(
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
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H], labels [N] → (logps, lse, stats | None), as `ops.linear_logprobs`'s launcher:
    fp32 (float64 for float64 hidden) [N], [N] and [4, N] (entropy, mean logit, is_top1 as 1.0 / 0.0, log Σ p²),
    0 at ignored rows. Runs under the caller's autocast state (the tile matmul in its dtype)."""
    opts = _options(ignore_index, temperature, softcap, logit_scale, return_stats, token_chunk, vocab_chunk)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    labels = labels.long()
    N, V = hidden.shape[0], weight.shape[0]
    mean_scale = 2.0 ** -max(V - 1, 1).bit_length()  # Σ z 2^-k, 2^k >= V: no overflow at any finite z
    scored = torch.nonzero(labels != opts.ignore_index).squeeze(1)
    logps = hidden.new_zeros(N, dtype=compute)
    lse = hidden.new_zeros(N, dtype=compute)
    stats = hidden.new_zeros(4 if opts.return_stats else 0, N, dtype=compute)
    for t0 in range(0, scored.numel(), opts.token_chunk):
        rows = scored[t0 : t0 + opts.token_chunk]
        h, y_lab = hidden.index_select(0, rows).to(compute), labels[rows]
        n = rows.numel()
        m = h.new_full((n,), -float("inf"))
        l_i, s1, s2, sx, zy = (h.new_zeros(n) for _ in range(5))
        arg = torch.zeros(n, dtype=torch.long, device=h.device)
        for v0, v1, _, z, _ in _tiles(h, weight, bias, opts, compute):
            tile_max = z.amax(1)
            arg = torch.where(tile_max > m, v0 + z.argmax(1), arg)  # strictly larger: the first argmax
            m_new = torch.maximum(m, tile_max)
            # the first tile: sums are 0, keep them; >= -1e4 (exp = 0 already): l_i * shift never 0 · -inf
            shift = torch.where(m == -float("inf"), 0.0, (m - m_new).clamp(min=-1e4))
            alpha = shift.exp()
            t = z - torch.where(m_new == -float("inf"), 0.0, m_new)[:, None]  # no -inf - -inf
            e = t.exp()
            if opts.return_stats:  # e · t at -inf z (or z - m overflowing): t clamped, 0 not 0 · -inf
                s1 = alpha * (s1 + l_i * shift) + (e * t.clamp(min=-1e4)).sum(1)
                s2 = alpha * alpha * s2 + (e * e).sum(1)
                sx += (z * mean_scale).sum(1)
            l_i = alpha * l_i + e.sum(1)
            zy += _label_column(z, y_lab, v0, v1)
            m = m_new
        in_range = (y_lab >= 0) & (y_lab < V)
        ok = (l_i > 0) & in_range  # NaN or +inf z: l NaN; all -inf: l = 0; and bad labels
        log_l = l_i.log()
        logps[rows] = torch.where(ok, zy - m - log_l, float("nan"))
        lse[rows] = torch.where(ok, m + log_l, float("nan"))  # NaN: the backward's p, so dz, NaN there
        if opts.return_stats:
            nan = torch.full((), float("nan"), dtype=compute, device=h.device)
            entropy, mean_z = log_l - s1 / l_i, sx / (mean_scale * V)
            log_sum_sq = s2.log() - 2.0 * log_l
            entropy, mean_z, log_sum_sq = (torch.where(ok, v, nan) for v in (entropy, mean_z, log_sum_sq))
            stats[:, rows] = torch.stack([entropy, mean_z, ((arg == y_lab) & ok).to(compute), log_sum_sq])
    return logps, lse, (stats if opts.return_stats else None)


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    weight_grad: bool = True,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of Σ_i grad_logps[i] · logp[i] + grad_entropy[i] · entropy[i] → (grad_hidden, grad_weight | None,
    grad_bias | None) in the dtypes of hidden, weight and bias, as `ops.linear_logprobs`'s launcher; the tiles are
    recomputed under the caller's autocast state, which must be the forward's (the api restores it)."""
    opts = _options(ignore_index, temperature, softcap, logit_scale, False, token_chunk, vocab_chunk)
    labels = labels.long()
    scored = torch.nonzero(labels != opts.ignore_index).squeeze(1)
    compute = lse.dtype
    grad_hidden = torch.zeros(hidden.shape, dtype=compute, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if weight_grad else None
    grad_bias = torch.zeros(bias.shape, dtype=compute, device=bias.device) if weight_grad and bias is not None else None
    V = weight.shape[0]
    for t0 in range(0, scored.numel(), opts.token_chunk):
        rows = scored[t0 : t0 + opts.token_chunk]
        h, y_lab, lse_c = hidden.index_select(0, rows).to(compute), labels[rows], lse[rows, None]
        g = torch.zeros(rows.numel(), dtype=compute, device=h.device)
        if grad_logps is not None:
            g = torch.where((y_lab >= 0) & (y_lab < V), grad_logps[rows].to(compute), float("nan"))
        if grad_entropy is not None:
            g_h = grad_entropy[rows].to(compute)[:, None]
            mean_z = lse_c - entropy[rows, None]  # E_p[z] = lse - entropy
        dh = torch.zeros_like(h)
        for v0, v1, w, z, dz_dy in _tiles(h, weight, bias, opts, compute):
            p = (z - lse_c).clamp(max=0.0).exp()  # z - lse <= 0 but for lse's rounding; NaN kept
            dz = -g[:, None] * p
            inside = (y_lab >= v0) & (y_lab < v1)
            dz[inside, y_lab[inside] - v0] += g[inside]
            if grad_entropy is not None:
                dz -= g_h * p * torch.where(p > 0, z - mean_z, 0.0)  # 0 at -inf z, not 0 · -inf
            dy = dz * dz_dy
            dh += dy @ w
            if grad_weight is not None:
                grad_weight[v0:v1] += dy.T @ h
            if grad_bias is not None:
                grad_bias[v0:v1] += dy.sum(0)
        grad_hidden[rows] = dh
    return (
        grad_hidden.to(hidden.dtype),
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
