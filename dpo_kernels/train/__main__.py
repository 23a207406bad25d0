"""python -m dpo_kernels.train: SFT then DPO with dpo_kernels (the loop in loop.py, the knobs in knobs.py).

The knobs are parsed before anything heavy is imported, so that `--help` and a mistyped flag answer at once.
Exit codes: 0 done; 1 bad input or a non-finite loss (one line on stderr); 128 + the signal number when SIGINT or
SIGTERM interrupted the run after saving a checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from dpo_kernels.train.knobs import parse_knobs


def main(argv: list[str] | None = None) -> None:
    knobs = parse_knobs(argv)
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun: only rank 0 logs its progress
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    import datasets
    import torch
    import torch.distributed as dist

    from dpo_kernels.train.loop import StopTraining, prepare, train

    datasets.disable_progress_bars()
    if knobs.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(knobs.cpu_threads)
    try:
        run = prepare(knobs)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    try:
        train(run)
        if run.world > 1:  # every rank done (rank 0 writes the model last) before the group is torn down
            dist.barrier()
    except StopTraining as stop:
        print(f"error: {stop}" if stop.code == 1 else str(stop), file=sys.stderr)
        sys.exit(stop.code)
    finally:
        if run.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
