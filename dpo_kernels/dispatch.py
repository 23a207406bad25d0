"""Which backend runs a call: the one place that decides, and the one table from a backend to its kernels.

Backends:
- "triton": the kernels of `ops/` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for the tests);
- "cpu": the native C++ kernels of `csrc/` for the per-token log-probs (CPU tensors; the small per-sequence math
  runs in torch);
- "reference": plain PyTorch (`reference.py`), any device and dtype.

float64 always runs on the reference (the kernels compute in fp32). The fused lm_head's tile path (`chunked.py`) runs
the vendor GEMM with the per-token kernels of the "triton" or "cpu" backend; on "reference" the whole logits are built.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

BACKENDS = ("triton", "cpu", "reference")


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): CPU tensors can run the Triton kernels."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result  # torch.compile reads it once instead of tracing a build
def native_available() -> bool:
    """The native CPU kernels are built and loaded (the first call builds them), and not turned off by
    DPO_KERNELS_CPU_BACKEND=reference (which sends CPU calls to the reference, for comparisons and debugging)."""
    if os.environ.get("DPO_KERNELS_CPU_BACKEND", "").lower() == "reference":
        return False
    from dpo_kernels import cpu

    return cpu.available()


def pick(tensor: torch.Tensor, backend: str | None = None) -> str:
    """The backend of a call on `tensor`: CUDA → triton; CPU under TRITON_INTERPRET=1 → triton; CPU → cpu when the
    native kernels build, else reference; other devices and float64 → reference. `backend=` overrides the choice
    (a backend that cannot run on `tensor` is refused; float64 still runs on the reference)."""
    on_cpu = tensor.device.type == "cpu"
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if backend == "triton" and not (tensor.is_cuda or (interpreting() and on_cpu)):
            raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {tensor.device}")
        if backend == "cpu" and (not on_cpu or not native_available()):
            raise ValueError(f"backend 'cpu' needs CPU tensors and the native extension (tensor on {tensor.device})")
        chosen = backend
    elif tensor.is_cuda or (on_cpu and interpreting()):
        chosen = "triton"
    elif on_cpu and native_available():
        chosen = "cpu"
    else:
        chosen = "reference"
    return "reference" if tensor.dtype == torch.float64 else chosen


def token_kernels(backend: str) -> ModuleType:
    """The per-token log-prob launchers (`logprobs_fwd`, `logprobs_bwd`) of a kernel backend."""
    if backend == "triton":
        from dpo_kernels.ops import logprobs

        return logprobs
    if backend == "cpu":
        from dpo_kernels import cpu

        return cpu
    raise AssertionError(f"no per-token kernels for backend {backend!r}")  # callers route reference elsewhere


def vocab_sharded(t: torch.Tensor) -> bool:
    """A DTensor sharded on its last (vocabulary) dim, as torch's `loss_parallel` takes logits: the call goes to
    `dpo_kernels.parallel`. (A weight sharded on dim 0 is not detected: FSDP2 leaves the same placement, and only the
    caller knows which it is; the head functions take `vocab_parallel=True`.)"""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        return False
    if not isinstance(t, DTensor):
        return False
    return any(isinstance(p, Shard) and p.dim % t.ndim == t.ndim - 1 for p in t.placements)
