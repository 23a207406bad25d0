"""How close do per-token log-probs from logits come to the bytes floor, forward and fwd + bwd?

    python -m bench.bench_logprobs [--device cuda|cpu] [--dtype bf16] [--N 16384 --V 128256]
                                   [--ignored 0.25] [--sweep] [--plot] [--save]

Each provider maps (logits [N, V], labels [N]) to fp32 log-probs [N] with autograd. Bytes counted
(the floor): the forward reads the logits once, N·V·itemsize; forward + backward reads them twice
and writes the gradient, 3·N·V·itemsize (6·N·V for bf16). The floor time is those bytes over the
device-copy bandwidth measured in the same run. "extra MiB" is the peak above the inputs, the
returned gradient included; "max err" the largest |log-prob - float64 reference| over 256 rows.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from bench import _harness as H
from dpo_kernels import reference

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

SHAPES = [
    # Llama-3 vocabulary, 8 × 2048 tokens: the case (first: the default on a GPU)
    (16384, 128256),
    # Qwen-2 vocabulary, the anchors' second row
    (8192, 151936),
    # Llama-2 / Mistral vocabulary: shorter rows, more launch and tail overhead per byte
    (16384, 32000),
]
# On a CPU a run is a check of the native backend against torch on the same machine, not a bandwidth study.
CPU_SHAPES = [  # the native backend on the CI machine (2 cores): the CPU issue's cases
    (4096, 32000),  # Llama-2 vocabulary
    (2048, 128256),  # Llama-3 vocabulary
]


def _providers() -> dict[str, Callable | str]:
    """name → fn(logits, labels) → fp32 log-probs, or a string: why the provider is skipped."""
    providers: dict[str, Callable | str] = {}
    try:
        import dpo_kernels

        # 6·N·V bytes for fwd + bwd; in place, the gradient overwrites the logits (≤ 64 MiB extra)
        providers["dpo_kernels"] = lambda x, y: dpo_kernels.token_logps(x, y, ignore_index=IGNORE)
        providers["dpo_kernels inplace"] = lambda x, y: dpo_kernels.token_logps(
            x, y, ignore_index=IGNORE, inplace_grad=True
        )
    except ImportError as e:
        providers["dpo_kernels"] = f"dpo_kernels.token_logps not importable: {e}"
    # plain torch: fp32 copy, log_softmax, gather (the reference on the low-precision logits)
    providers["torch"] = lambda x, y: reference.token_logps(x, y, ignore_index=IGNORE)
    compiled = torch.compile(reference.token_logps, dynamic=False)
    providers["torch.compile"] = lambda x, y: compiled(x, y, ignore_index=IGNORE)
    try:
        # TRL 1.16: its Triton log-prob + entropy kernel on CUDA, a row loop in torch elsewhere
        from trl.trainer.utils import selective_log_softmax

        def trl(x, y):
            ignored = y == IGNORE
            return selective_log_softmax(x, y.masked_fill(ignored, 0), row_mask=~ignored)

        providers["trl"] = trl
    except ImportError as e:
        providers["trl"] = f"trl not importable: {e}"
    try:
        # Liger cross entropy per token: -log p in the logits' dtype (the error column shows it)
        from liger_kernel.transformers.functional import liger_cross_entropy

        def liger(x, y):
            return -liger_cross_entropy(x, y, ignore_index=IGNORE, reduction="none").float()

        providers["liger"] = liger
    except ImportError as e:
        providers["liger"] = f"liger_kernel not importable: {e}"
    return providers


def _inputs(N: int, V: int, dtype: torch.dtype, device: str, ignored: float):
    logits = (torch.randn(N, V, device=device) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) < ignored] = IGNORE
    grad = torch.randn(N, device=device)
    return logits, labels, grad


def _max_err(fn: Callable, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Max |fn - float64 reference| over the first and last 128 rows, on a copy of the logits."""
    N = len(labels)
    rows = torch.cat([torch.arange(min(128, N)), torch.arange(max(0, N - 128), N)])
    rows = torch.unique(rows).to(logits.device)
    # a non-leaf with its own storage, as a layer's output: the in-place variant refuses leaves and their views
    x, y = logits[rows].clone().requires_grad_().clone(), labels[rows]
    out = fn(x, y).detach().double()
    ref = reference.token_logps(x.detach().double(), y, ignore_index=IGNORE)
    return (out - ref).abs().max().item()


def run_case(
    N: int,
    V: int,
    dtype: torch.dtype,
    device: str,
    ignored: float,
    env: H.Env,
    bandwidth: float,
):
    """Both passes of one shape: [(title, case, rows)] for the fwd and the fwd+bwd table."""
    logits, labels, grad = _inputs(N, V, dtype, device, ignored)
    nbytes = {"fwd": N * V * logits.element_size(), "fwd+bwd": 3 * N * V * logits.element_size()}
    tables = []
    errors: dict[str, float] = {}
    for pass_name in ("fwd", "fwd+bwd"):
        floor_ms = nbytes[pass_name] / bandwidth * 1e3
        rows = [
            H.Row(
                "floor",
                floor_ms,
                floor_ms,
                floor_ms,
                bandwidth / 1e9,
                1.0,
                0.0,
                math.nan,
                "copy bandwidth",
            )
        ]
        for name, fn in _providers().items():
            if isinstance(fn, str):
                print(f"  skip {name}: {fn}")
                continue
            if pass_name == "fwd" and "inplace" in name:
                continue  # the same forward as dpo_kernels
            # the in-place variant overwrites its input: a fresh non-leaf buffer, as a layer's output would be
            x = logits.detach().clone().requires_grad_().clone() if "inplace" in name else logits
            if pass_name == "fwd":

                def call(fn=fn, x=x):
                    with torch.no_grad():
                        return fn(x, labels)

            else:
                x.requires_grad_(True)

                def call(fn=fn, x=x):
                    return torch.autograd.grad(fn(x, labels), x, grad)

            try:
                if name not in errors:
                    errors[name] = _max_err(fn, logits, labels)
                call()  # first call: compilation, autotuning, extension build
                H._sync(device)
                extra = H.extra_peak_mib(call, device)
                med, p20, p80 = H.time_ms(call, device)
            except Exception as e:  # a peer that fails on this shape or device: say so, keep going
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                print(f"  skip {name} ({pass_name}): {reason}")
                continue
            finally:
                if x.is_leaf:  # the in-place variant's buffer is not
                    x.requires_grad_(False)
            gbps = nbytes[pass_name] / (med * 1e-3) / 1e9
            rows.append(H.Row(name, med, p20, p80, gbps, med / floor_ms, extra, errors[name]))
            print(f"  {pass_name:8s} {name:20s} {med:9.3f} ms  {med / floor_ms:5.2f}× floor")
        title = f"logps {pass_name}  {_dtype_name(dtype)}  N={N} V={V}"
        if ignored:
            title += f" ignored={ignored:.0%}"
        case = {"pass": pass_name, "dtype": _dtype_name(dtype), "N": N, "V": V, "ignored": ignored}
        tables.append((title, case, rows))
    return tables


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _plot(tables, env: H.Env) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for _, case, rows in tables:
        if case["pass"] != "fwd+bwd":
            continue
        for r in rows:
            series.setdefault(r.provider, []).append((case["V"], r.gbps))
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("GB/s (3·N·V·itemsize / time)")
    ax.set_title(f"token log-probs fwd+bwd, {env.card}")
    ax.legend()
    H.RESULTS.mkdir(parents=True, exist_ok=True)
    path = H.RESULTS / f"{env.date}-{env.card}-bench_logprobs.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cuda", "cpu"], default=default_device)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--N", type=int, help="rows (tokens); with --V replaces the shape list")
    parser.add_argument("--V", type=int, help="vocabulary size")
    parser.add_argument("--ignored", type=float, default=0.0, help="fraction of rows ignored")
    parser.add_argument("--sweep", action="store_true", help="all of SHAPES, not the first only")
    parser.add_argument("--plot", action="store_true", help="GB/s vs V figure (implies --sweep)")
    parser.add_argument("--save", action="store_true", help="write bench/results/ .md and .csv")
    args = parser.parse_args(argv)

    shapes = SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.N or args.V:
        shapes = [(args.N or shapes[0][0], args.V or shapes[0][1])]
    elif not (args.sweep or args.plot):
        shapes = shapes[:1]
    env = H.environment(args.device)
    bandwidth = H.copy_bandwidth(args.device)
    print(f"{env.header()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    tables = []
    for N, V in shapes:
        print(f"N={N} V={V} {args.dtype}")
        tables += run_case(N, V, DTYPES[args.dtype], args.device, args.ignored, env, bandwidth)
    for title, _, rows in tables:
        print()
        print(H.format_table(title, env, rows))
    if args.save:
        for path in H.save(f"bench_logprobs-{args.device}-{args.dtype}", env, tables):
            print(f"wrote {path}")
    if args.plot:
        _plot(tables, env)


if __name__ == "__main__":
    main()
