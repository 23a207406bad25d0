"""The native CPU backend: the C++ kernels of csrc/, built on first use, called as torch operators.

`available()` builds the extension (or loads the cached build) once per process. The build needs a
C++ compiler with OpenMP and ninja, takes about 40 s on two cores (announced once on stderr, only when
a build really runs), and is cached under `$TORCH_EXTENSIONS_DIR/dpo_kernels`, else under
`~/.cache/dpo_kernels` (`$XDG_CACHE_HOME` is honoured), in a folder keyed on everything that changes
the build: the sources' contents, the flags, the compiler, the torch install (version and location),
the Python version and the machine; so checkouts and environments sharing the cache never overwrite
each other's build. The flags are portable (no `-march`): the kernels carry their own AVX-512 / AVX2 /
baseline clones and pick one when the library loads, so a cache shared between machines stays correct.

If the build fails, `available()` warns once and returns False, and `dispatch.pick` sends CPU calls to the
plain PyTorch reference instead (it is also where `DPO_KERNELS_CPU_BACKEND=reference` forces that path): the
launchers below only run on a loaded extension.

Sources: an installed package reads them from `dpo_kernels/csrc/` (package data), a source checkout
from the repository's `csrc/`. The operators (`torch.ops.dpo_kernels.*`, schemas in csrc/ops.cpp)
get their fake kernels here, so that torch.compile traces through them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "logprobs_bwd", "logprobs_fwd", "logprobs_partial_fwd"]

_NAME = "dpo_kernels_cpu"
_SOURCES = ("logprobs.cpp", "ops.cpp")
# -fno-trapping-math lets GCC vectorise the selects of the row loops on AVX2 and SSE (it changes no
# result: nothing reads the FP exception flags).
_CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
_LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_loaded: bool | None = None  # None until the first available() call tries to build


def available() -> bool:
    """True when the native kernels are loaded; the first call builds or loads them."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _try_load()
    return _loaded


def _try_load() -> bool:
    try:
        _load()
    except Exception as exc:  # no compiler, no ninja, a compile or load error: all fall back
        reason = (str(exc).strip().splitlines() or [""])[0]
        warnings.warn(
            f"dpo_kernels: the native CPU backend could not be built ({type(exc).__name__}: "
            f"{reason}); falling back to the plain PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _source_dir() -> Path:
    """The C++ sources: the package's own copy, else the source checkout's csrc/."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    raise FileNotFoundError(f"no C++ sources {_SOURCES} in {package}/csrc or {package.parent}/csrc")


def _build_key(sources: Path) -> str:
    """A hash of everything that changes the built library: the sources' contents, the flags, the compiler
    (cpp_extension honours $CXX), the torch install (version, build, location), the Python build and the
    machine."""
    key = hashlib.sha256()
    for name in _SOURCES:
        key.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
    parts = (
        _CFLAGS,
        _LDFLAGS,
        os.environ.get("CXX", ""),
        torch.__version__,
        torch.version.git_version,
        str(Path(torch.__file__).resolve().parent),
        sys.version,
        sys.platform,
        platform.machine(),
    )
    key.update(repr(parts).encode())
    return key.hexdigest()[:16]


def _build_dir() -> Path:
    """One build per content of the sources, flags, compiler, torch install, Python and machine (`_build_key`);
    the readable part of the name says which torch, Python and machine."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        base = Path(root) / "dpo_kernels"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo_kernels"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"torch{torch.__version__}-{python}-{platform.machine()}-{_build_key(_source_dir())}"
    return base / "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)


def _needs_build(build: Path, sources: Path) -> bool:
    """Whether cpp_extension.load will compile (not just load): no library yet, or a source newer than it (ninja's
    own rule; the folder is keyed on the sources' contents, so only a touched file can be newer)."""
    library = build / f"{_NAME}.so"
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any((sources / name).stat().st_mtime > built for name in _SOURCES)


def _announce_build(build: Path) -> None:
    """Tell the user once per process, where they see it, that the first call waits for a compiler."""
    if getattr(_announce_build, "done", False):
        return
    _announce_build.done = True
    print(f"dpo_kernels: building the CPU kernels (about a minute, once) in {build}", file=sys.stderr, flush=True)


def _load() -> None:
    from torch.utils import cpp_extension

    sources = _source_dir()
    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    if _needs_build(build, sources):
        _announce_build(build)
    # is_python_module=False: loaded by torch.ops.load_library; its TORCH_LIBRARY defines the ops.
    cpp_extension.load(
        name=_NAME,
        sources=[str(sources / name) for name in _SOURCES],
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only kernels of the operators, for torch.compile's tracing (once per process)."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("dpo_kernels::logprobs_fwd")
    def _(logits, labels, ignore_index, temperature, return_stats):
        N = labels.numel()
        logps = logits.new_empty((N,), dtype=torch.float32)
        lse = logits.new_empty((N,), dtype=torch.float32)
        stats = logits.new_empty((4 if return_stats else 0, N), dtype=torch.float32)
        return logps, lse, stats

    @torch.library.register_fake("dpo_kernels::logprobs_partial_fwd")
    def _(logits, labels, ignore_index, temperature, return_stats, vocab_start, vocab_size):
        return logits.new_empty((7 if return_stats else 3, labels.numel()), dtype=torch.float32)

    @torch.library.register_fake("dpo_kernels::logprobs_bwd")
    def _(logits, labels, lse, grad_logps, grad_entropy, entropy, ignore_index, temperature, vocab_start=None):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("dpo_kernels::logprobs_bwd_")
    def _(logits, labels, lse, grad_logps, grad_entropy, entropy, ignore_index, temperature, vocab_start=None):
        return None

    _register_fakes.done = True


def logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of `labels` under softmax(logits / temperature), as ops/logprobs.py.

    Args:
        logits: [R, T, V] or [N, V] float32/bfloat16/float16 on the CPU, unit stride on V, any batch and row
            strides: row n = (n // T, n % T) is read where it is (logits[:, :-1] costs no copy).
        labels: [N] (N = R·T, row-major) or [R, T] of any integer dtype; rows equal to `ignore_index` are not
            read.
    Returns:
        (logps, lse, stats): fp32 [N], [N] and, with `return_stats`, [4, N] (entropy, mean_logit,
        is_top1 as 1.0 / 0.0, log Σ p²) else None. Ignored rows give 0 everywhere; a label outside
        [0, V), a NaN or +inf logit, or a row of −inf only give NaN everywhere but is_top1 (0).
    """
    assert available(), "dispatch routes CPU calls to the reference when the native kernels are not built"
    labels = labels.to(torch.int64)
    options = (int(ignore_index), float(temperature), bool(return_stats))
    logps, lse, stats = torch.ops.dpo_kernels.logprobs_fwd(logits, labels, *options)
    return logps, lse, stats if return_stats else None


def logprobs_partial_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_stats: bool = False,
) -> torch.Tensor:
    """One vocabulary shard's per-row partials (fp32 [3, N], [7, N] with stats), as ops/logprobs.py's
    `logprobs_partial_fwd`: logits [.., V_shard] are the global columns [vocab_start, vocab_start + V_shard) of a
    vocabulary of `vocab_size`, labels global; `dpo_kernels.parallel` combines the shards."""
    assert available(), "dispatch routes CPU calls to the reference when the native kernels are not built"
    options = (int(ignore_index), float(temperature), bool(return_stats), int(vocab_start), int(vocab_size))
    return torch.ops.dpo_kernels.logprobs_partial_fwd(logits, labels.to(torch.int64), *options)


def logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logps: torch.Tensor | None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    inplace: bool = False,
    out: torch.Tensor | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """d/dlogits of the log-probs, plus the entropy's with `grad_entropy` and forward `entropy`.

    dx_v = [g (1[v = y] − p_v) − g_H p_v (x_v − (lse − H))] / T, x = logits / T, p = exp(x − lse),
    in the logits' dtype and shape (logits and labels as in `logprobs_fwd`; a new contiguous tensor); zero rows
    where ignored, NaN rows where the forward's outputs are NaN. With `inplace=True` the gradient overwrites the
    logits (strided as they are; elements must not overlap), which are returned; with `out` (the logits' shape and
    dtype, unit vocab stride) it is written there (the logits are copied into `out`, then overwritten in place).
    With `vocab_start` the logits are the vocabulary shard that starts at that global column, labels global,
    lse / entropy the whole rows'.
    """
    assert available(), "dispatch routes CPU calls to the reference when the native kernels are not built"
    assert out is None or (out.shape == logits.shape and out.dtype == logits.dtype), "out must match the logits"
    labels = labels.to(torch.int64)
    grads = (lse, grad_logps, grad_entropy, entropy)
    options = (int(ignore_index), float(temperature), None if vocab_start is None else int(vocab_start))
    if out is not None:
        logits, inplace = out.copy_(logits), True
    if inplace:
        torch.ops.dpo_kernels.logprobs_bwd_(logits, labels, *grads, *options)
        return logits
    return torch.ops.dpo_kernels.logprobs_bwd(logits, labels, *grads, *options)
