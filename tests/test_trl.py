"""dpo_kernels.integrations.trl.DPOTrainer against TRL 1.16's own DPOTrainer, on a tiny random Llama on the CPU.

Each case builds both trainers from the same weights (policy and a different reference), the same pairs and the
same DPOConfig, takes the same first batch, and compares one `compute_loss` + backward: the loss, every logged
metric and the gradient of every parameter. Where TRL 1.16 itself fails (spec §5, §9), the test asserts that it
does and compares ours with a float64 oracle instead (dpo_kernels.reference on float64 copies of the models).
The helpers here (make_setup, our_trainer, trl_trainer, one_step, assert_same_step, ...) serve test_trl_peft.py and
test_trl_padding_free.py too.

Tolerances (fp32 throughout): both sides run the same fp32 backbone; they differ in how the vocabulary projection
and the log-softmax are evaluated (TRL: its chunked head over the scored rows; ours: dpo_kernels' fused head over the
same rows), i.e. in fp32 rounding only. Loss and metrics: OUT_TOL (atol = rtol = 1e-5). Gradients: rtol 1e-4 and
atol 2e-5 · max(1, max |grad| of the tensor) — looser than GRAD_TOL's fp32 row (one kernel against one rounding of
the fp64 gradient) because here two fp32 paths through a whole backward (lm_head, 2 layers, embeddings) are
compared, and the 1-ulp differences of the summed log-probs (~2e-6 on sums of ~20) are amplified by exp() in the
f-divergence scores and by ipo's square. Largest seen over 20 seeds: 5.6e-6 of the tensor's scale
(ipo + alpha_divergence), 1.5e-6 without an f-divergence.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import OUT_TOL, RUN_SEED
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

GRAD_TOL_TRAINER = {"rtol": 1e-4, "atol": 2e-5}
IGNORE = -100

# (id, DPOConfig loss options). Every loss type once, with the parameters that make it non-trivial.
LOSS_CASES = [
    ("sigmoid", dict(loss_type=["sigmoid"])),
    ("hinge", dict(loss_type=["hinge"])),
    ("ipo", dict(loss_type=["ipo"])),
    ("exo_pair", dict(loss_type=["exo_pair"], label_smoothing=0.1)),
    ("nca_pair", dict(loss_type=["nca_pair"])),
    ("robust", dict(loss_type=["robust"], label_smoothing=0.2)),
    ("bco_pair", dict(loss_type=["bco_pair"])),
    ("sppo_hard", dict(loss_type=["sppo_hard"])),
    ("aot", dict(loss_type=["aot"], label_smoothing=0.1)),
    ("aot_unpaired", dict(loss_type=["aot_unpaired"], label_smoothing=0.1)),
    ("apo_zero", dict(loss_type=["apo_zero"])),
    ("apo_down", dict(loss_type=["apo_down"])),
    ("discopop", dict(loss_type=["discopop"], discopop_tau=0.5)),
    ("sft", dict(loss_type=["sft"])),
    ("sigmoid_norm", dict(loss_type=["sigmoid_norm"])),
    # MPO-style mix: the same log-probs feed every term
    ("mix", dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])),
    # WPO weights and LD-DPO together (ld_alpha reaches the reference log-probs too)
    ("wpo-ld_alpha", dict(loss_type=["sigmoid", "ipo"], use_weighting=True, ld_alpha=0.5)),
    # f-divergences, on the losses where the additive constants do not cancel (per-length scores)
    (
        "ipo-alpha_divergence",
        dict(loss_type=["ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    ),
    ("sigmoid_norm-js", dict(loss_type=["sigmoid_norm"], f_divergence_type="js_divergence")),
    ("robust-forward_kl", dict(loss_type=["robust"], label_smoothing=0.1, f_divergence_type="forward_kl")),
    ("precompute", dict(loss_type=["sigmoid", "sft"], precompute_ref_log_probs=True, ld_alpha=0.7)),
]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: a word-level tokenizer, a tiny Llama policy and a different reference, four pairs


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(45)]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def make_pairs(empty_prompt: bool = False):
    """Four pairs of different prompt and completion lengths (TRL appends </s> to each completion)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": ["" if empty_prompt else "w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w30", "w10"],
            "chosen": [" w11 w12", " w13 w14 w15", " w16", " w17 w18 w19 w20 w31"],
            "rejected": [" w21", " w22 w23", " w24 w25 w26", " w27 w28"],
        }
    )


def make_setup(out: str, vocab_size: int | None = None) -> dict:
    """The tokenizer, a tiny random Llama policy, a different reference (the policy moved a little) and an output
    folder: what every TRL test file builds its trainers from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,  # log-probs far from uniform, so rewards and margins are not ~0
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(RUN_SEED)
    policy = LlamaForCausalLM(config)
    # The reference: the policy moved a little (log-ratios of a few nats: f-divergence scores stay finite in fp32)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    return dict(tokenizer=tokenizer, policy=policy, ref=ref, out=out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("trl")))


def dpo_args(setup, **options):
    from trl import DPOConfig

    defaults = dict(
        output_dir=setup["out"],
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        bf16=False,  # fp32 on both sides: the comparison's tolerances are fp32's
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        beta=0.5,
        seed=RUN_SEED % 2**31,
        disable_tqdm=True,
    )
    return DPOConfig(**{**defaults, **options})


def build_trainer(cls, setup, options, data=None, **kwargs):
    """A trainer on deep copies of the shared weights (both sides start equal; each may train its own)."""
    args = dpo_args(setup, **options)
    return cls(
        model=copy.deepcopy(setup["policy"]),
        ref_model=copy.deepcopy(setup["ref"]),
        args=args,
        train_dataset=make_pairs() if data is None else data,
        processing_class=setup["tokenizer"],
        **kwargs,
    )


def trl_trainer(setup, options, data=None):
    from trl import DPOTrainer

    return build_trainer(DPOTrainer, setup, options, data)


def our_trainer(setup, options, data=None, **kwargs):
    from dpo_kernels.integrations.trl import DPOTrainer

    return build_trainer(DPOTrainer, setup, options, data, **kwargs)


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def one_step(trainer, batch=None):
    """One compute_loss + backward on the first batch: (loss, this step's metrics, {param name: grad}, batch)."""
    batch = first_batch(trainer) if batch is None else batch
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads, batch


def assert_grad_close_scaled(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """GRAD_TOL_TRAINER, with atol scaled by the largest |gradient| of the tensor: an entry is a sum over many
    tokens, so a small one can be the cancellation of large terms, each carrying fp32 rounding of its own size."""
    atol = GRAD_TOL_TRAINER["atol"] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=GRAD_TOL_TRAINER["rtol"], atol=atol, msg=lambda m: f"{name}: {m}")


def assert_same_step(ours, theirs, errors: dict | None = None, out_tol: dict = OUT_TOL):
    loss, metrics, grads, batch = ours
    loss_t, metrics_t, grads_t, batch_t = theirs
    assert torch.equal(batch["input_ids"], batch_t["input_ids"]), "the two trainers saw different batches"
    torch.testing.assert_close(loss, loss_t, **out_tol)
    assert list(metrics) == list(metrics_t), "metric keys (or their order) differ from TRL's"
    for key in metrics_t:
        torch.testing.assert_close(
            float(metrics[key]), float(metrics_t[key]), msg=lambda m, key=key: f"{key}: {m}", **out_tol
        )
    assert grads.keys() == grads_t.keys()
    for name in grads_t:
        assert_grad_close_scaled(grads[name], grads_t[name], name)
    if errors is not None:  # largest differences, for the report (pytest -s prints them)
        errors["loss"] = (loss - loss_t).abs().item()
        errors["metrics"] = max(abs(metrics[k] - metrics_t[k]) for k in metrics_t)
        errors["grads"] = max((grads[n] - grads_t[n]).abs().max().item() for n in grads_t)
        errors["grads/scale"] = max(
            ((grads[n] - grads_t[n]).abs().max() / grads_t[n].abs().max().clamp(min=1.0)).item() for n in grads_t
        )


# ----------------------------------------------------------------------------------------------------------------
# The float64 oracle, for the cases where TRL 1.16 fails


def _shifted(batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    return labels[:, 1:]


def _oracle(setup, batch, options):
    """dpo_kernels.reference in float64 on the models' fp32 logits upcast (the conftest rule: the reference on the
    same inputs in float64), back-propagated through copies of the fp32 models: (output, {param name: grad})."""
    from dpo_kernels import reference

    policy, ref = copy.deepcopy(setup["policy"]), copy.deepcopy(setup["ref"])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref_logits = ref(**inputs).logits[:, :-1].double()
    logits = policy(**inputs).logits[:, :-1].double()
    loss_options = {k: v for k, v in options.items() if k not in ("use_weighting", "ld_alpha")}
    out = reference.dpo_loss_from_logits(
        logits,
        _shifted(batch),
        ref_logits=ref_logits,
        use_weighting=options.get("use_weighting", False),
        ld_alpha=options.get("ld_alpha"),
        beta=options.get("beta", 0.5),
        **{k: v for k, v in loss_options.items() if k != "beta"},
    )
    out.loss.backward()
    return out, {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}


def _assert_matches_oracle(ours, oracle):
    loss, _, grads, _ = ours
    out, grads_ref = oracle
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), out.loss.detach(), **OUT_TOL)
    for name in grads_ref:
        assert_grad_close_scaled(grads[name], grads_ref[name], name)


# ----------------------------------------------------------------------------------------------------------------
# Same numbers as TRL


@pytest.mark.parametrize("options", [pytest.param(o, id=i) for i, o in LOSS_CASES])
def test_trainer_step_matches_trl(setup, options, request):
    errors = {}
    assert_same_step(one_step(our_trainer(setup, options)), one_step(trl_trainer(setup, options)), errors)
    print(
        f"\n{request.node.callspec.id}: max |Δ| loss {errors['loss']:.2e}  metrics {errors['metrics']:.2e}  "
        f"grads {errors['grads']:.2e} (/ max(1, max |grad|): {errors['grads/scale']:.2e})"
    )


def test_trainer_step_matches_trl_empty_prompt(setup):
    """A completion that starts at column 0: ipo / sigmoid_norm divide by TRL's unshifted completion lengths."""
    options = dict(loss_type=["ipo", "sigmoid_norm"])
    data = make_pairs(empty_prompt=True)
    ours, theirs = our_trainer(setup, options, data), trl_trainer(setup, options, data)
    batch = first_batch(theirs)
    assert bool(batch["completion_mask"][:, 0].any())
    assert_same_step(one_step(ours, batch), one_step(theirs, batch))


def test_trainer_step_matches_trl_moe(setup):
    """A Mixture-of-Experts policy: TRL adds router_aux_loss_coef · aux_loss to the loss and logs aux_loss first."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(setup["tokenizer"]),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
        initializer_range=0.3,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    policy = MixtralForCausalLM(config)
    moe = {**setup, "policy": policy, "ref": copy.deepcopy(policy)}
    options = dict(loss_type=["sigmoid"])
    ours, theirs = one_step(our_trainer(moe, options)), one_step(trl_trainer(moe, options))
    assert next(iter(theirs[1])) == "aux_loss"
    assert_same_step(ours, theirs)


def _family_model(name: str, vocab_size: int):
    """A one-layer random model of a family whose output layer is special for the fused head."""
    import transformers

    config_cls, model_cls, extra = {
        "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
        "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0, head_dim=8)),
        "cohere-logit_scale": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
        "granite-logits_scaling": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    }[name]
    config = getattr(transformers, config_cls)(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        **extra,
    )
    torch.manual_seed(RUN_SEED)
    return getattr(transformers, model_cls)(config)


@pytest.mark.parametrize("family", ["qwen2-tied", "gemma2-softcap", "cohere-logit_scale", "granite-logits_scaling"])
def test_trainer_step_matches_trl_model_families(setup, family):
    """Tied embeddings (one Parameter: the head's and the embedding's gradients add up), Gemma 2's final-logit
    softcap, Cohere's logit_scale and Granite's logits_scaling, applied through the fused head as TRL applies them."""
    from dpo_kernels.integrations.trl import logit_transform

    policy = _family_model(family, len(setup["tokenizer"]))
    transform = logit_transform(policy.config)
    assert transform != {"softcap": None, "logit_scale": 1.0} or family == "qwen2-tied"
    if family == "qwen2-tied":
        assert policy.lm_head.weight is policy.model.embed_tokens.weight
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    family_setup = {**setup, "policy": policy, "ref": ref}
    options = dict(loss_type=["sigmoid", "sft"])
    assert_same_step(one_step(our_trainer(family_setup, options)), one_step(trl_trainer(family_setup, options)))


def test_precomputed_reference_matches_trl(setup):
    """compute_ref_log_probs (what precompute_ref_log_probs runs over the dataset) gives TRL's values, LD-DPO
    weights included. (The trainers share the datasets cache of precomputed values, so the step test with
    precompute_ref_log_probs alone would not tell whose values they are.)"""
    options = dict(loss_type=["sigmoid"], ld_alpha=0.7)
    ours, theirs = our_trainer(setup, options), trl_trainer(setup, options)
    batch = first_batch(theirs)
    for mine, trl_value in zip(
        ours.compute_ref_log_probs(ours.ref_model, batch), theirs.compute_ref_log_probs(theirs.ref_model, batch)
    ):
        torch.testing.assert_close(mine, trl_value.double(), **OUT_TOL)


class _VocabAllocations(TorchDispatchMode):
    """Records, for every tensor an op allocates with a dimension of size V, how many rows of V its storage holds
    (views such as an expanded stand-in hold almost none). dpo_kernels' custom ops are run with the mode still on,
    so that the tensors inside them (the head's tiles) are recorded too."""

    def __init__(self, V: int):
        super().__init__()
        self.V, self.rows, self.custom_ops = V, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "dpo_kernels":
            self.custom_ops += 1
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and self.V in t.shape:
                self.rows.append((t.untyped_storage().nbytes() // (self.V * t.element_size()), func.__name__))
        return out


def _raise_if_called(*args, **kwargs):
    raise AssertionError("the lm_head module was called: the logits were built")


TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.mark.parametrize(
    "backend",
    [
        "cpu",  # the tile path with the native row kernels: what a CPU runs without TRITON_INTERPRET
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="needs TRITON_INTERPRET=1 (make test sets it) or CUDA"),
        ),
    ],
)
def test_logits_never_exist(tmp_path, monkeypatch, backend):
    """One training step (reference forward, policy forward and backward) with the head's tiles forced down to 128
    rows, on about 700 scored tokens: the lm_head module is never called, and no tensor with a vocabulary dimension
    and more rows than one tile is ever allocated, for the policy or the reference. The recorder does see a plain
    forward's logits."""
    from dpo_kernels import chunked

    V, tile_rows = 4099, 128  # V: a size no other dimension has
    monkeypatch.setattr(chunked, "TILE_BYTES", tile_rows * V * 4)  # fp32 tiles of 128 rows
    assert chunked.chunk_rows(V, torch.float32) == tile_rows
    big = make_setup(str(tmp_path), vocab_size=V)
    trainer = our_trainer(big, dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5), backend=backend)
    g = torch.Generator().manual_seed(RUN_SEED % 2**31)
    pairs, T, prompt = 2, 240, 40
    lengths = torch.randint(150, T - prompt + 1, (2 * pairs,), generator=g)
    cols = torch.arange(T)
    attention_mask = (cols < prompt + lengths[:, None]).long()
    batch = dict(
        input_ids=torch.randint(3, V, (2 * pairs, T), generator=g).masked_fill(attention_mask == 0, 0),
        attention_mask=attention_mask,
        completion_mask=attention_mask * (cols >= prompt).long(),
    )
    scored = int(batch["completion_mask"][:, 1:].sum())
    assert scored > 4 * tile_rows, "the batch must need several tiles of the head"

    control = _VocabAllocations(V)
    with control, torch.no_grad():
        trainer.model(input_ids=batch["input_ids"][:1, :T], use_cache=False)
    assert max(n for n, _ in control.rows) >= T, "the recorder missed the logits of a plain forward"

    for model in (trainer.model, trainer.ref_model):
        model.lm_head.forward = _raise_if_called
    seen = _VocabAllocations(V)
    trainer.model.train()
    with seen:
        trainer.compute_loss(trainer.model, batch).backward()
    assert seen.custom_ops > 0, "the step did not run dpo_kernels' head"
    largest = max(seen.rows)
    assert largest[0] <= tile_rows, f"{largest[1]} allocated {largest[0]} rows of V logits (tiles: {tile_rows})"
    assert trainer.model.lm_head.weight.grad is not None


def test_trainer_step_reference_backend(setup):
    """The same step with the plain-PyTorch backend (what a CPU without the native extension runs)."""
    options = dict(loss_type=["sigmoid", "ipo"], use_weighting=True, ld_alpha=0.5)
    assert_same_step(one_step(our_trainer(setup, options, backend="reference")), one_step(trl_trainer(setup, options)))


def test_patch_trainer_matches_trl(setup):
    from dpo_kernels.integrations.trl import patch_trainer

    options = dict(loss_type=["apo_down"], ld_alpha=0.3)
    theirs = one_step(trl_trainer(setup, options))
    patched = patch_trainer(trl_trainer(setup, options))
    from trl import DPOTrainer as TRLDPOTrainer

    assert type(patched).compute_loss is not TRLDPOTrainer.compute_loss
    assert_same_step(one_step(patched), theirs)


def test_train_and_evaluate_match_trl(setup):
    """The whole loop: two SGD steps with TR-DPO's reference sync after each, the logged history (loss and metrics
    per step), the parameters of both models afterwards, then evaluate() with its eval_ keys."""
    options = dict(
        loss_type=["sigmoid", "sppo_hard"],
        loss_weights=[1.0, 0.1],
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
    )
    runs = []
    for make in (our_trainer, trl_trainer):
        trainer = make(setup, options)
        trainer.eval_dataset = trainer._prepare_dataset(make_pairs(), trainer.processing_class, trainer.args, "eval")
        trainer.train()
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        evaluation = trainer.evaluate()
        runs.append((history, evaluation, trainer.model.state_dict(), trainer.ref_model.state_dict()))
    (history, evaluation, policy, ref), (history_t, evaluation_t, policy_t, ref_t) = runs
    assert len(history) == len(history_t) == 2
    for entry, entry_t in zip(history, history_t):
        assert entry.keys() == entry_t.keys()
        for key in entry_t:
            torch.testing.assert_close(
                float(entry[key]), float(entry_t[key]), msg=lambda m, key=key: f"{key}: {m}", **OUT_TOL
            )
    eval_keys = {k for k in evaluation_t if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}
    assert "eval_rewards/margins" in eval_keys and eval_keys <= evaluation.keys()
    for key in eval_keys:
        torch.testing.assert_close(
            float(evaluation[key]), float(evaluation_t[key]), msg=lambda m, key=key: f"{key}: {m}", **OUT_TOL
        )
    for name in policy_t:
        assert_grad_close_scaled(policy[name], policy_t[name], name)
        assert_grad_close_scaled(ref[name], ref_t[name], f"ref {name}")
    assert not torch.equal(ref["lm_head.weight"], setup["ref"].state_dict()["lm_head.weight"]), "ref never synced"


# ----------------------------------------------------------------------------------------------------------------
# Where TRL 1.16 fails: TRL's failure, and our finite value against the float64 oracle


@pytest.mark.parametrize("loss_type", ["hinge", "sft"])
def test_wpo_where_trl_fails(setup, loss_type):
    """hinge + WPO fails in TRL's backward, sft + WPO in its forward (in-place multiplies, spec §5)."""
    options = dict(loss_type=[loss_type], use_weighting=True)
    theirs = trl_trainer(setup, options)
    batch = first_batch(theirs)
    theirs.model.train()
    with pytest.raises(RuntimeError):
        theirs.compute_loss(theirs.model, batch).backward()
    ours = one_step(our_trainer(setup, options), batch)
    _assert_matches_oracle(ours, _oracle(setup, batch, options))


def test_discopop_where_trl_returns_nan(setup):
    """discopop with β·Δ < −88.7 for one pair: TRL's exp(−z)·σ(z/τ) is inf·0 = NaN (spec §9); ours is finite."""
    from datasets import Dataset

    probe = trl_trainer(setup, dict(loss_type=["sigmoid"]))
    batch = first_batch(probe)
    out, _ = _oracle(setup, batch, dict(loss_type=["sigmoid"], beta=1.0))
    delta = (out.chosen_rewards - out.rejected_rewards).detach()
    data = make_pairs()
    if delta[delta.abs().argmax()] > 0:  # swap chosen and rejected so that the largest |Δ| is negative
        data = Dataset.from_dict({"prompt": data["prompt"], "chosen": data["rejected"], "rejected": data["chosen"]})
    options = dict(loss_type=["discopop"], beta=120.0 / delta.abs().max().item())

    theirs = trl_trainer(setup, options, data)
    batch = first_batch(theirs)
    theirs.model.train()
    assert torch.isnan(theirs.compute_loss(theirs.model, batch))
    ours = one_step(our_trainer(setup, options, data), batch)
    _assert_matches_oracle(ours, _oracle(setup, batch, options))


# ----------------------------------------------------------------------------------------------------------------
# Refused at construction


REFUSED = [
    ("ld_alpha", dict(ld_alpha=1.5), {}, "ld_alpha must be in \\[0, 1\\]"),
    ("beta", dict(beta=0.0), {}, "beta must be a finite number > 0"),
    (
        "robust-eps",
        dict(loss_type=["robust"], label_smoothing=0.6),
        {},
        "'robust' needs label_smoothing in \\[0, 0.5\\)",
    ),
    ("exo_pair-eps", dict(loss_type=["exo_pair"], label_smoothing=1.0), {}, "'exo_pair' needs label_smoothing"),
    ("discopop_tau", dict(loss_type=["discopop"], discopop_tau=0.0), {}, "discopop_tau must be a finite number > 0"),
    ("unknown-loss", dict(loss_type=["simpo"]), {}, "unknown loss_type 'simpo'"),
    ("backend", {}, dict(backend="cuda"), "unknown backend 'cuda'"),
    ("keep_logits", {}, dict(keep_logits="auto"), "keep_logits must be True or False, got 'auto'"),
]


@pytest.mark.parametrize("options, kwargs, message", [pytest.param(*r[1:], id=r[0]) for r in REFUSED])
def test_refused_options(setup, options, kwargs, message):
    from dpo_kernels.integrations.trl import DPOTrainer

    with pytest.raises(ValueError, match=message):
        DPOTrainer(
            model=setup["policy"],
            ref_model=setup["ref"],
            args=dpo_args(setup, **options),
            train_dataset=make_pairs(),
            processing_class=setup["tokenizer"],
            **kwargs,
        )


def test_refused_zero3(setup):
    """ZeRO-3 re-partitions lm_head.weight after the forward, where the fused head's backward reads it."""
    from dpo_kernels.integrations.trl import DPOTrainer

    args = dpo_args(setup)
    args.deepspeed_plugin = types.SimpleNamespace(zero_stage=3)  # what DeepSpeed's config gives TrainingArguments
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO-3; .* use FSDP2"):
        DPOTrainer(setup["policy"], setup["ref"], args, train_dataset=make_pairs(), processing_class=setup["tokenizer"])


def test_refused_vision_dataset(setup):
    from datasets import Dataset

    from dpo_kernels.integrations.trl import DPOTrainer

    data = Dataset.from_dict({"images": [[]], "prompt": ["w1"], "chosen": [" w2"], "rejected": [" w3"]})
    with pytest.raises(ValueError, match="does not support vision datasets"):
        DPOTrainer(
            setup["policy"], setup["ref"], dpo_args(setup), train_dataset=data, processing_class=setup["tokenizer"]
        )


def test_patch_trainer_refuses(setup):
    from dpo_kernels.integrations.trl import patch_trainer

    trainer = trl_trainer(setup, dict(loss_type=["sigmoid"]))
    trainer.args.ld_alpha = 2.0  # accepted by TRL, which would use it as is
    with pytest.raises(ValueError, match="ld_alpha must be in"):
        patch_trainer(trainer)
    with pytest.raises(TypeError, match="expects a trl.DPOTrainer"):
        patch_trainer(object())


# ----------------------------------------------------------------------------------------------------------------
# TRL stays optional


def test_trl_is_optional():
    """`import dpo_kernels` imports neither trl nor transformers; without trl the adapter says what to install."""
    code = (
        "import sys\n"
        "import dpo_kernels, dpo_kernels.integrations\n"
        "assert 'trl' not in sys.modules and 'transformers' not in sys.modules, 'dpo_kernels imported trl'\n"
        "sys.modules['trl'] = None  # as if it were not installed\n"
        "try:\n"
        "    import dpo_kernels.integrations.trl\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "pip install dpo-kernels[trl]" in result.stdout
