"""dpo_kernels.integrations.trl.DPOTrainer with PEFT (LoRA) against TRL 1.16's DPOTrainer with the same LoraConfig.

With `ref_model=None` TRL's reference is the policy with its adapters disabled (a `peft_config`), or a frozen copy of
the adapter (a PeftModel passed in); ours goes through TRL's own `use_adapter`, so both must give the same loss,
metrics and gradients, and only the adapters' parameters may receive gradients. The adapters start random
(`init_lora_weights=False`) so that the policy differs from the base model and the rewards are not zero; both
trainers are built from the same seed, so their adapters start equal. Tolerances: test_trl.py's.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import RUN_SEED
from test_trl import assert_same_step, dpo_args, first_batch, make_pairs, make_setup, one_step

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("trl") is None or importlib.util.find_spec("peft") is None,
        reason="trl and peft are not installed (pip install dpo-kernels[trl])",
    ),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("trl_peft")))


def _lora(**overrides):
    from peft import LoraConfig

    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return LoraConfig(**{**options, **overrides})


def _peft_trainer(ours: bool, setup, options, model=None, peft_config=None, **kwargs):
    """A trainer without ref_model on a copy of the policy (or of `model`), the adapters seeded alike."""
    from trl import DPOTrainer as TRLDPOTrainer

    from dpo_kernels.integrations.trl import DPOTrainer

    torch.manual_seed(RUN_SEED % 2**31)
    return (DPOTrainer if ours else TRLDPOTrainer)(
        model=copy.deepcopy(setup["policy"] if model is None else model),
        ref_model=None,
        args=dpo_args(setup, **options),
        train_dataset=make_pairs(),
        processing_class=setup["tokenizer"],
        peft_config=peft_config,
        **kwargs,
    )


def _assert_adapters_only(grads: dict) -> None:
    assert grads, "no parameter received a gradient"
    frozen = [name for name in grads if "lora_" not in name and "modules_to_save" not in name]
    assert not frozen, f"base-model parameters received gradients: {frozen[:3]}"


LORA_CASES = [
    ("sigmoid", dict(loss_type=["sigmoid"]), {}),
    ("ipo-wpo-ld_alpha", dict(loss_type=["sigmoid", "ipo"], use_weighting=True, ld_alpha=0.5), {}),
    ("precompute", dict(loss_type=["sigmoid"], precompute_ref_log_probs=True), {}),
    # a trainable copy of the output layer: the head reads the active copy's weight, the original for the reference
    ("modules_to_save-lm_head", dict(loss_type=["sigmoid"]), dict(modules_to_save=["lm_head"])),
]


@pytest.mark.parametrize("options, lora", [pytest.param(o, c, id=i) for i, o, c in LORA_CASES])
def test_lora_step_matches_trl(setup, options, lora):
    """A peft_config: the reference is the base model (adapters disabled), in both trainers."""
    ours = _peft_trainer(True, setup, options, peft_config=_lora(**lora))
    theirs = _peft_trainer(False, setup, options, peft_config=_lora(**lora))
    assert ours.ref_model is None and theirs.ref_model is None
    step, step_t = one_step(ours), one_step(theirs)
    assert step[1]["rewards/margins"] != 0.0, "the adapters should move the policy away from the reference"
    assert_same_step(step, step_t)
    _assert_adapters_only(step[2])


def test_peft_model_with_its_adapter_matches_trl(setup):
    """A PeftModel passed in (an adapter to go on training): TRL freezes a copy of it as the "ref" adapter."""
    from peft import get_peft_model

    torch.manual_seed(RUN_SEED % 2**31)
    model = get_peft_model(copy.deepcopy(setup["policy"]), _lora())
    options = dict(loss_type=["sigmoid", "bco_pair"])
    ours, theirs = _peft_trainer(True, setup, options, model=model), _peft_trainer(False, setup, options, model=model)
    assert "ref" in ours.model.peft_config
    step = one_step(ours)
    assert_same_step(step, one_step(theirs))
    _assert_adapters_only(step[2])


def test_lora_train_matches_trl(setup):
    """Two optimizer steps: the adapters after training and the logged history."""
    options = dict(loss_type=["sigmoid"], max_steps=2, per_device_train_batch_size=2, logging_steps=1, optim="sgd")
    runs = []
    for ours in (True, False):
        trainer = _peft_trainer(ours, setup, options, peft_config=_lora())
        trainer.train()
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        adapters = {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}
        runs.append((history, adapters))
    (history, adapters), (history_t, adapters_t) = runs
    assert len(history) == len(history_t) == 2
    for entry, entry_t in zip(history, history_t):
        for key in entry_t:
            torch.testing.assert_close(float(entry[key]), float(entry_t[key]), rtol=1e-5, atol=1e-5, msg=key)
    assert adapters.keys() == adapters_t.keys() and adapters
    for name in adapters_t:
        torch.testing.assert_close(adapters[name], adapters_t[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_lm_head_refused(setup):
    """An adapter on the output layer would be ignored by a head that reads lm_head.weight: refused before TRL
    does any work (and by TRL itself, on a trainer built with it)."""
    from dpo_kernels.integrations.trl import DPOTrainer

    with pytest.raises(ValueError, match="does not support a PEFT adapter on the output layer.*remove the output"):
        DPOTrainer(
            copy.deepcopy(setup["policy"]),
            args=dpo_args(setup),
            train_dataset=make_pairs(),
            processing_class=setup["tokenizer"],
            peft_config=_lora(target_modules=["q_proj", "lm_head"]),
        )


def test_lora_on_lm_head_refused_at_the_forward(setup):
    """An adapter put on the output layer after the trainer was built is refused at the next step."""
    from peft import inject_adapter_in_model

    trainer = _peft_trainer(True, setup, dict(loss_type=["sigmoid"]), peft_config=_lora())
    inject_adapter_in_model(_lora(target_modules=["lm_head"]), trainer.model.get_base_model(), adapter_name="head")
    with pytest.raises(ValueError, match="does not support a PEFT adapter on the output layer"):
        trainer.compute_loss(trainer.model, first_batch(trainer))


def test_prompt_learning_refused(setup):
    """Prefix / prompt tuning put virtual tokens into the hidden states: refused."""
    from peft import PromptTuningConfig

    from dpo_kernels.integrations.trl import DPOTrainer

    with pytest.raises(ValueError, match="does not support prompt-learning PEFT"):
        DPOTrainer(
            copy.deepcopy(setup["policy"]),
            args=dpo_args(setup),
            train_dataset=make_pairs(),
            processing_class=setup["tokenizer"],
            peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        )
