"""`--fsdp` of the training script under `torchrun --nproc-per-node 2` on the CPU (gloo): FSDP2's fully_shard of the
decoder layers and the model. The two ranks split each global batch, so a run with 2 pairs per rank sees the batches
of one process with 4: its DPO loss curve equals that run's, and the saved model is a normal save_pretrained folder
(the DPO phase only: SFT's token-mean loss is a mean per rank, not over the global batch, in any data-parallel run).
"""

from __future__ import annotations

import pytest

from tests.test_train_tp import (
    assert_same_curve,
    assert_same_model,
    cache_dir,  # noqa: F401 (the fixture)
    flags,
    saved_model,
    single_process,
    torchrun,
)

pytestmark = pytest.mark.usefixtures("one_thread")
# TRL's token-weighted metrics are ratios per micro-batch (and per rank), so they depend on how a batch is split:
# the pair means (loss, rewards, logps) do not.
TOKEN_WEIGHTED = frozenset({"logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"})


def test_fsdp_loss_curve_equals_single_process(tmp_path, cache_dir):  # noqa: F811
    steps = ["--sft-steps", "0", "--max-steps", "4"]
    single_process(flags(tmp_path / "single", cache_dir, *steps, "--per-device-train-batch-size", "4"))
    torchrun(flags(tmp_path / "fsdp", cache_dir, *steps, "--per-device-train-batch-size", "2", "--fsdp",
                   "--save-steps", "2"))  # fmt: skip
    assert_same_curve(tmp_path / "fsdp", tmp_path / "single", skip=TOKEN_WEIGHTED)
    assert_same_model(tmp_path / "fsdp", tmp_path / "single")
    saved_model(tmp_path / "fsdp" / "checkpoint-2")  # the checkpoint: a model folder too
