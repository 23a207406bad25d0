"""Launch configuration (block sizes, warps) for every kernel family, and the output allocator.

No autotuning: small tables keyed on the vocabulary size and dtype, chosen by measurement (bench/NOTES.md).
"""

import os

import torch
import triton


def empty_f32(*shape: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An fp32 (or `dtype`) output buffer; NaN-filled when DPO_KERNELS_POISON=1 so that a row a kernel forgets to
    write fails the tests instead of passing with stale memory."""
    if os.environ.get("DPO_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def logprobs_launch_config(
    V: int, dtype: torch.dtype, *, backward: bool = False, stats: bool = False
) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for the kernels of ops/logprobs.py.

    Sized for Hopper from first principles and the sm_90 register counts of ptxas (to be confirmed
    by bench/bench_logprobs.py on a card):
    - forward, one program per row: 64 bytes of logits per thread per block (four 16-byte loads)
      with the next block in flight, 8 warps: 8192 bf16/fp16 or 4096 fp32 columns, 64 registers,
      four programs per SM. With stats, 32 bytes (80 registers, three programs per SM).
      A row stride that is not a multiple of 16 elements: see `scalar_load_config`.
    - backward, one program per (row, block), an elementwise kernel: 32 bytes read and 32 written
      per thread, 8 warps: 4096 bf16/fp16 or 2048 fp32 columns, 32-48 registers.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_thread = (32 if backward or stats else 64) // itemsize  # elements per thread per block
    block_v = min(triton.next_power_of_2(V), per_thread * 32 * 8)
    num_warps = max(1, min(8, block_v // (per_thread * 32)))
    return block_v, num_warps


def scalar_load_config(block_v: int, num_warps: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the log-prob forward for rows whose stride is not a multiple of 16 elements
    (GPT-2's 50257, V = 1000): the JIT does not specialise it as 16-divisible, so every load is a scalar one,
    each holding its own predicate and value until the block is reduced. At most one 16-byte piece (VEC
    columns: 8 bf16/fp16, 4 fp32) per thread per block: more warps (up to 8) first, then a smaller block.
    With 32-64 bytes per thread sm_80 spilled inside the loop at 255 registers (bench/NOTES.md)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    num_warps = max(num_warps, min(8, block_v // (vec * 32)))
    return min(block_v, vec * 32 * num_warps), num_warps


def segments_launch_config(N: int, S: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for ops/segments.py: one program per sequence loops over its tokens
    in BLOCK_T chunks, sized from the mean sequence length (the real lengths would need a sync)."""
    mean_len = triton.cdiv(max(N, 1), max(S, 1))
    block_t = min(max(triton.next_power_of_2(mean_len), 16), 1024)
    num_warps = max(1, min(4, block_t // 128))
    return block_t, num_warps


def dpo_launch_config(B: int) -> tuple[int, int]:
    """(BLOCK_B, num_warps) for ops/dpo.py: one program loops over the pairs in BLOCK_B blocks."""
    block_b = min(max(triton.next_power_of_2(B), 16), 256)
    num_warps = 4 if block_b <= 128 else 8
    return block_b, num_warps
