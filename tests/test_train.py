"""The reference training script: a short end-to-end run, the data pipeline on hand-made rows, the
reference-model options, and a clear error for each kind of bad input."""

import copy
import json
import logging
import math
import os

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.losses import REWARD_METRICS, STATS_METRICS
from dpo_kernels.train.__main__ import main
from dpo_kernels.train.data import BUNDLED_TRAIN, collate, load_pairs, tokenize_pairs
from dpo_kernels.train.knobs import Knobs
from dpo_kernels.train.loop import Reference, dpo_loss, forward, prepare, to_device, train
from dpo_kernels.train.model import Backbone, check_packing, load_model, load_tokenizer
from tests.conftest import GRAD_TOL, OUT_TOL

# Hand-made pairs in the bundled data's layout (completions keep their leading space).
ROWS = [
    {
        "prompt": "Human: What is two plus two?\n\nAssistant:",
        "chosen": " Four.",
        "rejected": " Five.",
    },
    {
        "prompt": "Human: Name a colour.\n\nAssistant: Blue.\n\nHuman: Another one?\n\nAssistant:",
        "chosen": " Green, like grass in spring after the rain.",
        "rejected": " No.",
    },
    {
        "prompt": "Human: Say hi.\n\nAssistant:",
        "chosen": " Hi!",
        "rejected": " Hello there, friend.",
    },
]
CONVERSATIONS = [
    {
        "prompt": [{"role": "user", "content": "What is two plus two?"}],
        "chosen": [{"role": "assistant", "content": "Four."}],
        "rejected": [{"role": "assistant", "content": "Five."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": [{"role": "assistant", "content": "Green."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TRL_KEYS = {"loss", "num_tokens", *REWARD_METRICS, *STATS_METRICS}
# Interpreted Triton (`make test`) takes minutes for a tiny training run: use the reference there.
BACKEND = "reference" if os.environ.get("TRITON_INTERPRET") == "1" else None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tokenizer(cache_dir):
    return load_tokenizer("tiny", cache_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_knobs(tmp_path, cache_dir, **overrides) -> Knobs:
    """A run of a few seconds: 48 pairs of at most 64 tokens, a few steps."""
    knobs = dict(
        cache_dir=str(cache_dir),
        output_dir=str(tmp_path / "out"),
        max_train_pairs=48,
        max_eval_pairs=16,
        max_length=64,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        sft_steps=4,
        max_steps=12,
        learning_rate=1e-3,
        logging_steps=4,
        backend=BACKEND,
    )
    return Knobs(**{**knobs, **overrides})


def read_records(knobs: Knobs) -> list[dict]:
    with open(f"{knobs.output_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_train_end_to_end(tmp_path, cache_dir, padding_free):
    # evaluated on the pairs it trains on, so that a dozen steps must lower the loss
    knobs = tiny_knobs(
        tmp_path,
        cache_dir,
        eval_file=str(BUNDLED_TRAIN),
        max_eval_pairs=48,
        padding_free=padding_free,
        plot=True,
    )
    result = train(prepare(knobs))
    before, after = result["before"], result["after"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert after["loss"] < before["loss"] - 0.01
    assert after["rewards/accuracies"] > 0.5

    records = read_records(knobs)
    assert [r["phase"] for r in records if r["phase"] != "dpo"] == ["sft", "eval", "eval"]
    dpo = [r for r in records if r["phase"] == "dpo"]
    assert [r["step"] for r in dpo] == [8, 12, 16]
    for record in dpo:
        assert TRL_KEYS <= record.keys(), TRL_KEYS - record.keys()
    assert dpo[-1]["loss"] < dpo[0]["loss"]
    assert {f"eval_{k}" for k in TRL_KEYS - {"num_tokens"}} <= records[-1].keys()
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "knobs.json", "curves.png"):
        assert (out / name).exists(), name


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_fused_head_matches_logits(tmp_path, cache_dir, padding_free):
    # the first DPO step of the tiny model: same loss, metrics and parameter gradients either way
    out, grads, ref = {}, {}, {}
    for head in ("logits", "fused"):
        run = prepare(tiny_knobs(tmp_path, cache_dir, head=head, padding_free=padding_free))
        assert isinstance(run.model, Backbone) == (head == "fused")
        batch = to_device(collate(run.train_pairs[:4], run.tokenizer.pad_token_id, padding_free), run.device)
        ref[head] = torch.stack(Reference(copy.deepcopy(run.model), run)(batch, "train"))
        shifted = ref[head] + torch.tensor([[0.5], [-0.5]])  # not the policy: a loss other than log 2
        out[head] = dpo_loss(run.model, batch, *shifted, run.knobs)
        out[head].loss.backward()
        grads[head] = {name: p.grad for name, p in run.policy.named_parameters()}
    torch.testing.assert_close(ref["fused"], ref["logits"], **OUT_TOL)
    torch.testing.assert_close(out["fused"].loss, out["logits"].loss, **OUT_TOL)
    for key, value in out["logits"].metrics.items():
        torch.testing.assert_close(out["fused"].metrics[key], value, **OUT_TOL, msg=key)
    for name, grad in grads["logits"].items():
        torch.testing.assert_close(grads["fused"][name], grad, **GRAD_TOL[torch.float32], msg=name)


def test_fused_head_refuses_a_transform_it_cannot_reproduce(tokenizer):
    model = load_model("tiny", tokenizer, max_length=64)
    model.config.final_logit_softcapping = 5.0  # read as a softcap, which Llama does not apply
    with pytest.raises(ValueError, match="use --head logits"):
        Backbone(model)


def test_trainer_trl(tmp_path, cache_dir):
    pytest.importorskip("trl")
    knobs = tiny_knobs(tmp_path, cache_dir, trainer="trl", max_steps=4, logging_steps=2)
    result = train(prepare(knobs))
    # --padding-free through the drop-in (TRL 1.16 itself ignores padding_free): the same DPO curve
    packed = tiny_knobs(tmp_path / "packed", cache_dir, trainer="trl", max_steps=4, logging_steps=2, padding_free=True)
    train(prepare(packed))
    curves = [[r["loss"] for r in read_records(k) if r["phase"] == "dpo" and "loss" in r] for k in (knobs, packed)]
    assert curves[1] == pytest.approx(curves[0], rel=1e-4, abs=1e-5)
    assert result["before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(result["after"]["loss"])
    records = read_records(knobs)
    assert [r["phase"] for r in records if r["phase"] != "dpo"] == ["sft", "sft", "eval", "eval"]
    dpo = [r for r in records if r["phase"] == "dpo" and "loss" in r]  # not TRL's closing summary
    assert [r["step"] for r in dpo] == [6, 8]
    for record in dpo:
        assert TRL_KEYS <= record.keys(), TRL_KEYS - record.keys()


def test_precomputed_reference_matches_frozen_copy(tmp_path, cache_dir):
    losses = {}
    for precompute in (False, True):
        knobs = tiny_knobs(
            tmp_path / str(precompute),
            cache_dir,
            max_steps=2,
            logging_steps=1,
            precompute_ref_log_probs=precompute,
        )
        train(prepare(knobs))
        losses[precompute] = [r for r in read_records(knobs) if r["phase"] == "dpo"]
    for frozen, precomputed in zip(losses[False], losses[True]):
        for key in ("loss", "rewards/chosen", "rewards/margins"):
            assert precomputed[key] == pytest.approx(frozen[key], abs=1e-5), key
    assert losses[True][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_trdpo_sync_moves_the_reference(tmp_path, cache_dir):
    run = prepare(tiny_knobs(tmp_path, cache_dir, sft_steps=0, max_steps=2, ref_model_sync_steps=1))
    reference = Reference(copy.deepcopy(run.policy), run)
    with torch.no_grad():
        for p in run.policy.parameters():
            p.add_(1.0)
    ref_before = [p.clone() for p in reference.model.parameters()]
    reference.sync(run.policy, alpha=0.25)
    for old, new, target in zip(ref_before, reference.model.parameters(), run.policy.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * target)


# ------------------------------------------------------------------------------------------------
# The data pipeline


def expected_labels(ids: list[int], start: int) -> list[int]:
    """labels[t] = ids[t + 1] where that is a completion token, else -100."""
    first = max(start, 1)
    return [ids[t + 1] if first <= t + 1 < len(ids) else -100 for t in range(len(ids))]


def test_rows_masks_and_eos(tmp_path, tokenizer):
    pairs = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", ROWS)), tokenizer, 64)
    eos = tokenizer.eos_token_id
    for pair, row in zip(pairs, ROWS):
        prompt = tokenizer(row["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            ids, start = pair[f"{key}_ids"], pair[f"{key}_start"]
            assert ids == tokenizer(row["prompt"] + row[key])["input_ids"] + [eos]
            assert start == len(prompt) and ids[:start] == prompt
    batch = collate(pairs, pad_id=tokenizer.pad_token_id)
    B, T = len(pairs), batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == (2 * B, T)
    rows = [(p["chosen_ids"], p["chosen_start"]) for p in pairs]
    rows += [(p["rejected_ids"], p["rejected_start"]) for p in pairs]  # chosen first
    for r, (ids, start) in enumerate(rows):
        pad = T - len(ids)
        assert batch["input_ids"][r].tolist() == ids + [tokenizer.pad_token_id] * pad
        assert batch["attention_mask"][r].tolist() == [1] * len(ids) + [0] * pad
        assert batch["labels"][r].tolist() == expected_labels(ids, start) + [-100] * pad
    assert batch["index"].tolist() == list(range(B))


def test_packed_batch_layout(tmp_path, tokenizer):
    pairs = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", ROWS)), tokenizer, 64)
    batch = collate(pairs, pad_id=tokenizer.pad_token_id, padding_free=True)
    rows = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    starts = [p["chosen_start"] for p in pairs] + [p["rejected_start"] for p in pairs]
    cu = [0]
    for ids in rows:
        cu.append(cu[-1] + len(ids))
    assert batch["cu_seqlens"].tolist() == cu and batch["cu_seqlens"].dtype == torch.int32
    assert batch["input_ids"][0].tolist() == sum(rows, [])
    assert batch["position_ids"][0].tolist() == sum([list(range(len(r))) for r in rows], [])
    labels = sum([expected_labels(ids, s) for ids, s in zip(rows, starts)], [])
    assert batch["labels"].tolist() == labels  # never a target across a sequence boundary


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_packing_gives_the_logps_of_padding(tmp_path, tokenizer, ld_alpha):
    pairs = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", ROWS)), tokenizer, 64)
    model = load_model("tiny", tokenizer, max_length=64).eval()
    check_packing(model)
    seqs = {}
    for padding_free in (False, True):
        batch = collate(pairs, pad_id=tokenizer.pad_token_id, padding_free=padding_free)
        with torch.no_grad():
            logits = forward(model, batch, bf16=False)
            logps = dk.token_logps(logits, batch["labels"], backend=BACKEND)
        cu_seqlens = batch.get("cu_seqlens")
        seqs[padding_free] = dk.sequence_logps(
            logps, batch["labels"], ld_alpha=ld_alpha, cu_seqlens=cu_seqlens, backend=BACKEND
        )
    torch.testing.assert_close(seqs[True].logps, seqs[False].logps, atol=1e-5, rtol=1e-5)
    assert seqs[True].n_tokens.tolist() == seqs[False].n_tokens.tolist()


def test_truncation_keep_start_and_keep_end(tmp_path, tokenizer):
    ds = load_pairs(write_jsonl(tmp_path / "p.jsonl", ROWS[1:2]))
    (full,) = tokenize_pairs(ds, tokenizer, 1000)
    start, ids = full["chosen_start"], full["chosen_ids"]
    max_length = start + 3  # the prompt fits, the chosen completion does not
    assert len(ids) > max_length
    (head,) = tokenize_pairs(ds, tokenizer, max_length, "keep_start")
    assert head["chosen_ids"] == ids[:max_length] and head["chosen_start"] == start
    (tail,) = tokenize_pairs(ds, tokenizer, max_length, "keep_end")
    cut = len(ids) - max_length
    assert tail["chosen_ids"] == ids[cut:] and tail["chosen_start"] == start - cut
    assert tail["chosen_ids"][-1] == tokenizer.eos_token_id
    assert tail["rejected_ids"] == full["rejected_ids"][-max_length:]


def test_long_prompts_dropped_with_a_count(tmp_path, tokenizer, caplog):
    long_prompt = "Human: " + "word " * 100 + "\n\nAssistant:"
    rows = ROWS + [{"prompt": long_prompt, "chosen": " a", "rejected": " b"}]
    ds = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    with caplog.at_level(logging.INFO):
        pairs = tokenize_pairs(ds, tokenizer, 64, name="mine")
    assert len(pairs) == len(ROWS) and [p["index"] for p in pairs] == [0, 1, 2]
    assert "mine: dropped 1 of 4 pairs" in caplog.text


def test_conversational_plain_rendering(tmp_path, tokenizer):
    assert not tokenizer.chat_template
    ds = load_pairs(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS))
    pairs = tokenize_pairs(ds, tokenizer, 64)
    head = "User: What is two plus two?\n\nAssistant:"
    eos = [tokenizer.eos_token_id]
    assert pairs[0]["chosen_ids"] == tokenizer(head + " Four.")["input_ids"] + eos
    assert pairs[0]["chosen_start"] == len(tokenizer(head)["input_ids"])


def test_conversational_chat_template(tmp_path, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    ds = load_pairs(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS))
    pairs = tokenize_pairs(ds, tokenizer, 64)
    messages = CONVERSATIONS[1]["prompt"] + CONVERSATIONS[1]["chosen"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = pairs[1]["chosen_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # no second EOS
    assert ids.count(tokenizer.eos_token_id) == len(messages)
    prompt = CONVERSATIONS[1]["prompt"]
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert pairs[1]["chosen_start"] == len(tokenizer(head, add_special_tokens=False)["input_ids"])


def test_parquet_and_folder_inputs(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "p.parquet", tmp_path / "saved"):
        assert load_pairs(path).to_list() == ROWS


def test_check_packing_refuses_a_model_that_mixes_sequences():
    class RunningMean(torch.nn.Module):  # causal, but blind to position_ids resets
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, **kwargs):
            x = self.embed(input_ids).cumsum(1)
            return type("Output", (), {"logits": x})

    model = RunningMean()
    model.config = type("Config", (), {"_attn_implementation": "custom"})
    with pytest.raises(ValueError, match="does not separate packed sequences"):
        check_packing(model)


# ------------------------------------------------------------------------------------------------
# Bad input: a one-line error that names the problem, before any training


def data_file(tmp_path, name: str, content) -> str:
    """tmp_path / name, holding `content` (text, or rows as JSON lines) unless it is None."""
    path = tmp_path / name
    if content is not None:
        if not isinstance(content, str):
            content = "".join(json.dumps(row) + "\n" for row in content)
        path.write_text(content)
    return str(path)


EMPTY_MESSAGE = [{**CONVERSATIONS[0], "rejected": [{"role": "assistant", "content": ""}]}]
BAD_DATA = [
    pytest.param("nope.jsonl", None, FileNotFoundError, "data file not found", id="missing"),
    pytest.param("pairs.txt", ROWS, ValueError, "unknown data format", id="unknown-format"),
    pytest.param("x.jsonl", "{oops\n", ValueError, "x.jsonl, line 1: not valid JSON", id="malformed"),
    pytest.param(
        "x.jsonl",
        [{"prompt": "a", "chosen": " b"}],
        ValueError,
        "rows missing rejected",
        id="column",
    ),
    pytest.param(
        "x.jsonl",
        ROWS + [{"prompt": "a", "rejected": " b"}],
        ValueError,
        "pair 4 has no chosen",
        id="row",
    ),
    pytest.param(
        "x.jsonl",
        ROWS + [{"prompt": "a", "chosen": " ", "rejected": " b"}],
        ValueError,
        "pair 4 has an empty chosen completion",
        id="empty-completion",
    ),
    pytest.param(
        "x.jsonl",
        EMPTY_MESSAGE,
        ValueError,
        "pair 1 has an empty rejected completion",
        id="empty-message",
    ),
]


@pytest.mark.parametrize("name, content, error, match", BAD_DATA)
def test_bad_data_fails_before_training(tmp_path, cache_dir, name, content, error, match):
    knobs = tiny_knobs(tmp_path, cache_dir, eval_file=data_file(tmp_path, name, content))
    with pytest.raises(error, match=match) as info:
        prepare(knobs)
    assert "\n" not in str(info.value)


BAD_OPTIONS = [
    pytest.param({"max_length": 4}, ValueError, "smaller than every prompt", id="max-length"),
    pytest.param({"truncation_mode": "middle"}, ValueError, "truncation_mode", id="truncation"),
    pytest.param({"loss_type": ["nope"]}, ValueError, "unknown loss_type 'nope'", id="loss-type"),
    pytest.param({"loss_type": ["exo_pair"]}, ValueError, "exo_pair", id="exo-pair-smoothing"),
    pytest.param({"loss_weights": [1.0, 2.0]}, ValueError, "loss_weights", id="loss-weights"),
    pytest.param(
        {"loss_type": ["bco_pair"], "f_divergence_type": "forward_kl"},
        ValueError,
        "f_divergence_type",
        id="f-divergence",
    ),
    pytest.param({"ld_alpha": 1.5}, ValueError, "ld_alpha", id="ld-alpha"),
    pytest.param(
        {"precompute_ref_log_probs": True, "ref_model_sync_steps": 4},
        ValueError,
        "exclude each other",
        id="precompute-and-sync",
    ),
    pytest.param({"backend": "gpu"}, ValueError, "unknown --backend 'gpu'", id="backend"),
    pytest.param(
        {"per_device_train_batch_size": 0}, ValueError, "--per-device-train-batch-size must be >= 1", id="batch-size"
    ),
    pytest.param({"head": "lm"}, ValueError, "unknown --head 'lm'", id="head"),
    pytest.param({"trainer": "hf"}, ValueError, "unknown --trainer 'hf'", id="trainer"),
    pytest.param({"model": "/no/such/model"}, FileNotFoundError, "local checkpoint", id="model"),
]


@pytest.mark.parametrize("overrides, error, match", BAD_OPTIONS)
def test_bad_options_fail_before_training(tmp_path, cache_dir, overrides, error, match):
    knobs = tiny_knobs(tmp_path, cache_dir, **overrides)
    with pytest.raises(error, match=match) as info:
        prepare(knobs)
    assert "\n" not in str(info.value)


def test_main_reports_bad_input_in_one_line(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--cache-dir", str(cache_dir), "--train-file", str(tmp_path / "nope.jsonl")])
    assert str(info.value) == f"error: data file not found: {tmp_path / 'nope.jsonl'}"
