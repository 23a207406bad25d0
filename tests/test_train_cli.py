"""The training script's conventions: TRL's knob names and the old aliases, --config YAML, the held-out choice, the
data errors with file and line, implicit prompts, periodic evaluation, epochs, trackers, a Hub id from the local
cache, and a --help that imports nothing heavy."""

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpo_kernels.train.data import BUNDLED_TRAIN, extract_prompt, load_pairs, tokenize_pairs
from dpo_kernels.train.knobs import Knobs, parse_knobs
from dpo_kernels.train.loop import prepare, train
from dpo_kernels.train.model import load_model
from tests.test_train import ROWS, read_records, tiny_knobs, write_jsonl

ROOT = Path(__file__).parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ------------------------------------------------------------------------------------------------
# Names, config, help

# TRL 1.16 / HF spelling → our field; the old spelling of the script → the same field
TRL_SPELLINGS = {
    "learning_rate": ("lr", 2e-4),
    "per_device_train_batch_size": ("batch_size", 3),
    "per_device_eval_batch_size": ("eval_batch_size", 5),
    "gradient_accumulation_steps": ("grad_accum", 2),
    "max_steps": ("dpo_steps", 7),
    "precompute_ref_log_probs": ("precompute_ref_logps", True),
    "ref_model_sync_steps": ("ref_sync_steps", 9),
    "ref_model_mixup_alpha": ("ref_mixup_alpha", 0.25),
    "logging_steps": ("log_every", 4),
    "resume_from_checkpoint": ("resume", "some/dir"),
}


def argv_for(name: str, value) -> list[str]:
    return [f"--{name}", *([] if value is True else [str(value)])]


@pytest.mark.parametrize("trl_name", TRL_SPELLINGS)
def test_trl_spellings_and_old_aliases(trl_name):
    old, value = TRL_SPELLINGS[trl_name]
    for argv in (
        argv_for(trl_name, value),  # HF's underscores
        argv_for(trl_name.replace("_", "-"), value),
        argv_for(old.replace("_", "-"), value),  # the script's earlier name
    ):
        assert getattr(parse_knobs(argv), trl_name) == value, argv


def test_trl_spellings_are_trls():
    trl = pytest.importorskip("trl", reason="TRL is the oracle of its own field names")
    trl_fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    ours = {f.name for f in dataclasses.fields(Knobs)}
    assert set(TRL_SPELLINGS) <= trl_fields
    # every knob both have carries TRL's name (the checked list holds those TRL spells differently from us)
    for name in ("beta", "loss_type", "loss_weights", "max_length", "truncation_mode", "padding_free", "seed"):
        assert name in trl_fields and name in ours, name
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "num_train_epochs", "eval_steps", "save_steps"):
        assert name in trl_fields and name in ours, name
    assert {"save_total_limit", "report_to", "sync_ref_model", "use_weighting", "ld_alpha"} <= trl_fields & ours


def test_warmup_steps_as_hf_reads_them(tmp_path, cache_dir):
    # transformers 5: warmup_steps < 1 is a fraction of the steps, else a number of steps
    assert prepare(tiny_knobs(tmp_path, cache_dir, warmup_steps=0.25)).knobs.warmup_ratio == 0.25
    assert prepare(tiny_knobs(tmp_path, cache_dir, max_steps=12, warmup_steps=3)).knobs.warmup_ratio == 0.25


def test_bool_flags_take_hf_values():
    assert parse_knobs(["--padding_free"]).padding_free is True
    assert parse_knobs(["--padding-free", "false"]).padding_free is False
    assert parse_knobs(["--bf16", "True"]).bf16 is True
    assert parse_knobs(["--no-bf16"]).bf16 is False
    assert parse_knobs(["--resume"]).resume_from_checkpoint == "latest"


def test_yaml_config_and_command_line_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "learning_rate: 5.0e-7\n"
        "per_device_train_batch_size: 2\n"
        "gradient_accumulation_steps: 4\n"
        "loss_type: [sigmoid, sft]\n"
        "loss_weights: [1.0, 0.5]\n"
        "gradient_checkpointing: true\n"
        "model_name_or_path: some/model\n"
        "lr: 1.0e-6\n"  # an old alias, later in the file: wins over learning_rate above
        "resume_from_checkpoint: true\n"
    )
    knobs = parse_knobs(["--config", str(recipe), "--per_device_train_batch_size", "6"])
    assert knobs.learning_rate == 1e-6
    assert knobs.per_device_train_batch_size == 6  # the command line wins
    assert knobs.gradient_accumulation_steps == 4
    assert knobs.loss_type == ["sigmoid", "sft"] and knobs.loss_weights == [1.0, 0.5]
    assert knobs.gradient_checkpointing is True
    assert knobs.model == "some/model"
    assert knobs.resume_from_checkpoint == "latest"


@pytest.mark.parametrize(
    "content, match",
    [
        pytest.param("learning_rate: 1e-4\nwarmup_stepz: 3\n", "unknown knob 'warmup_stepz'", id="unknown-key"),
        pytest.param("learning_rate: [1\n", "not valid YAML", id="bad-yaml"),
        pytest.param("- a\n- b\n", "expected a mapping of knob: value, got list", id="not-a-mapping"),
        pytest.param("max_steps: many\n", "--max-steps/--dpo-steps: invalid int value: 'many'", id="bad-value"),
    ],
)
def test_bad_config_is_named(tmp_path, capsys, content, match):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    with pytest.raises(SystemExit) as info:
        parse_knobs(["--config", str(recipe)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_missing_config_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_knobs(["--config", str(tmp_path / "nope.yaml")])
    assert f"--config {tmp_path / 'nope.yaml'}: file not found" in capsys.readouterr().err


def test_help_imports_nothing_heavy():
    # python -X importtime lists every module imported while --help runs
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dpo_kernels.train", "--help"],
        cwd=ROOT,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--learning-rate" in proc.stdout and "--resume-from-checkpoint" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    for heavy in ("torch", "transformers", "datasets", "trl", "dpo_kernels.train.loop", "yaml"):
        assert heavy not in imported, heavy


# ------------------------------------------------------------------------------------------------
# Held-out choice and data errors


def test_own_train_file_needs_a_held_out_choice(tmp_path, cache_dir):
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS * 4)
    with pytest.raises(ValueError, match=r"--eval-file FILE, or hold out part of the train file with --eval-split"):
        prepare(tiny_knobs(tmp_path, cache_dir, train_file=str(train_file)))
    run = prepare(tiny_knobs(tmp_path, cache_dir, train_file=str(train_file), eval_split=0.25))
    assert (len(run.train_ds), len(run.eval_ds)) == (9, 3)
    train_texts = {json.dumps(r) for r in run.train_ds.to_list()}
    assert len(run.train_pairs) == 9 and len(run.eval_pairs) == 3
    assert all(json.dumps(r) in {json.dumps(x) for x in ROWS} for r in run.eval_ds.to_list())
    assert train_texts  # the rows are the train file's
    with pytest.raises(ValueError, match="--eval-split and --eval-file exclude each other"):
        prepare(tiny_knobs(tmp_path, cache_dir, train_file=str(train_file), eval_split=0.25, eval_file="x"))


def test_bundled_train_file_defaults_to_the_bundled_test_set(tmp_path, cache_dir):
    run = prepare(tiny_knobs(tmp_path, cache_dir, train_file=str(BUNDLED_TRAIN)))
    assert run.eval_ds[0] == load_pairs(BUNDLED_TRAIN.parent / "hh_harmless_test.jsonl")[0]


DATA_ERRORS = [
    pytest.param("", "empty file, no pairs", id="empty"),
    pytest.param("\n\n", "empty file, no pairs", id="blank-lines"),
    pytest.param(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "a", "chosen": }\n', "line 3: not valid JSON", id="line"),
    pytest.param(json.dumps(ROWS[0]) + "\n[1, 2]\n", "line 2: expected a JSON object, got list", id="not-object"),
    pytest.param(
        '{"prompt": "hi", "chosen": "a", \n',
        "line 1: not valid JSON (Expecting property name enclosed in double quotes at column 33)",
        id="truncated-column",
    ),
    pytest.param('{"chosen": "same", "rejected": "same"}\n', "pair 1: chosen and rejected are the same", id="same"),
]


@pytest.mark.parametrize("content, match", DATA_ERRORS)
def test_data_errors_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        load_pairs(path)
    assert str(info.value).startswith(str(path)) and match in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


IMPLICIT = [
    {"chosen": "Human: Hi?\n\nAssistant: Hello there.", "rejected": "Human: Hi?\n\nAssistant: Go away."},
    {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"},
    {
        "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}],
    },
]


def test_implicit_prompt_as_trl_extracts_it(tmp_path, tokenizer_):
    # hand-computed: the shared prefix, less the space that starts both completions
    assert extract_prompt(IMPLICIT[0]) == {
        "prompt": "Human: Hi?\n\nAssistant:",
        "chosen": " Hello there.",
        "rejected": " Go away.",
    }
    assert extract_prompt(IMPLICIT[2])["prompt"] == [{"role": "user", "content": "Sky?"}]
    trl = pytest.importorskip("trl", reason="TRL's own extract_prompt as a second oracle")
    for row in IMPLICIT:
        assert extract_prompt(row) == trl.extract_prompt(row)
    ds = load_pairs(write_jsonl(tmp_path / "implicit.jsonl", IMPLICIT[:2]))
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[1] == {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}
    (pair, _) = tokenize_pairs(ds, tokenizer_, 64)
    assert pair["chosen_start"] == len(tokenizer_("Human: Hi?\n\nAssistant:")["input_ids"])


@pytest.fixture(scope="module")
def tokenizer_(cache_dir):
    from dpo_kernels.train.model import load_tokenizer

    return load_tokenizer("tiny", cache_dir)


def test_dropped_pairs_warn_with_the_knob(tmp_path, tokenizer_, caplog):
    rows = ROWS + [{"prompt": "Human: " + "word " * 100 + "\n\nAssistant:", "chosen": " a", "rejected": " b"}]
    ds = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    with caplog.at_level(logging.WARNING):
        tokenize_pairs(ds, tokenizer_, 64, name="mine")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "mine: dropped 1 of 4 pairs" in record.message and "--max-length" in record.message


# ------------------------------------------------------------------------------------------------
# Evaluation, epochs, trackers, Hub ids


def test_eval_steps_and_epochs(tmp_path, cache_dir):
    knobs = tiny_knobs(tmp_path, cache_dir, max_steps=None, num_train_epochs=2, eval_steps=2, logging_steps=1)
    run = prepare(knobs)
    per_epoch = len(run.train_pairs) // knobs.per_device_train_batch_size
    assert knobs.max_steps == 2 * per_epoch
    train(run)
    evals = [r["step"] for r in read_records(knobs) if r["phase"] == "eval"]
    sft = knobs.sft_steps
    assert evals == [sft, *range(sft + 2, sft + knobs.max_steps, 2), sft + knobs.max_steps]


def test_tensorboard_event_file(tmp_path, cache_dir):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    knobs = tiny_knobs(tmp_path, cache_dir, max_steps=4, report_to=["tensorboard"])
    train(prepare(knobs))
    (event_dir,) = {p.parent for p in (tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir))
    events.Reload()
    assert {"sft/loss", "dpo/loss", "dpo/rewards/accuracies", "eval_loss"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("dpo/loss")]
    written = [(r["step"], r["loss"]) for r in read_records(knobs) if r["phase"] == "dpo"]
    assert [s for s, _ in logged] == [s for s, _ in written]
    assert [v for _, v in logged] == pytest.approx([v for _, v in written], rel=1e-6)


def test_wandb_offline_without_network(tmp_path, cache_dir, monkeypatch, caplog):
    pytest.importorskip("wandb", reason="wandb is not installed")
    from dpo_kernels.train import loop

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loop, "_wandb_reachable", lambda: False)  # what a machine without a network sees
    knobs = tiny_knobs(tmp_path, cache_dir, max_steps=4, report_to=["wandb"])
    with caplog.at_level(logging.WARNING):
        train(prepare(knobs))
    assert "--report-to wandb: no network to wandb.ai, logging offline" in caplog.text
    (run_file,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
    keys = (b"sft/loss", b"dpo/loss", b"dpo/rewards/accuracies", b"eval_loss")
    # wandb's writer process may still be flushing the file when finish() returns on a loaded machine
    deadline = time.monotonic() + 60
    while not all(key in run_file.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    logged = run_file.read_bytes()
    for key in keys:
        assert key in logged, key


def test_report_to_needs_its_package(tmp_path, cache_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match="--report-to wandb needs the wandb package: pip install wandb"):
        prepare(tiny_knobs(tmp_path, cache_dir, report_to=["wandb"]))
    with pytest.raises(ValueError, match="unknown --report-to 'mlflow'"):
        prepare(tiny_knobs(tmp_path, cache_dir, report_to=["mlflow"]))


def test_hub_id_from_the_local_cache(tmp_path, cache_dir, tokenizer_):
    # a snapshot laid out as huggingface_hub caches it: models--<org>--<name>/snapshots/<commit> and refs/main
    repo = tmp_path / "hub" / "models--someone--tiny-dpo"
    snapshot = repo / "snapshots" / ("0" * 40)
    model = load_model("tiny", tokenizer_, max_length=64)
    model.save_pretrained(snapshot)
    tokenizer_.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = (
        "import sys; from dpo_kernels.train.model import load_tokenizer, load_model\n"
        "tok = load_tokenizer('someone/tiny-dpo', None); m = load_model('someone/tiny-dpo', tok, 64)\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
        "load_tokenizer('someone/not-cached', None)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **OFFLINE, "HF_HUB_CACHE": str(tmp_path / "hub")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.split() == ["LlamaForCausalLM", str(sum(p.numel() for p in model.parameters()))], proc.stderr
    assert (
        "FileNotFoundError: --model 'someone/not-cached': not 'tiny', not a local checkpoint folder, and not a Hub id"
        in proc.stderr
    )


def test_trainer_trl_passes_checkpoints_through(tmp_path, cache_dir):
    pytest.importorskip("trl", reason="--trainer trl needs TRL")
    knobs = tiny_knobs(tmp_path, cache_dir, trainer="trl", max_steps=4, logging_steps=2, save_steps=2)
    result = train(prepare(knobs))
    assert math.isfinite(result["after"]["loss"])
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "trl").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # ours at the start of DPO: the reference, which TRL's checkpoints do not hold
    assert (out / f"checkpoint-{knobs.sft_steps}" / "trainer_state.pt").exists()


@pytest.mark.parametrize("steps, ratio", [(10, 0.2), (7, 0.1), (5, 0.0), (3, 1.0)])
def test_schedule_is_transformers_cosine_with_warmup(steps, ratio):
    """The script's schedule is the one TRL's DPOTrainer runs for the same knobs (transformers' cosine with warm-up:
    0 at step 0), so that --trainer ours and --trainer trl train alike."""
    from transformers import get_cosine_schedule_with_warmup

    from dpo_kernels.train.loop import warmup_cosine

    warmup = math.ceil(ratio * steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    ours = warmup_cosine(steps, ratio)
    for step in range(steps):
        assert ours(step) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12), step
