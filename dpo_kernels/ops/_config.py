"""Launch configuration (block sizes, warps) for every kernel family, and the output allocator.

No autotuning: small tables keyed on the vocabulary size and dtype, chosen by measurement (bench/NOTES.md).
"""

import os

import torch
import triton


def empty_f32(*shape: int, device: torch.device | str) -> torch.Tensor:
    """An fp32 output buffer; NaN-filled when DPO_KERNELS_POISON=1 so that a row a kernel forgets to write fails
    the tests instead of passing with stale memory."""
    if os.environ.get("DPO_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def logprobs_launch_config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for the row kernels of ops/logprobs.py."""
    block_v = min(triton.next_power_of_2(V), 4096 if dtype == torch.float32 else 8192)
    num_warps = 4 if block_v <= 2048 else 8 if block_v <= 4096 else 16
    return block_v, num_warps
