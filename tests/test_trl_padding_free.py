"""Padding-free DPO (`padding_free=True`, which TRL 1.16 ignores) in dpo_kernels.integrations.trl.DPOTrainer.

The packed run must be the padded run of the same pairs: for every loss type (the length-normalised ones and LD-DPO
/ WPO included) the same loss, metrics and parameter gradients as TRL 1.16's own padded step (tolerances of
test_trl.py: the packed forward's attention runs another mask, so the two differ by fp32 rounding), and the same
per-sequence log-probs as our padded step. On the CPU, transformers' sdpa and eager attention restart at position_ids
resets when no attention mask and no cache are given; a registered attention kernel without that (causal over the
whole row, as a kernel without varlen support) is refused.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import OUT_TOL
from test_trl import (
    LOSS_CASES,
    assert_same_step,
    dpo_args,
    first_batch,
    make_pairs,
    make_setup,
    one_step,
    our_trainer,
    trl_trainer,
)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("trl_padding_free")))


def _packed(setup, options, data=None, **kwargs):
    return our_trainer(setup, {**options, "padding_free": True}, data, **kwargs)


def _sequence_logps(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's per-sequence log-probs [B], [B] of one compute_loss (what its metrics were computed from)."""
    seen = {}
    log_metrics = trainer._dk_log_metrics

    def spy(mode, inputs, packed_batch, out):
        seen["out"] = out
        return log_metrics(mode, inputs, packed_batch, out)

    trainer._dk_log_metrics = spy
    trainer.compute_loss(trainer.model, batch)
    del trainer._dk_log_metrics
    return seen["out"].chosen_logps.detach(), seen["out"].rejected_logps.detach()


# Packed against padded: the backbones differ too (attention over a packed row vs a padded one), by fp32 rounding that
# ipo's square and the f-divergences' exp amplify in the loss: seen 1.35e-5 relative at a loss of 5.5e4 (ipo +
# alpha_divergence); the gradients keep test_trl.py's tolerance.
PACKED_OUT_TOL = {**OUT_TOL, "rtol": 1e-4}


@pytest.mark.parametrize("options", [pytest.param(o, id=i) for i, o in LOSS_CASES])
def test_padding_free_step_matches_padded(setup, options):
    """Every loss case of test_trl.py, packed: TRL's padded loss, metrics and gradients; our padded per-sequence
    log-probs."""
    packed, theirs = _packed(setup, options), trl_trainer(setup, options)
    batch = first_batch(theirs)
    assert_same_step(one_step(packed, batch), one_step(theirs, batch), out_tol=PACKED_OUT_TOL)
    padded = our_trainer(setup, options)
    for a, b in zip(_sequence_logps(packed, batch), _sequence_logps(padded, batch)):
        torch.testing.assert_close(a, b, **OUT_TOL)


def test_padding_free_segment_boundaries(setup):
    """Empty prompts: every completion starts its sequence, so in the packed row a sequence's last token is followed
    by a completion token of the next sequence. That pair must never be scored (labels shift within a sequence),
    and ipo / sigmoid_norm divide by TRL's unshifted completion lengths, one more than the scored tokens."""
    from dpo_kernels.integrations.trl import _batch

    options = dict(loss_type=["ipo", "sigmoid_norm"], ld_alpha=0.5)
    data = make_pairs(empty_prompt=True)
    packed, theirs = _packed(setup, options, data), trl_trainer(setup, options, data)
    batch = first_batch(theirs)
    assert bool(batch["completion_mask"][:, 0].any())

    view = _batch(batch, padding_free=True)
    positions = view.model_kwargs["position_ids"][0]
    real = batch["attention_mask"].bool()
    lengths = real.sum(1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    ends = starts + lengths - 1
    assert torch.equal(positions[starts], torch.zeros_like(starts)), "position_ids must restart at each sequence"
    assert "attention_mask" not in view.model_kwargs
    assert not view.select[0, ends].any(), "a sequence's last token scored the next sequence's first token"
    assert torch.equal(view.labels, _batch(batch, padding_free=False).labels)
    assert torch.equal(view.lengths, batch["completion_mask"].sum(1))
    assert torch.equal(view.counts + batch["completion_mask"][:, 0], view.lengths)

    assert_same_step(one_step(packed, batch), one_step(theirs, batch), out_tol=PACKED_OUT_TOL)


def test_padding_free_precomputed_reference_matches_trl(setup):
    """compute_ref_log_probs on a packed batch (what precompute_ref_log_probs runs) gives TRL's padded values."""
    options = dict(loss_type=["sigmoid"], ld_alpha=0.7)
    packed, theirs = _packed(setup, options), trl_trainer(setup, options)
    batch = first_batch(theirs)
    for mine, trl_value in zip(
        packed.compute_ref_log_probs(packed.ref_model, batch), theirs.compute_ref_log_probs(theirs.ref_model, batch)
    ):
        torch.testing.assert_close(mine, trl_value.double(), **OUT_TOL)


def test_padding_free_patch_trainer(setup):
    """A TRL trainer built with padding_free=True (TRL pads anyway) packs once patched."""
    from dpo_kernels.integrations.trl import patch_trainer

    options = dict(loss_type=["sigmoid", "sft"], padding_free=True)
    theirs = trl_trainer(setup, options)
    batch = first_batch(theirs)
    reference = one_step(theirs, batch)
    patched = patch_trainer(trl_trainer(setup, options))
    assert patched._dk_padding_free
    assert_same_step(one_step(patched, batch), reference)


def test_padding_free_lora_matches_trl(setup):
    """Packed batches through a PEFT model, the reference with its adapters disabled."""
    pytest.importorskip("peft", reason="peft is not installed (pip install dpo-kernels[trl])")
    from peft import LoraConfig
    from trl import DPOTrainer as TRLDPOTrainer

    from dpo_kernels.integrations.trl import DPOTrainer

    steps = []
    for cls, padding_free in ((DPOTrainer, True), (TRLDPOTrainer, False)):
        torch.manual_seed(0)
        trainer = cls(
            model=copy.deepcopy(setup["policy"]),
            args=dpo_args(setup, loss_type=["sigmoid"], padding_free=padding_free),
            train_dataset=make_pairs(),
            processing_class=setup["tokenizer"],
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        steps.append(one_step(trainer, steps[0][3] if steps else None))
    assert_same_step(*steps)


def _causal_only_attention():
    """Registers (once) an attention kernel that ignores sequence boundaries: causal over the whole row."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("causal_only_test", causal_only)
    return "causal_only_test"


def test_padding_free_refused_without_restarting_attention(setup):
    """Checked at construction, on a short packed input, before TRL does any work."""
    from dpo_kernels.integrations.trl import DPOTrainer

    policy = copy.deepcopy(setup["policy"])
    policy.set_attn_implementation(_causal_only_attention())
    with pytest.raises(ValueError, match="does not support padding_free=True with LlamaForCausalLM .*causal_only_test"):
        DPOTrainer(
            policy,
            copy.deepcopy(setup["ref"]),
            dpo_args(setup, padding_free=True),
            train_dataset=make_pairs(),
            processing_class=setup["tokenizer"],
        )


def test_padding_free_refuses_a_reference_without_restarting_attention(setup):
    """The reference model is checked too (it runs the packed batches as well)."""
    from dpo_kernels.integrations.trl import DPOTrainer

    ref = copy.deepcopy(setup["ref"])
    ref.set_attn_implementation(_causal_only_attention())
    with pytest.raises(ValueError, match="does not support padding_free=True"):
        DPOTrainer(
            copy.deepcopy(setup["policy"]),
            ref,
            dpo_args(setup, padding_free=True),
            train_dataset=make_pairs(),
            processing_class=setup["tokenizer"],
        )


def test_padding_free_refuses_rows_with_gaps(setup):
    """A collator whose attention mask has a hole in a row cannot be packed."""
    trainer = _packed(setup, dict(loss_type=["sigmoid"]))
    batch = first_batch(trainer)
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][0, 1] = 0
    with pytest.raises(ValueError, match="padding_free=True needs each row's attention_mask to be one run"):
        trainer.compute_loss(trainer.model, batch)
