"""How close does a whole DPO loss step (forward + backward) come to its floor, beside TRL's path and plain torch?

    python -m bench.bench_dpo [--device cuda|cpu] [--from-hidden] [--pairs 4 --T 2048 --V 128256 --H 4096] [--save]

From logits (default): bf16 logits [2B, T, V] of the policy, precomputed reference log-probs, sigmoid loss; the
floor is 3·N·V·itemsize bytes (read in the forward, read again and the gradient written in the backward) over the
device-copy bandwidth measured in the same run. From hidden states (`--from-hidden`): hidden [2B·T, H] and the
output weight [V, H]; a quarter of each row is prompt; the floor is three GEMMs of 2·Nc·H·V FLOPs over the
completion tokens Nc at the bf16 matmul rate measured in the same run. "max err" is |loss − float64 loss|.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from bench import _harness as H
from dpo_kernels import reference

IGNORE = -100
LOGITS_SHAPES = [  # (pairs, tokens per row, vocabulary)
    (4, 2048, 128256),  # Llama-3 vocabulary, the first case
    (8, 4096, 151936),  # Qwen-2 vocabulary: 20 GB of bf16 logits (torch's fp32 path needs an H200)
]
HIDDEN_SHAPES = [  # (pairs, tokens per row, vocabulary, hidden size)
    (4, 2048, 128256, 4096),  # Llama-3-8B head: the anchors' table
    (4, 2048, 151936, 896),  # Qwen-2-0.5B head: small H, the softmax traffic matters more
]
CPU_LOGITS_SHAPES = [(2, 256, 32000)]
CPU_HIDDEN_SHAPES = [(1, 128, 8000, 128)]


def _labels(pairs: int, T: int, V: int, device: str) -> torch.Tensor:
    """[2B, T]: a quarter of each row is prompt (ignored), then the completion."""
    labels = torch.randint(0, V, (2 * pairs, T), device=device)
    labels[:, : T // 4] = IGNORE
    return labels


def _loss_from_token_logps(lp: torch.Tensor, labels: torch.Tensor, rc, rr) -> torch.Tensor:
    """Sequence sums and TRL's sigmoid loss in plain fp32 torch (what TRL's trainer does after its log-probs)."""
    seq = reference.sequence_logps(lp.view(labels.shape), labels).logps
    B = labels.shape[0] // 2
    return reference.dpo_loss(seq[:B], seq[B:], rc, rr).loss


def _logits_providers() -> dict[str, Callable | str]:
    """name → fn(logits, labels, rc, rr) → scalar loss, or a string: why the provider is skipped."""
    import dpo_kernels as dk

    providers: dict[str, Callable | str] = {
        "dpo_kernels": lambda x, y, rc, rr: dk.dpo_loss_from_logits(x, y, rc, rr).loss,
        "dpo_kernels inplace": lambda x, y, rc, rr: dk.dpo_loss_from_logits(x, y, rc, rr, inplace_grad=True).loss,
        # plain torch: fp32 log_softmax of the whole logits, gather, sums, loss
        "torch": lambda x, y, rc, rr: reference.dpo_loss_from_logits(x, y, rc, rr).loss,
    }
    try:
        from trl.trainer.utils import selective_log_softmax

        def trl(x, y, rc, rr):  # TRL 1.16's log-prob kernel, then its loss math in torch
            ignored = y == IGNORE
            lp = selective_log_softmax(x, y.masked_fill(ignored, 0), row_mask=~ignored)
            return _loss_from_token_logps(lp, y, rc, rr)

        providers["trl"] = trl
    except ImportError as e:
        providers["trl"] = f"trl not importable: {e}"
    return providers


def _hidden_providers() -> dict[str, Callable | str]:
    """name → fn(hidden, weight, labels, rc, rr) → scalar loss, or a string: why the provider is skipped."""
    import dpo_kernels as dk

    def ours(h, w, y, rc, rr):  # the logits are never built; Triton on CUDA, the chunked torch path on CPU
        return dk.dpo_loss_from_hidden(h.view(*y.shape, -1), w, y, rc, rr).loss

    providers: dict[str, Callable | str] = {"dpo_kernels": ours}

    def torch_plain(h, w, y, rc, rr):  # all positions: matmul, fp32 log_softmax, gather
        return reference.dpo_loss_from_logits((h @ w.T).view(*y.shape, -1), y, rc, rr).loss

    providers["torch"] = torch_plain
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl(h, w, y, rc, rr):  # TRL 1.16's DPOTrainer head: completion positions only, 4096 × 32768 tiles
            flat = y.reshape(-1)
            keep = torch.nonzero(flat != IGNORE).squeeze(1)
            lp_kept = ChunkedLogProbFunction.apply(h[keep], w, None, flat[keep], 1.0, 32768, None, 1.0, ())[0]
            lp = torch.zeros(flat.shape, dtype=lp_kept.dtype, device=h.device).index_put((keep,), lp_kept)
            return _loss_from_token_logps(lp, y, rc, rr)

        providers["trl"] = trl
    except ImportError as e:
        providers["trl"] = f"trl not importable: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y, rc, rr):  # per-token -log p (its backward skips small gradient blocks)
            lp = -linear_cross_entropy(h, w, y.reshape(-1), ignore_index=IGNORE, reduction="none").float()
            return _loss_from_token_logps(lp, y, rc, rr)

        providers["cut_cross_entropy"] = cce
    except ImportError as e:
        providers["cut_cross_entropy"] = f"cut_cross_entropy not importable: {e}"
    return providers


def _measure(name, call, device, floor_ms, work, unit_scale, err) -> H.Row | None:
    try:
        call()  # first call: compilation, extension build
        H._sync(device)
        extra = H.extra_peak_mib(call, device)
        med, p20, p80 = H.time_ms(call, device)
    except Exception as e:  # a peer that fails on this shape or device (OOM included): say so, keep going
        print(f"  skip {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return None
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"  {name:22s} {med:9.3f} ms  {med / floor_ms:5.2f}× floor")
    return H.Row(name, med, p20, p80, work / (med * 1e-3) / unit_scale, med / floor_ms, extra, err)


def run_logits_case(pairs: int, T: int, V: int, device: str, bandwidth: float):
    logits = (torch.randn(2 * pairs, T, V, device=device) * 2).to(torch.bfloat16)
    labels = _labels(pairs, T, V, device)
    rc, rr = torch.randn(2, pairs, device=device) * 10 - 300
    nbytes = 3 * logits.numel() * logits.element_size()
    floor_ms = nbytes / bandwidth * 1e3
    rows = [H.Row("floor", floor_ms, floor_ms, floor_ms, bandwidth / 1e9, 1.0, 0.0, math.nan, "3·N·V·itemsize")]
    small = slice(0, 2 * pairs)  # the float64 check runs on the first 128 positions of every row
    ref = reference.dpo_loss_from_logits(logits[small, :128].double(), labels[small, :128], rc.double(), rr.double())
    for name, fn in _logits_providers().items():
        if isinstance(fn, str):
            print(f"  skip {name}: {fn}")
            continue
        # the in-place variant overwrites its input: a fresh non-leaf buffer, as a layer's output would be
        x = logits.detach().clone().requires_grad_().clone() if "inplace" in name else logits
        x.requires_grad_(True)
        err_x = logits[small, :128].detach().clone().requires_grad_(True).clone()
        err = abs(fn(err_x, labels[small, :128], rc, rr).item() - ref.loss.item())

        def call(fn=fn, x=x):
            return torch.autograd.grad(fn(x, labels, rc, rr), x)

        row = _measure(name, call, device, floor_ms, nbytes, 1e9, err)
        if x.is_leaf:  # the in-place variant's buffer is not
            x.requires_grad_(False)
        if row:
            rows.append(row)
    title = f"DPO step from logits  bf16  B={pairs} pairs  T={T}  V={V}"
    return title, {"mode": "logits", "pairs": pairs, "T": T, "V": V}, rows


def run_hidden_case(pairs: int, T: int, V: int, Hdim: int, device: str, matmul_rate: float):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU bf16 matmuls are not a fair floor
    hidden = (torch.randn(2 * pairs * T, Hdim, device=device) / math.sqrt(Hdim)).to(dtype)
    weight = torch.randn(V, Hdim, device=device).to(dtype)
    labels = _labels(pairs, T, V, device)
    rc, rr = torch.randn(2, pairs, device=device) * 10 - 300
    n_completion = int((labels != IGNORE).sum())
    flops = 3 * 2 * n_completion * Hdim * V
    floor_ms = flops / matmul_rate * 1e3
    rows = [H.Row("floor", floor_ms, floor_ms, floor_ms, matmul_rate / 1e12, 1.0, 0.0, math.nan, "3 GEMMs, Nc")]
    for name, fn in _hidden_providers().items():
        if isinstance(fn, str):
            print(f"  skip {name}: {fn}")
            continue
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)

        def call(fn=fn, h=h, w=w):
            return torch.autograd.grad(fn(h, w, labels, rc, rr), (h, w))

        row = _measure(name, call, device, floor_ms, flops, 1e12, math.nan)
        if row:
            rows.append(row)
    title = f"DPO head from hidden  {str(dtype)[6:]}  B={pairs}  T={T}  V={V}  H={Hdim}  (TFLOP/s in the GB/s column)"
    return title, {"mode": "hidden", "pairs": pairs, "T": T, "V": V, "H": Hdim}, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--from-hidden", action="store_true", help="the DPO head from hidden states and the weight")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--T", type=int)
    parser.add_argument("--V", type=int)
    parser.add_argument("--H", type=int, help="hidden size (--from-hidden)")
    parser.add_argument("--save", action="store_true", help="write bench/results/<date>-<card>-bench_dpo*.{md,csv}")
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    if args.from_hidden:
        shapes = HIDDEN_SHAPES if cuda else CPU_HIDDEN_SHAPES
    else:
        shapes = LOGITS_SHAPES if cuda else CPU_LOGITS_SHAPES
    if args.pairs or args.T or args.V or args.H:
        given = (args.pairs, args.T, args.V, args.H)
        shapes = [tuple(g or d for g, d in zip(given, shapes[0]))]
    env = H.environment(args.device)
    if args.from_hidden:
        rate = H.matmul_rate(args.device)
        print(f"{env.header()}  matmul {rate / 1e12:.0f} TFLOP/s")
        tables = [run_hidden_case(*shape, args.device, rate) for shape in shapes]
    else:
        bandwidth = H.copy_bandwidth(args.device)
        print(f"{env.header()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        tables = [run_logits_case(*shape, args.device, bandwidth) for shape in shapes]
    for title, _, rows in tables:
        print()
        print(H.format_table(title, env, rows))
    if args.save:
        for path in H.save("bench_dpo_hidden" if args.from_hidden else "bench_dpo", env, tables):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
