"""Checkpoints of the training script: everything a resumed run needs to go on exactly as the uninterrupted run
would have (bit for bit on the CPU).

A checkpoint is a folder `checkpoint-<step>` in the output folder, loadable as a model (`save_pretrained`'s files
and the tokenizer) and holding `trainer_state.pt`: the phase (sft / dpo) and its step, the optimizer and
scheduler, the reference (the frozen copy's weights, or the precomputed tables), the held-out metrics before DPO,
the data order, the metrics written so far, and per rank the RNG states (torch, CUDA, Python, NumPy) and the
metrics not yet logged. `trainer_state.json` says the same in words. It is written to a temporary folder and
renamed, so a folder named `checkpoint-*` is always whole; only the last `save_total_limit` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.pt"


def checkpoints(output_dir: str | Path, marker: str = STATE) -> list[Path]:
    """The whole checkpoints in `output_dir` (folders checkpoint-<step> holding `marker`), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / marker).exists()]


def resolve(spec: str, output_dir: str | Path) -> Path:
    """The checkpoint folder `--resume-from-checkpoint spec` names: a folder, or `latest` in `output_dir`."""
    if spec == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume-from-checkpoint latest: no checkpoint in {output_dir}")
        return found[-1]
    path = Path(spec).expanduser()
    if not (path / STATE).exists():
        raise FileNotFoundError(f"--resume-from-checkpoint {spec}: not a checkpoint folder (no {STATE})")
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def save(
    output_dir: str | Path, step: int, policy, tokenizer, state: dict, keep: int, weights: dict | None = None
) -> Path:
    """Writes checkpoint-<step> (to a temporary folder, then renamed) and removes all but the last `keep` (0: keep
    all); `weights`: the policy's whole state dict when its parameters are sharded (`model.full_state_dict`).
    Returns its path."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE)
    summary = {k: state[k] for k in ("phase", "phase_step", "step", "skipped_steps")}
    (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n")
    if final.exists():  # the same step saved again (a resumed run interrupted at once): replace it
        old = output_dir / f".old-checkpoint-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for path in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path)
    return final


def load(path: Path, policy) -> dict:
    """Loads the policy's weights from checkpoint `path` into `policy` and returns its trainer state (the RNG
    states not yet applied: `set_rng_state(state["ranks"][rank]["rng"])` once the set-up is done)."""
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors", device=str(next(policy.parameters()).device))
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    loaded = {t.data_ptr() for name, t in policy.state_dict().items() if name in weights}
    untied = [name for name in missing if policy.state_dict()[name].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"{path}: weights do not fit the model (missing {untied}, unexpected {unexpected})")
    return torch.load(path / STATE, weights_only=False)
