"""Preference pairs → token rows → batches in TRL's layout (chosen rows first, then rejected).

A pair is `prompt` / `chosen` / `rejected`: strings (standard), or message lists (conversational,
rendered with the tokenizer's chat template, else as plain `Role: content` turns). Pairs with only `chosen` and
`rejected` have an implicit prompt: their shared prefix, extracted as TRL's `extract_prompt` does. A row is the
tokenized prompt + completion; its prompt part is the common token prefix of the tokenized prompt
and the whole row, and completions that are not chat-templated end with an EOS. Labels are shifted:
`labels[t]` is the target of the logits at `t` (the token at `t + 1`), -100 unless that token is
part of the completion.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import datasets
import torch

from dpo_kernels.train.knobs import BUNDLED_DIR, BUNDLED_TEST, BUNDLED_TRAIN  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}
COLUMNS = ("prompt", "chosen", "rejected")
IGNORE_INDEX = -100


def load_pairs(path: str | Path) -> datasets.Dataset:
    """Preference pairs from a local file (JSON lines, JSON, Parquet, CSV, Arrow; may be compressed)
    or a directory `datasets` can load. Raises a one-line error that names the problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, no pairs")
    if path.suffix == ".jsonl":
        _check_json_lines(path)
    try:
        if path.is_dir():
            ds = _load_dir(path)
        else:
            suffixes = [s for s in path.suffixes if s not in COMPRESSION]
            fmt = FORMATS.get(suffixes[-1] if suffixes else "")
            if fmt is None:
                known = ", ".join(FORMATS)
                raise ValueError(f"unknown data format {path.name!r}; use {known} or a folder")
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, OSError) as err:
        raise ValueError(f"could not read {path}: {str(err).splitlines()[0]}") from None
    if len(ds) == 0:
        raise ValueError(f"{path}: no pairs")
    implicit = "prompt" not in ds.column_names and {"chosen", "rejected"} <= set(ds.column_names)
    if implicit:  # TRL's implicit-prompt format
        ds = ds.select_columns(["chosen", "rejected"])
        _check_implicit(ds, path)
        ds = ds.map(extract_prompt)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{path}: rows missing {', '.join(missing)} (need {', '.join(COLUMNS)}, or chosen and rejected)"
        )
    ds = ds.select_columns(list(COLUMNS))
    for i, row in enumerate(ds):
        _check_row(row, i, path)
    return ds


def tokenize_pairs(
    ds: datasets.Dataset,
    tokenizer,
    max_length: int,
    truncation_mode: str = "keep_start",
    name: str = "data",
) -> list[dict]:
    """The token rows of each pair of `ds` (from `load_pairs`): {"index", "chosen_ids",
    "chosen_start", "rejected_ids", "rejected_start"}, where `*_start` is the position of the first
    completion token. Rows are cut to `max_length` (keep_start: the first tokens; keep_end: the
    last); pairs whose prompt alone has >= max_length tokens are dropped."""
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be keep_start or keep_end, got {truncation_mode!r}")
    rows = ds.to_list()
    chat = isinstance(rows[0]["chosen"], list) and bool(tokenizer.chat_template)
    texts = [_render(row, tokenizer) for row in rows]  # (prompt, prompt+chosen, prompt+rejected)
    prompts, chosen, rejected = (
        tokenizer([t[k] for t in texts], add_special_tokens=not chat)["input_ids"] for k in range(3)
    )
    eos = [] if chat else [tokenizer.eos_token_id]
    pairs = []
    for prompt, *completions in zip(prompts, chosen, rejected):
        if len(prompt) >= max_length:
            continue
        pair = {"index": len(pairs)}
        for key, ids in zip(("chosen", "rejected"), completions):
            ids = ids + eos
            start = _common_prefix(prompt, ids)
            cut = max(0, len(ids) - max_length)
            if truncation_mode == "keep_start":
                ids = ids[:max_length]
            else:
                ids, start = ids[cut:], max(0, start - cut)
            pair[f"{key}_ids"], pair[f"{key}_start"] = ids, start
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{name}: max_length={max_length} is smaller than every prompt")
    if len(pairs) < len(rows):
        dropped = len(rows) - len(pairs)
        log.warning(
            f"{name}: dropped {dropped} of {len(rows)} pairs whose prompt alone has >= {max_length} tokens "
            "(--max-length raises the limit)"
        )
    return pairs


def extract_prompt(example: dict) -> dict:
    """TRL 1.16's `extract_prompt`: the prompt is the longest shared prefix of chosen and rejected (strings or
    message lists), less a space that starts the completions."""
    for idx in range(min(len(example["chosen"]), len(example["rejected"]))):
        if example["chosen"][idx] != example["rejected"][idx]:
            if example["chosen"][idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return {
        "prompt": example["chosen"][:idx],
        "chosen": example["chosen"][idx:],
        "rejected": example["rejected"][idx:],
    }


def collate(pairs: list[dict], pad_id: int, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """B pairs → 2B rows, chosen first, and the pair indices. Padded: input_ids, attention_mask and
    labels [2B, T], right-padded. Packed (padding_free): input_ids and position_ids [1, N], labels
    [N], cu_seqlens [2B + 1] int32."""
    rows = [torch.tensor(p[f"{k}_ids"]) for k in ("chosen", "rejected") for p in pairs]
    starts = [p[f"{k}_start"] for k in ("chosen", "rejected") for p in pairs]
    labels = [_shifted_labels(ids, start) for ids, start in zip(rows, starts)]
    batch = {"index": torch.tensor([p["index"] for p in pairs])}
    if padding_free:
        lengths = torch.tensor([len(r) for r in rows])
        batch["input_ids"] = torch.cat(rows)[None]
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
        batch["labels"] = torch.cat(labels)
        batch["cu_seqlens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
        return batch
    T = max(len(r) for r in rows)
    batch["input_ids"] = torch.full((len(rows), T), pad_id)
    batch["attention_mask"] = torch.zeros(len(rows), T, dtype=torch.long)
    batch["labels"] = torch.full((len(rows), T), IGNORE_INDEX)
    for r, (ids, lab) in enumerate(zip(rows, labels)):
        batch["input_ids"][r, : len(ids)] = ids
        batch["attention_mask"][r, : len(ids)] = 1
        batch["labels"][r, : len(ids)] = lab
    return batch


def chosen_half(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The chosen rows of a batch (for SFT)."""
    if "cu_seqlens" in batch:
        B = (len(batch["cu_seqlens"]) - 1) // 2
        n = int(batch["cu_seqlens"][B])
        return {
            "input_ids": batch["input_ids"][:, :n],
            "position_ids": batch["position_ids"][:, :n],
            "labels": batch["labels"][:n],
            "cu_seqlens": batch["cu_seqlens"][: B + 1],
        }
    B = len(batch["input_ids"]) // 2
    return {k: batch[k][:B] for k in ("input_ids", "attention_mask", "labels")}


def _check_json_lines(path: Path) -> None:
    """Names the first line of a JSON-lines file that is not a JSON object."""
    rows = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line.rstrip("\r\n"))  # a column past the line's end would read "column 1"
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
    if rows == 0:
        raise ValueError(f"{path}: empty file, no pairs")


def _check_implicit(ds: datasets.Dataset, path: Path) -> None:
    for i, row in enumerate(ds):
        chosen, rejected = row["chosen"], row["rejected"]
        if not (isinstance(chosen, str) and isinstance(rejected, str)) and not (
            _is_messages(chosen) and _is_messages(rejected)
        ):
            raise ValueError(f"{path}: pair {i + 1}: chosen and rejected must be strings or messages")
        if chosen == rejected:
            raise ValueError(f"{path}: pair {i + 1}: chosen and rejected are the same (no completion to prefer)")


def _load_dir(path: Path) -> datasets.Dataset:
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))  # written by save_to_disk
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(str(path), split="train")


def _shifted_labels(ids: torch.Tensor, start: int) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE_INDEX)
    first = max(start, 1)  # no logits predict the first token
    labels[first - 1 : len(ids) - 1] = ids[first:]
    return labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def _check_row(row: dict, i: int, path: Path) -> None:
    standard = all(isinstance(row[c], str) for c in COLUMNS)
    if not standard and not all(_is_messages(row[c]) for c in COLUMNS):
        missing = [c for c in COLUMNS if row[c] is None]
        if missing:
            raise ValueError(f"{path}: pair {i + 1} has no {', '.join(missing)}")
        raise ValueError(f"{path}: pair {i + 1}: prompt, chosen, rejected must be strings or messages")
    for key in ("chosen", "rejected"):
        text = row[key] if standard else "".join(str(m["content"] or "") for m in row[key])
        if not text.strip():
            raise ValueError(f"{path}: pair {i + 1} has an empty {key} completion")


def _render(row: dict, tokenizer) -> tuple[str, str, str]:
    prompt, chosen, rejected = (row[c] for c in COLUMNS)
    if isinstance(prompt, str):
        return prompt, prompt + chosen, prompt + rejected
    if tokenizer.chat_template:
        render = partial(tokenizer.apply_chat_template, tokenize=False)
        head = render(prompt, add_generation_prompt=True)
        full = [render(prompt + c) for c in (chosen, rejected)]
        return head, *full
    # no chat template: "Role: content" turns separated by blank lines, as in HH-RLHF
    head = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in prompt) + "Assistant:"
    full = [head + " " + "\n\n".join(m["content"] for m in c) for c in (chosen, rejected)]
    return head, *full
