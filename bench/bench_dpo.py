"""How close does a whole DPO loss step (forward + backward) come to its floor, beside TRL's path and plain torch?

    python -m bench.bench_dpo [--device cuda|cpu] [--pairs 4 --T 2048 --V 128256] [--save]
    python -m bench.bench_dpo --from-hidden [--device cuda|cpu] [--pairs --T --V --H --dtype --prompt] [--save]

From logits (default): bf16 logits [2B, T, V] of the policy, precomputed reference log-probs, sigmoid loss; the
floor is 3·N·V·itemsize bytes (read in the forward, read again and the gradient written in the backward) over the
device-copy bandwidth measured in the same run. "max err" is |loss − float64 loss|.

From hidden states (`--from-hidden`): hidden [2B·T, H] and the output weight [V, H], the first `prompt` tokens of
each row unscored, precomputed reference log-probs (no reference GEMM). Every provider runs in its own process
(`--one-provider NAME`, one JSON line back), so that its extra peak memory is its own: CUDA's allocator peak, or on
the CPU the peak RSS minus the RSS before the call. Each provider's floor is the GEMMs it runs (3 with kept logits:
forward, dH, dW; 4 when the backward recomputes the logits), 2·rows·H·V FLOPs each over the rows it projects (the
scored ones, or all positions), at the matmul rate measured in the same run. "max err" is |loss − float64 loss| and
"grad rel err" max(‖dH − dH₆₄‖/‖dH₆₄‖, ‖dW − dW₆₄‖/‖dW₆₄‖), both on the first pair's prompt and first 32
completion tokens, the whole vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import _harness as H
from dpo_kernels import reference

IGNORE = -100
ROOT = Path(__file__).resolve().parent.parent
LOGITS_SHAPES = [  # (pairs, tokens per row, vocabulary)
    (4, 2048, 128256),  # Llama-3 vocabulary, the first case
    (8, 4096, 151936),  # Qwen-2 vocabulary: 20 GB of bf16 logits (torch's fp32 path needs an H200)
]
CPU_LOGITS_SHAPES = [(2, 256, 32000)]


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


# ---------------------------------------------------------------------------------------------------------------
# From hidden states: every provider in its own process (a clean peak RSS on the CPU, a clean allocator on CUDA)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HIDDEN_SHAPES = [  # (pairs, tokens per row, vocabulary, hidden size, dtype, prompt tokens per row)
    (4, 2048, 128256, 4096, "bf16", 512),  # Llama-3-8B head: the anchors' table, 12288 scored rows
    (4, 2048, 151936, 896, "bf16", 512),  # Qwen-2-0.5B head: small H, the softmax traffic matters more
]
CPU_HIDDEN_SHAPES = [  # issue 13's CPU cases: exactly 2048 and 1024 scored rows (4 rows of 512 and of 256 tokens)
    (2, 683, 151936, 896, "fp32", 171),  # Qwen-2-0.5B head, fp32
    (2, 342, 128256, 2048, "bf16", 86),  # Llama-3 vocabulary, H 2048, bf16
]
# The metrics TRL 1.16's DPOTrainer asks its head for (trl/trainer/dpo_trainer.py: add_fused_lm_head(outputs=...));
# ours computes the same ones (return_stats=True, as the drop-in does): both heads do the work a training step does.
TRL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


@dataclass
class HiddenProvider:
    """fn(hidden [2B·T, H], weight [V, H], labels [2B, T], rc, rr) → scalar loss, or why it is skipped; the GEMMs
    of 2·rows·H·V FLOPs it runs per fwd + bwd (its floor), over the scored rows or all positions."""

    fn: Callable | str
    gemms: int
    rows: str  # "scored" or "all"
    note: str = ""


def _hidden_providers(device: str) -> dict[str, HiddenProvider]:
    import dpo_kernels as dk

    def ours(**head):  # return_stats: the metrics TRL logs, computed by the row kernels in the same pass
        def fn(h, w, y, rc, rr):
            return dk.dpo_loss_from_hidden(h.view(*y.shape, -1), w, y, rc, rr, return_stats=True, **head).loss

        return fn

    providers = {
        "dpo_kernels keep_logits=True": HiddenProvider(ours(keep_logits=True), 3, "scored", "fwd, dH, dW"),
        "dpo_kernels keep_logits=False": HiddenProvider(ours(keep_logits=False), 4, "scored", "+ recompute"),
    }
    why = "" if device == "cuda" else "the all-Triton head needs CUDA"
    providers["dpo_kernels impl=fused"] = HiddenProvider(why or ours(impl="fused", keep_logits=False), 4, "scored")
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl(h, w, y, rc, rr):
            # trl.trainer.utils.add_fused_lm_head's forward on a Triton device: the completion rows only
            # (hidden[mask], labels[mask]), tiles of 4096 tokens × 32768 vocab, the trainer's outputs, masked_scatter
            mask = y != IGNORE
            lp = ChunkedLogProbFunction.apply(
                h.view(*y.shape, -1)[mask], w, None, y[mask], 1.0, TRL_CHUNK_SIZE, None, 1.0, TRL_OUTPUTS
            )[0]
            return _loss_from_token_logps(lp.new_zeros(mask.shape).masked_scatter(mask, lp), y, rc, rr)

        def trl_all(h, w, y, rc, rr):
            # the same forward elsewhere (compact = _use_triton(device) is False on the CPU): every position,
            # labels clamped to 0, the ignored ones zeroed after
            mask = y != IGNORE
            lp = ChunkedLogProbFunction.apply(
                h, w, None, y.clamp(min=0).reshape(-1), 1.0, TRL_CHUNK_SIZE, None, 1.0, TRL_OUTPUTS
            )[0]
            return _loss_from_token_logps(lp.view(mask.shape).masked_fill(~mask, 0), y, rc, rr)

        providers["trl"] = HiddenProvider(trl, 4, "scored", "completion rows")
        if device != "cuda":
            providers["trl every position"] = HiddenProvider(trl_all, 4, "all", "its DPOTrainer off Triton devices")
    except ImportError as e:
        providers["trl"] = HiddenProvider(f"trl not importable: {e}", 4, "scored")

    def torch_plain(h, w, y, rc, rr):  # all positions: matmul, fp32 log_softmax, gather (no stats)
        return reference.dpo_loss_from_logits((h @ w.T).view(*y.shape, -1), y, rc, rr).loss

    providers["torch"] = HiddenProvider(torch_plain, 3, "all", "no stats")
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y, rc, rr):  # per-token -log p (its backward skips small gradient blocks)
            lp = -linear_cross_entropy(h, w, y.reshape(-1), ignore_index=IGNORE, reduction="none").float()
            return _loss_from_token_logps(lp, y, rc, rr)

        providers["cut_cross_entropy"] = HiddenProvider(cce, 4, "all", "skips blocks")
    except ImportError as e:
        providers["cut_cross_entropy"] = HiddenProvider(f"cut_cross_entropy not importable: {e}", 4, "all")
    return providers


def _hidden_inputs(case: tuple, device: str):
    """(hidden [2B·T, H], weight [V, H], labels [2B, T], rc [B], rr [B]): the same in every process (seeded)."""
    pairs, T, V, Hdim, dtype, prompt = case
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(2 * pairs * T, Hdim, device=device, generator=g) / math.sqrt(Hdim)).to(DTYPES[dtype])
    weight = torch.randn(V, Hdim, device=device, generator=g).to(DTYPES[dtype])
    labels = torch.randint(0, V, (2 * pairs, T), device=device, generator=g)
    labels[:, :prompt] = IGNORE
    rc, rr = torch.randn(2, pairs, device=device, generator=g) * 10 - 300
    return hidden, weight, labels, rc, rr


def _error_slice(hidden, labels, rc, rr, case: tuple, tokens: int = 32):
    """The first pair, its prompt and `tokens` completion tokens per row: (hidden [2·t, H], labels [2, t], rc, rr)."""
    pairs, T, _, Hdim, _, prompt = case
    t = prompt + tokens
    rows = [0, pairs]
    return hidden.view(2 * pairs, T, Hdim)[rows, :t].reshape(2 * t, Hdim), labels[rows, :t], rc[:1], rr[:1]


def _rel_err(g: torch.Tensor, ref: torch.Tensor, block: int = 8192) -> float:
    """‖g − ref‖ / ‖ref‖, in float64, a block of rows at a time (ref may be a GiB-sized dW)."""
    num = sum(float((g[i : i + block].double() - ref[i : i + block]).square().sum()) for i in range(0, len(g), block))
    den = sum(float(ref[i : i + block].square().sum()) for i in range(0, len(ref), block))
    return math.sqrt(num / den)


def _errors(case: tuple, device: str, providers: dict[str, HiddenProvider]) -> dict[str, tuple[float, float]]:
    """name → (|loss − float64 loss|, max relative error of dH and dW vs float64) on the first pair's 32 first
    completion tokens (the whole vocabulary): float64 through `reference`, once for all providers."""
    hidden, weight, labels, rc, rr = _hidden_inputs(case, device)
    h, y, rc1, rr1 = _error_slice(hidden, labels, rc, rr, case)
    h64, w64 = h.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss64 = reference.dpo_loss_from_logits((h64 @ w64.T).view(*y.shape, -1), y, rc1.double(), rr1.double()).loss
    dh64, dw64 = torch.autograd.grad(loss64, (h64, w64))
    del w64
    out = {}
    for name, p in providers.items():
        if isinstance(p.fn, str):
            continue
        hs, ws = h.detach().clone().requires_grad_(True), weight.detach().requires_grad_(True)
        try:
            loss = p.fn(hs, ws, y, rc1, rr1)
            dh, dw = torch.autograd.grad(loss, (hs, ws))
        except Exception as e:  # reported again, with the time, by its own process
            print(f"  {name}: error check failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        out[name] = (abs(loss.item() - loss64.item()), max(_rel_err(dh, dh64), _rel_err(dw, dw64)))
        del dh, dw, loss
    return out


def _gemm_rate(device: str, dtype: torch.dtype, rows: int, Hdim: int) -> float:
    """FLOP/s of the floor. CUDA: the harness's 8192³ bf16 matmul (the anchors' rate). CPU: the providers' forward
    GEMM shape, [rows, H] @ [H, 8192] (a vocabulary slab), in the case's dtype (oneDNN's bf16 is not fp32's rate)."""
    if device == "cuda":
        return H.matmul_rate(device)
    a = torch.randn(min(rows, 2048), Hdim).to(dtype)
    b = torch.randn(Hdim, 8192).to(dtype)
    med, _, _ = H.time_ms(lambda: a @ b, device)
    return 2 * a.shape[0] * Hdim * 8192 / (med * 1e-3)


def one_provider(name: str, case: tuple, device: str, repeats: int) -> dict:
    """In this (fresh) process: one provider's fwd + bwd at `case`: {"median_ms", "p20_ms", "p80_ms", "extra_mib"}
    or {"skip": why}. CUDA: do_bench's quantiles. CPU: `repeats` calls timed one by one (min and max in the p20 /
    p80 fields), the first of them also measuring the peak RSS; a small call first loads and compiles."""
    p = _hidden_providers(device)[name]
    if isinstance(p.fn, str):
        return {"skip": p.fn}
    hidden, weight, labels, rc, rr = _hidden_inputs(case, device)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    hs, ys, rcs, rrs = _error_slice(hidden.detach(), labels, rc, rr, case)
    torch.autograd.grad(p.fn(hs.requires_grad_(True), w, ys, rcs, rrs), (hs, w))  # load, build, compile
    del hs

    def call():
        return torch.autograd.grad(p.fn(h, w, labels, rc, rr), (h, w))

    result = {}
    if name.startswith("dpo_kernels"):
        from dpo_kernels import dispatch

        result["backend"] = dispatch.pick(h)
    if device == "cuda":
        call()  # the full shapes' first call (autotuning, cuBLAS heuristics)
        result["extra_mib"] = H.extra_peak_mib(call, device)
        torch.cuda.empty_cache()
        result["median_ms"], result["p20_ms"], result["p80_ms"] = H.time_ms(call, device)
        return result
    times = []

    def timed():
        start = time.perf_counter()
        out = call()
        times.append((time.perf_counter() - start) * 1e3)
        return out

    result["extra_mib"] = H.extra_peak_mib(timed, device)
    for _ in range(repeats - 1):
        timed()
    result.update(median_ms=statistics.median(times), p20_ms=min(times), p80_ms=max(times), times_ms=times)
    return result


def run_hidden_case(case: tuple, device: str, options: argparse.Namespace):
    pairs, T, V, Hdim, dtype, prompt = case
    n_scored, n_all = 2 * pairs * (T - prompt), 2 * pairs * T
    rate = _gemm_rate(device, DTYPES[dtype], n_scored, Hdim)
    print(
        f"case B={pairs} T={T} (prompt {prompt}) V={V} H={Hdim} {dtype}: {n_scored} scored rows of {n_all};"
        f" GEMM rate {rate / 1e12:.3g} TFLOP/s"
    )
    providers = _hidden_providers(device)
    if options.providers:
        providers = {k: v for k, v in providers.items() if k in options.providers}
    errors = _errors(case, device, providers)
    if device == "cuda":
        torch.cuda.empty_cache()

    def gemm_flops(gemms: int, rows: str) -> float:
        return gemms * 2 * (n_scored if rows == "scored" else n_all) * Hdim * V

    rows = []
    for gemms in (3, 4):
        floor = gemm_flops(gemms, "scored") / rate * 1e3
        rows.append(H.Row("floor", floor, floor, floor, rate / 1e12, 1.0, 0.0, math.nan, f"{gemms} GEMMs, scored"))
    results = {}
    for name, p in providers.items():
        if isinstance(p.fn, str):
            print(f"  skip {name}: {p.fn}")
            continue
        command = [sys.executable, "-m", "bench.bench_dpo", "--from-hidden", "--one-provider", name]
        command += ["--device", device, "--pairs", str(pairs), "--T", str(T), "--V", str(V), "--H", str(Hdim)]
        command += ["--dtype", dtype, "--prompt", str(prompt), "--repeats", str(options.repeats)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=options.child_timeout)
        except subprocess.TimeoutExpired:
            print(f"  skip {name}: over --child-timeout {options.child_timeout} s")
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
            print(f"  skip {name}: its process failed (rc {proc.returncode}): {tail}")
            continue
        r = json.loads(lines[-1])
        if "skip" in r:
            print(f"  skip {name}: {r['skip']}")
            continue
        results[name] = r
        flops = gemm_flops(p.gemms, p.rows)
        floor = flops / rate * 1e3
        err, grad_err = errors.get(name, (math.nan, math.nan))
        note = f"{p.gemms} GEMMs over {p.rows} rows"
        note += f"; {p.note}" if p.note else ""
        note += f"; grad rel err {grad_err:.1e}"
        if r.get("backend") not in (None, "cpu" if device == "cpu" else "triton"):
            note += f"; backend {r['backend']}"
        med = r["median_ms"]
        rows.append(
            H.Row(
                name, med, r["p20_ms"], r["p80_ms"], flops / (med * 1e-3) / 1e12, med / floor, r["extra_mib"], err, note
            )
        )
        print(
            f"  {name:30s} {med:10.1f} ms  {med / floor:5.2f}× its floor  {r['extra_mib']:7.0f} MiB"
            f"  loss err {err:.1e}  grad rel err {grad_err:.1e}"
        )
    title = (
        f"DPO head from hidden, fwd + bwd  {dtype}  B={pairs}  T={T} (prompt {prompt}: {n_scored} scored rows)"
        f"  V={V}  H={Hdim}  (TFLOP/s in the GB/s column)"
    )
    case_fields = {"mode": "hidden", "pairs": pairs, "T": T, "V": V, "H": Hdim, "dtype": dtype, "prompt": prompt}
    return title, case_fields, rows, _goals(results)


def _goals(results: dict[str, dict]) -> list[str]:
    """Issue 13's goals against TRL's head on the same scored rows."""
    trl = results.get("trl")
    lines = []
    if trl is None:
        return ["goals: no trl row"]
    for name, goal in (("dpo_kernels keep_logits=True", 2.0), ("dpo_kernels keep_logits=False", 1.5)):
        r = results.get(name)
        if r is not None:
            speedup = trl["median_ms"] / r["median_ms"]
            met = "met" if speedup >= goal else "missed"
            lines.append(f"{name}: {speedup:.2f}× faster than trl (goal ≥ {goal}×: {met})")
    r = results.get("dpo_kernels keep_logits=False")
    if r is not None:
        met = "met" if r["extra_mib"] <= trl["extra_mib"] else "missed"
        lines.append(
            f"extra peak, keep_logits=False: {r['extra_mib']:.0f} MiB vs trl {trl['extra_mib']:.0f} MiB"
            f" (goal ≤ trl's: {met})"
        )
    return lines


def _hidden_shapes(args: argparse.Namespace) -> list[tuple]:
    """The from-hidden cases; --pairs/--T/--V/--H/--dtype/--prompt replace the first one's fields (prompt: a
    quarter of T when T is given alone)."""
    shapes = HIDDEN_SHAPES if args.device == "cuda" else CPU_HIDDEN_SHAPES
    given = (args.pairs, args.T, args.V, args.H, args.dtype, args.prompt)
    if not any(g is not None for g in given):
        return shapes
    pairs, T, V, Hdim, dtype, prompt = (g if g is not None else d for g, d in zip(given, shapes[0]))
    if args.prompt is None and args.T is not None:
        prompt = T // 4
    return [(pairs, T, V, Hdim, dtype, prompt)]


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--from-hidden", action="store_true", help="the DPO head from hidden states and the weight")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--T", type=int)
    parser.add_argument("--V", type=int)
    parser.add_argument("--H", type=int, help="hidden size (--from-hidden)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="hidden and weight dtype (--from-hidden)")
    parser.add_argument("--prompt", type=int, help="unscored tokens at the start of each row (--from-hidden)")
    parser.add_argument("--providers", nargs="+", help="only these from-hidden providers (names as in the table)")
    parser.add_argument("--repeats", type=int, default=2, help="CPU, --from-hidden: timed calls per provider")
    parser.add_argument("--child-timeout", type=float, help="seconds one provider's process may take")
    parser.add_argument("--one-provider", metavar="NAME", help=argparse.SUPPRESS)  # the parent's re-invocation
    parser.add_argument("--save", action="store_true", help="write bench/results/<date>-<card>-bench_dpo*.{md,csv}")
    args = parser.parse_args(argv)

    if args.one_provider:  # one provider, one case, this process: a JSON line for the parent
        print(json.dumps(one_provider(args.one_provider, _hidden_shapes(args)[0], args.device, args.repeats)))
        return
    cuda = args.device == "cuda"
    env = H.environment(args.device)
    load_before = _load()
    goals = []
    if args.from_hidden:
        print(f"{env.header()}  load average {load_before}")
        tables, goals = [], []
        for case in _hidden_shapes(args):
            title, fields, rows, case_goals = run_hidden_case(case, args.device, args)
            tables.append((title, fields, rows))
            goals.append((title, case_goals))
    else:
        shapes = LOGITS_SHAPES if cuda else CPU_LOGITS_SHAPES
        if args.pairs or args.T or args.V:
            given = (args.pairs, args.T, args.V)
            shapes = [tuple(g or d for g, d in zip(given, shapes[0]))]
        bandwidth = H.copy_bandwidth(args.device)
        print(f"{env.header()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        tables = [run_logits_case(*shape, args.device, bandwidth) for shape in shapes]
    summary = []
    if args.from_hidden:
        summary = [
            f"Load average (1, 5, 15 min): {load_before} at the start, {_load()} at the end ({os.cpu_count()} CPUs).",
            "",
            "Times: "
            + (
                "do_bench quantiles."
                if cuda
                else f"{args.repeats} timed fwd + bwd call(s) per provider after"
                " a small warm-up call; p20 / p80 columns hold the min / max."
            ),
            "",
        ]
        for title, lines in goals:
            summary += [f"{title.split('  (')[0]}:", *(f"- {line}" for line in lines), ""]
    for title, _, rows in tables:
        print()
        print(H.format_table(title, env, rows))
    if summary:
        print()
        print("\n".join(summary))
    if args.save:
        for path in H.save("bench_dpo_hidden" if args.from_hidden else "bench_dpo", env, tables):
            if path.suffix == ".md" and summary:
                path.write_text(path.read_text() + "\n" + "\n".join(summary))
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
