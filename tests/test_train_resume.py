"""The training script as a trainer to trust: a run interrupted by SIGINT or SIGTERM saves a checkpoint and, resumed,
writes the metrics of the uninterrupted run bit for bit; a non-finite loss stops the run and leaves the last good
checkpoint; --max-grad-norm 0 trains without clipping.

The signal tests run the script in a subprocess (`python -m dpo_kernels.train`) and interrupt it once its
metrics.jsonl shows the phase to interrupt.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_kernels.train import checkpoint
from dpo_kernels.train.__main__ import main
from dpo_kernels.train.model import load_tokenizer
from tests.test_train import BACKEND

ROOT = Path(__file__).parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    load_tokenizer("tiny", path)  # the BPE, trained once, before any subprocess needs it
    return path


def flags(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    """A run of a few seconds: 48 pairs of at most 64 tokens, 6 SFT and 30 DPO steps, every step logged."""
    args = ["--cache-dir", str(cache_dir), "--output-dir", str(out), "--max-train-pairs", "48"]
    args += ["--max-eval-pairs", "16", "--max-length", "64", "--per-device-train-batch-size", "4"]
    args += ["--per-device-eval-batch-size", "8", "--sft-steps", "6", "--max-steps", "30", "--learning-rate", "1e-3"]
    args += ["--logging-steps", "1", "--eval-steps", "10"]
    if BACKEND:
        args += ["--backend", BACKEND]
    return args + list(extra)


def script(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dpo_kernels.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_in(proc: subprocess.Popen, out: Path, phase: str, sig: int, timeout: float = 300) -> None:
    """Sends `sig` once metrics.jsonl holds a record of `phase`."""
    path = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and any(json.loads(line)["phase"] == phase for line in path.read_text().splitlines()):
            proc.send_signal(sig)
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended (exit code {proc.poll()}) before a {phase} record; {proc.stderr.read()}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = script(flags(out, cache_dir))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, phase",
    [
        pytest.param(signal.SIGINT, "dpo", id="sigint-mid-dpo"),
        pytest.param(signal.SIGTERM, "sft", id="sigterm-mid-sft"),
    ],
)
def test_interrupted_run_resumes_to_the_same_metrics(tmp_path, cache_dir, uninterrupted, sig, phase):
    out = tmp_path / "out"
    proc = script(flags(out, cache_dir))
    interrupt_in(proc, out, phase, sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"{signal.Signals(sig).name} at {phase} step "), message
    assert "--resume-from-checkpoint latest" in message
    (saved,) = checkpoint.checkpoints(out)
    assert str(saved) in message
    state = json.loads((saved / "trainer_state.json").read_text())
    steps = {"sft": 6, "dpo": 30}[phase]
    assert state["phase"] == phase and 1 <= state["phase_step"] < steps, state  # interrupted mid-phase
    assert not (out / "model.safetensors").exists()  # no final model from an interrupted run
    assert (out / "knobs.json").exists()  # written at the start
    # what the interrupted run logged up to its checkpoint is what the uninterrupted run logged
    expected = (uninterrupted / "metrics.jsonl").read_text()
    logged = (out / "metrics.jsonl").read_text()
    assert expected.startswith("".join(logged.splitlines(keepends=True)[: len(logged.splitlines())]))

    resumed = script(flags(out, cache_dir, "--resume", "latest"))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed from {saved} at {phase} step {state['phase_step']}" in err  # not from scratch
    assert (out / "metrics.jsonl").read_text() == expected  # bit for bit
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "extra",
    [
        # logged every 3 steps, saved every 4: the checkpoint holds metrics not yet logged
        pytest.param(("--gradient-accumulation-steps", "2", "--logging-steps", "3"), id="accumulation"),
        pytest.param(("--precompute-ref-log-probs",), id="precomputed-reference"),
        pytest.param(("--ref-model-sync-steps", "3", "--ref-model-mixup-alpha", "0.5"), id="tr-dpo"),
    ],
)
def test_resume_from_each_checkpoint(tmp_path, cache_dir, extra):
    run = ("--sft-steps", "4", "--max-steps", "8", "--eval-steps", "5", "--save-steps", "4", "--save-total-limit", "0")
    whole = tmp_path / "whole"
    main(flags(whole, cache_dir, *run, *extra))
    saved = checkpoint.checkpoints(whole)
    assert [p.name for p in saved] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    for path in saved[:-1]:  # the end of SFT, mid DPO
        out = tmp_path / path.name
        out.mkdir()
        main(flags(out, cache_dir, *run, *extra, "--resume-from-checkpoint", str(path)))
        later = [p.name for p in saved if int(p.name.split("-")[1]) > int(path.name.split("-")[1])]
        assert [p.name for p in checkpoint.checkpoints(out)] == later  # it went on from there, not from scratch
        assert (out / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text(), path.name
        assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    argv = flags(out, cache_dir, "--sft-lr", "1e30", "--max-grad-norm", "1e30", "--save-steps", "1")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"error: non-finite (loss|gradient norm) at sft step \d+ ", message), message
    assert "stopped before applying it, the final model not saved" in message
    last = checkpoint.checkpoints(out)[-1]
    assert f"the last good checkpoint is {last}" in message
    bad_step = int(message.split("sft step ")[1].split()[0])
    assert last.name == f"checkpoint-{bad_step - 1}"
    weights = load_file(last / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model.safetensors").exists()  # no NaN weights saved as the result
    # metrics.jsonl is valid JSON (no bare NaN): the failing step is logged with null
    records = [json.loads(line, parse_constant=pytest.fail) for line in (out / "metrics.jsonl").open()]
    assert records[-1]["step"] == bad_step and None in (records[-1]["loss"], records[-1]["grad_norm"])


def test_skip_nonfinite_steps_counts_them(tmp_path, cache_dir):
    out = tmp_path / "out"
    argv = flags(out, cache_dir, "--sft-lr", "1e30", "--max-grad-norm", "1e30", "--sft-steps", "3", "--max-steps", "1")
    main(argv + ["--skip-nonfinite-steps"])
    records = [json.loads(line, parse_constant=pytest.fail) for line in (out / "metrics.jsonl").open()]
    sft = [r for r in records if r["phase"] == "sft"]
    assert sft[-1]["skipped_steps"] >= 1
    assert [r["skipped_steps"] for r in sft] == sorted(r["skipped_steps"] for r in sft)
    assert any(None in (r["loss"], r["grad_norm"]) for r in sft)


def test_max_grad_norm_zero_means_no_clipping(tmp_path, cache_dir):
    records, weights = {}, {}
    for norm in ("0", "1e9"):  # 1e9: the clipping factor is exactly 1
        out = tmp_path / norm
        main(flags(out, cache_dir, "--sft-steps", "0", "--max-steps", "3", "--max-grad-norm", norm))
        records[norm] = (out / "metrics.jsonl").read_text()
        weights[norm] = load_file(out / "model.safetensors")
    assert records["0"] == records["1e9"]
    grad_norms = [json.loads(line).get("grad_norm") for line in records["0"].splitlines()]
    assert any(g is not None and g > 1.0 for g in grad_norms)  # what a max-grad-norm of 1 would have clipped
    init = load_file(checkpoint_free_init(tmp_path, cache_dir) / "model.safetensors")
    changed = [name for name, w in weights["0"].items() if not torch.equal(w, init[name])]
    assert changed, "--max-grad-norm 0 left every weight as it was"


def checkpoint_free_init(tmp_path: Path, cache_dir: Path) -> Path:
    """The policy the runs above start from (sft-steps 0), saved by a run of one step at learning rate 0."""
    out = tmp_path / "init"
    main(flags(out, cache_dir, "--sft-steps", "0", "--max-steps", "1", "--learning-rate", "0"))
    return out


def test_resume_refuses_other_knobs(tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    main(flags(out, cache_dir, "--sft-steps", "2", "--max-steps", "2", "--save-steps", "2"))
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(SystemExit) as info:
        main(flags(out, cache_dir, "--sft-steps", "2", "--max-steps", "2", "--seed", "1", "--resume"))
    assert str(info.value) == (
        f"error: --resume-from-checkpoint {out / 'checkpoint-4'}: the run was saved with other knobs: --seed 0 -> 1"
    )


def test_resume_without_a_checkpoint_is_named(tmp_path, cache_dir):
    for spec, message in [
        ("latest", f"--resume-from-checkpoint latest: no checkpoint in {tmp_path / 'out'}"),
        (str(tmp_path), f"--resume-from-checkpoint {tmp_path}: not a checkpoint folder (no trainer_state.pt)"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(flags(tmp_path / "out", cache_dir, "--resume-from-checkpoint", spec))
        assert str(info.value) == f"error: {message}"


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, cache_dir):
    out = tmp_path / "out"
    main(flags(out, cache_dir, "--sft-steps", "2", "--max-steps", "2", "--save-steps", "2"))
    with pytest.raises(SystemExit) as info:
        main(flags(out, cache_dir, "--sft-steps", "2", "--max-steps", "2"))
    assert str(info.value) == (
        f"error: --output-dir {out} holds checkpoints of an earlier run: go on with --resume-from-checkpoint latest, "
        "or write to another --output-dir"
    )


def test_save_total_limit_keeps_the_last(tmp_path, cache_dir):
    out = tmp_path / "out"
    main(flags(out, cache_dir, "--sft-steps", "2", "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "2"))
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"])


@pytest.mark.slow
def test_trainer_trl_interrupted_and_resumed(tmp_path, cache_dir):
    pytest.importorskip("trl", reason="--trainer trl needs TRL")
    extra = ("--trainer", "trl", "--sft-steps", "2", "--max-steps", "8", "--eval-steps", "0")
    records = {}
    for name in ("uninterrupted", "interrupted"):
        out = tmp_path / name
        proc = script(flags(out, cache_dir, *extra))
        if name == "interrupted":
            interrupt_in(proc, out, "dpo", signal.SIGINT)
        _, err = proc.communicate(timeout=600)
        if name == "interrupted":
            assert proc.returncode == 130, err
            message = err.strip().splitlines()[-1]
            assert re.match(r"SIGINT at TRL step \d+: TRL saved .*/trl/checkpoint-\d+; continue with", message), message
            resumed = script(flags(out, cache_dir, *extra, "--resume-from-checkpoint", "latest"))
            _, err = resumed.communicate(timeout=600)
            assert resumed.returncode == 0, err
            assert re.search(r"resuming TRL from .*/trl/checkpoint-\d+", err), err  # not from scratch
        else:
            assert proc.returncode == 0, err
        # TRL's closing summary holds run times: compare the logged steps
        lines = (out / "metrics.jsonl").read_text().splitlines()
        records[name] = [r for r in map(json.loads, lines) if "loss" in r or "eval_loss" in r]
    assert records["interrupted"] == records["uninterrupted"]
