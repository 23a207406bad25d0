"""What does the vocabulary-parallel DPO head communicate, next to all-gathering the logits, and what does a CPU
smoke run of 1 vs 2 processes cost?

    python -m bench.bench_parallel [--tokens 1024 --V 32000] [--save]

1. Bytes per token, analytic: our two all-reduces (`dpo_kernels.parallel`) carry an fp32 payload of 4 + 8 bytes per
   token for log-probs alone and 8 + 24 with TRL's statistics (what `dpo_loss_from_logits(return_stats=True)`
   sends); a ring all-reduce moves 2·(tp − 1)/tp times its payload per rank. All-gathering the bf16 logits instead
   moves (tp − 1)/tp · V · 2 = 2·(tp − 1)/tp·V bytes per token and rank. From hidden states the backward adds one
   all-reduce of grad_hidden, 4·H bytes of payload per token (what ColwiseParallel's own input gradient costs too).
2. Bytes per token, counted: a gloo world of 2 processes runs each call with `torch.distributed.all_reduce` wrapped
   and sums the payloads.
3. Time, CPU smoke figure: `dpo_loss_from_logits` forward + backward on the native backend, one process holding all
   of V against 2 processes holding V/2 each (gloo, the same machine, one thread each), median of a few steps.
   Not a GPU number: those are owed until a multi-GPU run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
VOCABS = (128256, 151936)  # Llama 3, Qwen 2
TPS = (2, 4, 8)
H_EXAMPLE = 4096  # grad_hidden's payload in the hidden-states rows


def payload(stats: bool) -> int:
    """fp32 bytes per token of our two all-reduces: MAX of [m (, max before label)], SUM of 2 (or 6) rows."""
    return 4 * ((2 + 6) if stats else (1 + 2))


def ring(tp: int, nbytes: float) -> float:
    """Bytes a rank sends (= receives) in a ring all-reduce of `nbytes`."""
    return 2 * (tp - 1) / tp * nbytes


def analytic_table() -> str:
    lines = [
        "| V | tp | all-gather bf16 logits, B/token/rank | ours, log-probs only | ours, DPO with stats "
        "| ratio (stats) | + grad_hidden (H = 4096, from hidden) |",
        "|---|---|---|---|---|---|---|",
    ]
    for V in VOCABS:
        for tp in TPS:
            gather = 2 * (tp - 1) / tp * V
            ours, ours_stats = ring(tp, payload(False)), ring(tp, payload(True))
            hidden = ring(tp, 4 * H_EXAMPLE)
            lines.append(
                f"| {V} | {tp} | {gather:,.0f} | {ours:.0f} | {ours_stats:.0f} | {gather / ours_stats:,.0f}× |"
                f" {hidden:,.0f} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The gloo worlds: counting and timing


def _inputs(tokens: int, V: int):
    g = torch.Generator().manual_seed(0)
    B, T = 2, tokens // 4
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, : T // 4] = -100
    logits = 2 * torch.randn(2 * B, T, V, generator=g)
    rc, rr = -20 * torch.rand(B, generator=g), -20 * torch.rand(B, generator=g)
    return logits, labels, rc, rr


def _step(logits, labels, rc, rr, shard: dict | None):
    from dpo_kernels import dpo_loss_from_logits, parallel

    x = logits.clone().requires_grad_(True)
    if shard is None:
        out = dpo_loss_from_logits(x, labels, rc, rr, return_stats=True, backend="cpu")
    else:
        out = parallel.dpo_loss_from_logits(x, labels, rc, rr, return_stats=True, backend="cpu", **shard)
    out.loss.backward()
    return out


def _worker(rank: int, world: int, init: str, tokens: int, V: int, steps: int, queue) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))  # fmt: skip
    logits, labels, rc, rr = _inputs(tokens, V)
    shard = None
    if world > 1:
        chunk = -(-V // world)
        start, stop = rank * chunk, min(V, (rank + 1) * chunk)
        logits = logits[..., start:stop].contiguous()
        shard = dict(process_group=dist.group.WORLD, vocab_start=start, vocab_size=V)
    counted = []
    if world > 1:  # count one call's all-reduce payloads (and that nothing else is called)
        saved = dist.all_reduce

        def counting(t, *args, **kwargs):
            counted.append(t.numel() * t.element_size())
            return saved(t, *args, **kwargs)

        dist.all_reduce = counting
        _step(logits, labels, rc, rr, shard)
        dist.all_reduce = saved
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        if world > 1:
            dist.barrier()
        start_t = time.perf_counter()
        _step(logits, labels, rc, rr, shard)
        times.append((time.perf_counter() - start_t) * 1e3)
    queue.put((rank, counted, times[1:]))
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, tokens: int, V: int, steps: int) -> tuple[list[int], list[float]]:
    """(the all-reduce payloads of one call on rank 0, the median step ms of each rank)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, init, tokens, V, steps, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    return results[0][1], [statistics.median(t) for _, _, t in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (2 pairs)")
    parser.add_argument("--V", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save", action="store_true", help="write bench/results/<date>-parallel-cpu.md")
    args = parser.parse_args()

    counted, t2 = run_world(2, args.tokens, args.V, args.steps)
    _, t1 = run_world(1, args.tokens, args.V, args.steps)
    per_token = sum(counted) / args.tokens
    report = [
        f"# Vocabulary-parallel DPO head: communication and a CPU smoke run ({datetime.date.today()})",
        "",
        f"torch {torch.__version__}, gloo on one machine ({os.cpu_count()} cores), native CPU kernels, 1 thread per "
        "process. GPU numbers are owed until a multi-GPU run.",
        "",
        "## Bytes per token and rank (ring all-reduce: 2·(tp − 1)/tp × payload)",
        "",
        analytic_table(),
        "",
        f"Counted (gloo, tp = 2, `dpo_loss_from_logits(return_stats=True)`, {args.tokens} tokens): "
        f"{len(counted)} all-reduces in a forward + backward step (both in the forward), payload {per_token:.1f} "
        f"bytes per token (analytic {payload(True)}).",
        "",
        f"## CPU smoke figure: DPO step from logits, forward + backward, {args.tokens} tokens, V = {args.V}",
        "",
        "| processes | vocabulary per process | median ms per step (per rank) |",
        "|---|---|---|",
        f"| 1 | {args.V} | {t1[0]:.1f} |",
        f"| 2 (gloo) | {-(-args.V // 2)} | {' / '.join(f'{t:.1f}' for t in t2)} |",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.save:
        path = ROOT / "bench" / "results" / f"{datetime.date.today()}-parallel-cpu.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
