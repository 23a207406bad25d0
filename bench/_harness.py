"""Timing, floors, peak memory and the results table shared by the bench_*.py scripts.

GPU: `triton.testing.do_bench` (median, p20, p80 over ~100 ms of runs, L2 flushed between runs),
with the floor measured in the same process: a device-to-device copy gives the bandwidth (bytes read
+ written per second). CPU: `torch.utils.benchmark.Timer` (its per-run times give the quantiles) and
a host memcpy for the floor. A run prints one table per case; `save` writes
bench/results/<date>-<card>-<script>.{md,csv} with the card, versions and git sha in the header.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Env:
    """Where a run happened: goes into every table header and CSV row."""

    device: str
    card: str
    torch: str
    triton: str
    sha: str
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    def header(self) -> str:
        return f"{self.card}  torch {self.torch}  triton {self.triton}  sha {self.sha}"


def environment(device: str) -> Env:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    if device == "cuda":
        card = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")
    else:
        card = f"cpu-{torch.get_num_threads()}threads"
    return Env(device, card, torch.__version__, triton_version, sha or "unknown")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(
    fn: Callable[[], object],
    device: str,
    *,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    rep_ms: int = 100,
) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one call of `fn`."""
    if device == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(
            fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
        )
        return med, p20, p80
    from torch.utils import benchmark

    def call():
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        fn()

    call()  # warm-up (first-call work: compilation, allocation)
    timer = benchmark.Timer(stmt="call()", globals={"call": call})
    m = timer.blocked_autorange(min_run_time=max(rep_ms, 200) / 1e3)
    times = sorted(t * 1e3 for t in m.times)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Bytes moved per second (read + written) by a device-to-device copy: the floor's bandwidth."""
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (med * 1e-3)


def matmul_rate(device: str) -> float:
    """FLOP/s of a large square matrix product on random data (bf16 on CUDA, fp32 on the CPU): the floor's rate."""
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    med, _, _ = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (med * 1e-3)


def _rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def extra_peak_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory above what was allocated before the call, the returned tensors included. CUDA: the caching
    allocator's peak. CPU (Linux): the peak resident set size, reset just before the call (/proc/self/clear_refs),
    minus the resident size then; run each provider in a fresh process for a clean figure. NaN elsewhere."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - base) / 2**20
    if device != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return math.nan
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    base = _rss_kib("VmRSS")
    out = fn()
    peak = _rss_kib("VmHWM")
    del out
    return (peak - base) / 1024


@dataclass
class Row:
    """One line of a results table."""

    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float  # counted bytes / median time
    x_floor: float  # median / floor
    extra_mib: float
    max_err: float  # max abs error vs float64
    note: str = ""


def _fmt(value: float, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


COLUMNS = ("provider", "median ms", "p20", "p80", "GB/s", "× floor", "extra MiB", "max err vs fp64")


def format_table(title: str, env: Env, rows: Sequence[Row]) -> str:
    """A markdown table, readable as plain text."""
    lines = [
        f"{title}  {env.header()}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = [
            r.provider + (f" ({r.note})" if r.note else ""),
            _fmt(r.median_ms, ".3f"),
            _fmt(r.p20_ms, ".3f"),
            _fmt(r.p80_ms, ".3f"),
            _fmt(r.gbps, ".0f" if r.gbps >= 100 else ".3g"),
            _fmt(r.x_floor, ".2f"),
            _fmt(r.extra_mib, ".0f"),
            _fmt(r.max_err, ".1e"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(script: str, env: Env, tables: Sequence[tuple[str, dict, Sequence[Row]]]) -> list[Path]:
    """Write bench/results/<date>-<card>-<script>.{md,csv}; tables: (title, case fields, rows)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{env.date}-{env.card}-{script}"
    md = [
        f"# {script}, {env.date}, {env.card}",
        "",
        f"torch {env.torch}, triton {env.triton}, git {env.sha}",
        "",
    ]
    for title, _, rows in tables:
        md += [format_table(title, env, rows), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = None
        for _, case, rows in tables:
            for r in rows:
                record = {**case, **asdict(r), **asdict(env)}
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(record))
                    writer.writeheader()
                writer.writerow(record)
    return [stem.with_suffix(".md"), stem.with_suffix(".csv")]
