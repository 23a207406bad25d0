"""`--tp N` of the training script under `torchrun --nproc-per-node 2` on the CPU (gloo): the output layer (and the
tied embedding) sharded over the vocabulary with torch's tensor-parallel API, the losses from dpo_kernels.parallel.
Every rank sees the batch one process would: the loss curve equals the single-process run's, and the saved model is
a normal save_pretrained folder. Bad combinations of the flags fail before training, with the flag named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_kernels.train.knobs import Knobs, parse_knobs
from dpo_kernels.train.loop import prepare, train
from dpo_kernels.train.model import load_tokenizer

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # the single-process runs, as the script's --cpu-threads 1
# The native kernels (the vocabulary-parallel functions refuse the reference backend; interpreted Triton is slow).
BACKEND = "cpu"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    load_tokenizer("tiny", path)  # the BPE, trained once, before any subprocess needs it
    return path


def flags(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    """A run of seconds: 48 pairs of at most 64 tokens, every step logged."""
    args = ["--cache-dir", str(cache_dir), "--output-dir", str(out), "--max-train-pairs", "48"]
    args += ["--max-eval-pairs", "16", "--max-length", "64", "--per-device-eval-batch-size", "8"]
    args += ["--learning-rate", "1e-3", "--logging-steps", "1", "--backend", BACKEND]
    return args + list(extra)


def torchrun(args: list[str], nproc: int = 2) -> None:
    """`torchrun --standalone --nproc-per-node nproc -m dpo_kernels.train args`, gloo on the CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    proc = subprocess.run([*launcher, "-m", "dpo_kernels.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


def single_process(args: list[str]) -> None:
    """The same script in this process (one rank, no torchrun), as `python -m dpo_kernels.train args` runs it."""
    assert train(prepare(parse_knobs(args)))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(out: Path, single: Path, skip: frozenset = frozenset()) -> None:
    """Every logged loss and metric (but `skip`) within fp32 tolerance of the single-process run's; the gradient
    norms (summed over shards in another order) within 1e-4."""
    got, want = records(out), records(single)
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), a.keys() ^ b.keys()
        for key, value in b.items():
            if key in ("phase", "step") or key.removeprefix("eval_") in skip:
                continue
            rtol = 1e-4 if key == "grad_norm" else 1e-5
            assert a[key] == pytest.approx(value, rel=rtol, abs=1e-5), (a["phase"], a["step"], key, a[key], value)


def saved_model(out: Path):
    """The model in a save_pretrained folder, loaded as its class; its tied weights tied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return model


def assert_same_model(out: Path, single: Path) -> None:
    for (name, p), (_, q) in zip(saved_model(out).named_parameters(), saved_model(single).named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)  # a few AdamW steps on 1e-7 differences


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_tp2_loss_curve_equals_single_process(tmp_path, cache_dir, head):
    """SFT then DPO, the same batch on both ranks; `--head fused` shards the weight (dpo_loss_from_hidden), `--head
    logits` the logits (a DTensor from ColwiseParallel into dpo_loss_from_logits); a checkpoint on the way."""
    steps = ["--sft-steps", "2", "--max-steps", "4", "--per-device-train-batch-size", "4", "--head", head]
    single_process(flags(tmp_path / "single", cache_dir, *steps))
    torchrun(flags(tmp_path / "tp", cache_dir, *steps, "--tp", "2", "--save-steps", "4"))
    assert_same_curve(tmp_path / "tp", tmp_path / "single")
    assert_same_model(tmp_path / "tp", tmp_path / "single")
    saved_model(tmp_path / "tp" / "checkpoint-4")  # the checkpoint: a model folder too


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(tp=2), "--tp 2 runs on exactly 2 processes"),
        (dict(tp=0), "--tp must be >= 1"),
        (dict(tp=2, fsdp=True), "--tp and --fsdp exclude each other"),
        (dict(fsdp=True), "--fsdp needs torchrun with 2 or more processes"),
        (dict(tp=2, trainer="trl"), "--tp and --fsdp work with --trainer ours"),
        (dict(tp=2, resume_from_checkpoint="latest"), "does not work with --tp / --fsdp yet"),
    ],
)
def test_bad_parallel_flags_fail_before_training(tmp_path, cache_dir, overrides, match):
    knobs = Knobs(cache_dir=str(cache_dir), output_dir=str(tmp_path / "out"), max_train_pairs=8, **overrides)
    with pytest.raises(ValueError, match=match):
        prepare(knobs)
