"""The training script's knobs: one dataclass, its command line and its YAML config.

Kept free of heavy imports (no torch, transformers, datasets) so that `--help` and a bad flag answer at once.
Knob names are TRL's `DPOConfig` / HF `TrainingArguments` names where TRL has the knob (`learning_rate`,
`per_device_train_batch_size`, `max_steps`, ...); the script's earlier names stay as aliases (`--lr`,
`--batch-size`, `--dpo-steps`, ...). Flags take dashes or underscores (`--learning-rate`, `--learning_rate`), and
`--config recipe.yaml` sets any knob by any of its names, the command line overriding it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "hh_rlhf"
BUNDLED_TRAIN = BUNDLED_DIR / "hh_harmless_train.jsonl"
BUNDLED_TEST = BUNDLED_DIR / "hh_harmless_test.jsonl"
DEFAULT_MAX_STEPS = 150


def knob(default, help: str, aliases: tuple[str, ...] = ()):
    """A Knobs field: its default, its --help line and its other names."""
    return field(default_factory=lambda: copy.copy(default), metadata={"help": help, "aliases": aliases})


@dataclass
class Knobs:
    # data
    train_file: str = knob(str(BUNDLED_TRAIN), "preference pairs to train on")
    eval_file: str | None = knob(
        None,
        "held-out pairs (default: the bundled test set with the bundled train set; else give this or --eval-split)",
    )
    eval_split: float = knob(0.0, "hold out this fraction of the train file's pairs instead of --eval-file")
    max_train_pairs: int = knob(0, "use the first N training pairs (0: all)")
    max_eval_pairs: int = knob(0, "use the first N held-out pairs (0: all)")
    max_length: int = knob(160, "tokens per prompt + completion row; pairs whose prompt alone is longer are dropped")
    truncation_mode: str = knob("keep_start", "keep_start or keep_end")
    padding_free: bool = knob(False, "pack the rows of a batch into one row, with cu_seqlens")
    # model
    model: str = knob(
        "tiny",
        "'tiny' (a small Llama built here), a local checkpoint folder, or a Hub id in the local Hugging Face cache",
        ("model_name_or_path",),
    )
    cache_dir: str = knob("~/.cache/dpo_kernels", "where the tiny model's tokenizer is cached")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass")
    bf16: bool | None = knob(None, "bf16 autocast (default: on with CUDA only)")
    backend: str | None = knob(None, "kernels: triton, cpu or reference (default: by device)")
    # fused on the CPU too: its tile path is torch.mm + the native row kernels
    head: str = knob(
        "fused",
        "fused: log-probs from the last hidden states and the output layer, the logits never built "
        "(dk.dpo_loss_from_hidden: vendor GEMM tiles + the log-prob row kernels, on CUDA and the CPU); "
        "logits: the model's logits (dk.dpo_loss_from_logits)",
    )
    trainer: str = knob(
        "ours",
        "ours: this script's loop; trl: the DPO phase in TRL's DPOTrainer with dpo_kernels' loss (the SFT "
        "warm-up and the held-out table stay ours; TRL tokenizes the text itself, so its rows can differ "
        "slightly from ours; needs pip install dpo-kernels[trl])",
    )
    # multi-process (torchrun; NCCL on GPUs, gloo on CPUs): data parallel (DDP) unless one of these shards the model
    tp: int = knob(
        1,
        "tensor parallelism over N processes (torchrun --nproc-per-node N): the output layer (and a tied embedding) "
        "sharded over the vocabulary with torch's ColwiseParallel / RowwiseParallel, the log-probs and the loss from "
        "dpo_kernels.parallel (two all-reduces per call, the logits never gathered); every rank sees the same batch",
    )
    fsdp: bool = knob(False, "FSDP2 under torchrun: fully_shard each decoder layer, then the whole model")
    # torch's default is a thread per core; on a small CPU shared with other work, threads that wait
    # for each other at every op cost far more than they bring to a model this small
    cpu_threads: int = knob(1, "torch threads when training on the CPU (0: torch's default)")
    # optimization: steps are optimizer steps, a micro-batch is `per_device_train_batch_size` pairs per rank
    sft_steps: int = knob(250, "SFT warm-up steps on the chosen completions (0: none)")
    sft_lr: float = knob(3e-3, "peak learning rate of the SFT warm-up")
    max_steps: int | None = knob(
        None,
        f"DPO steps (default: {DEFAULT_MAX_STEPS}, or --num-train-epochs epochs when that is given; "
        "as in HF, max_steps wins when both are)",
        ("dpo_steps",),
    )
    num_train_epochs: float = knob(0.0, "DPO epochs over the train pairs, unless --max-steps is given", ())
    learning_rate: float = knob(1.5e-4, "peak learning rate of DPO", ("lr",))
    per_device_train_batch_size: int = knob(8, "pairs per micro-batch (per rank)", ("batch_size",))
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step", ("grad_accum",))
    warmup_ratio: float = knob(0.1, "linear warm-up over this fraction of the steps, then cosine")
    warmup_steps: float | None = knob(
        None,
        "HF's spelling: warm-up DPO steps, or a fraction of them when < 1 (sets --warmup-ratio; SFT warms up over "
        "the same fraction)",
    )
    weight_decay: float = knob(0.0, "AdamW weight decay")
    max_grad_norm: float = knob(1.0, "gradient clipping (<= 0: none, as in HF/TRL)")
    seed: int = knob(0, "seed of the model init and of the data order")
    skip_nonfinite_steps: bool = knob(
        False, "skip a step whose loss or gradient norm is NaN/inf (counted) instead of stopping the run"
    )
    # loss: TRL's DPOConfig names and defaults
    loss_type: list[str] = knob(["sigmoid"], "one or more loss types, e.g. sigmoid bco_pair sft")
    loss_weights: list[float] | None = knob(None, "one weight per loss type (default: 1 each)")
    beta: float = knob(0.1, "DPO beta")
    label_smoothing: float = knob(0.0, "epsilon of exo_pair, robust, aot")
    discopop_tau: float = knob(0.05, "tau of discopop")
    f_divergence_type: str = knob("reverse_kl", "or forward_kl, js_divergence, alpha_divergence")
    f_alpha_divergence_coef: float = knob(0.5, "alpha of alpha_divergence")
    ld_alpha: float | None = knob(None, "LD-DPO: weight of the tokens past the shorter completion")
    use_weighting: bool = knob(False, "WPO weights")
    # reference model: a frozen copy of the policy after SFT, unless precomputed
    precompute_ref_log_probs: bool = knob(
        False, "one reference pass over the data, then free the copy", ("precompute_ref_logps",)
    )
    sync_ref_model: bool = knob(False, "TR-DPO as TRL switches it on (every 512 steps unless --ref-model-sync-steps)")
    ref_model_sync_steps: int = knob(
        0, "TR-DPO: move the reference to the policy every N steps (0: off)", ("ref_sync_steps",)
    )
    ref_model_mixup_alpha: float = knob(0.6, "TR-DPO: ref <- alpha * policy + (1 - alpha) * ref", ("ref_mixup_alpha",))
    # output, evaluation, checkpoints
    output_dir: str = knob("runs/dpo", "metrics.jsonl, knobs.json, checkpoints, the final model and tokenizer")
    logging_steps: int = knob(10, "log the mean metrics every N steps", ("log_every",))
    eval_steps: int = knob(0, "also evaluate on the held-out pairs every N DPO steps (0: before and after only)")
    per_device_eval_batch_size: int = knob(16, "pairs per evaluation batch", ("eval_batch_size",))
    save_steps: int = knob(
        0, "save a checkpoint every N steps (0: only when interrupted); SIGINT/SIGTERM always save one"
    )
    save_total_limit: int = knob(2, "keep the last N checkpoints (0: all)")
    resume_from_checkpoint: str | None = knob(
        None, "resume from a checkpoint folder, or 'latest' (the newest in --output-dir)", ("resume",)
    )
    report_to: list[str] = knob(
        ["none"], "none, tensorboard (pip install tensorboard) or wandb (offline without network)"
    )
    plot: bool = knob(False, "also write curves.png")


METAVARS = {int: "N", float: "X", str: "TEXT"}
TRL_DEFAULT_SYNC_STEPS = 512  # DPOConfig.ref_model_sync_steps
REPORTERS = ("none", "tensorboard", "wandb")


def _names() -> dict[str, str]:
    """Every accepted name (underscored) → the field it sets."""
    names = {}
    for f in fields(Knobs):
        for name in (f.name, *f.metadata["aliases"]):
            names[name] = f.name
    return names


def _to_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_kernels.train",
        usage="%(prog)s [--config recipe.yaml] [--KNOB VALUE ...]",
        description="SFT then DPO with dpo_kernels (TRL's DPOConfig names; dashes or underscores; "
        "the script's earlier names are aliases).",
    )
    parser.add_argument("--config", metavar="YAML", help="knobs from a YAML file (any name below); flags override it")
    hints = typing.get_type_hints(Knobs)
    for f in fields(Knobs):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `X | None`
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default_factory()
        shown = "" if default is None else f" (default: {default})"
        flags = ["--" + n.replace("_", "-") for n in (f.name, *f.metadata["aliases"])]
        opts = {"dest": f.name, "default": default, "help": f.metadata["help"] + shown}
        if kind is bool:  # --flag, --flag false (HF's spelling), --no-flag
            opts.update(nargs="?", const=True, type=_to_bool, metavar="BOOL")
            parser.add_argument(*flags, **opts)
            parser.add_argument(
                "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=argparse.SUPPRESS
            )
            continue
        if f.name == "resume_from_checkpoint":
            opts.update(nargs="?", const="latest", metavar="DIR|latest")
        elif typing.get_origin(kind) is list:
            element = typing.get_args(kind)[0]
            opts.update(nargs="+", type=element, metavar=METAVARS[element])
        else:
            opts.update(type=kind, metavar=METAVARS[kind])
        parser.add_argument(*flags, **opts)
    return parser


def _dashed(argv: list[str]) -> list[str]:
    """--learning_rate=1e-4 → --learning-rate=1e-4: HF's underscored spellings."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def config_argv(path: str) -> list[str]:
    """The flags a YAML config stands for (prepended to the command line, which then wins)."""
    import yaml

    try:
        with open(Path(path).expanduser()) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a mapping of knob: value, got {type(config).__name__}")
    names, argv = _names(), []
    for key, value in config.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValueError(f"--config {path}: unknown knob {key!r} (python -m dpo_kernels.train --help lists them)")
        if value is None:
            continue
        if name in ("resume_from_checkpoint", "resume") and value is True:
            value = "latest"
        values = value if isinstance(value, list) else [value]
        argv += ["--" + name.replace("_", "-"), *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


def parse_knobs(argv: list[str] | None = None) -> Knobs:
    """Knobs from the command line (and the YAML file of --config); exits with argparse's message on a bad flag."""
    parser = build_parser()
    argv = _dashed(sys.argv[1:] if argv is None else list(argv))
    first, _ = parser.parse_known_args(argv)
    if first.config:
        try:
            argv = config_argv(first.config) + argv
        except ValueError as err:
            parser.error(str(err))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    return Knobs(**values)


def check_knobs(knobs: Knobs) -> None:
    """The checks that need no data or model (ValueError naming the flag)."""
    for name in (
        "max_length",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "per_device_eval_batch_size",
    ):
        if getattr(knobs, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(knobs, name)}")
    for name in ("eval_steps", "save_steps", "save_total_limit", "sft_steps", "ref_model_sync_steps"):
        if getattr(knobs, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(knobs, name)}")
    if knobs.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {knobs.tp}")
    if knobs.tp > 1 and knobs.fsdp:
        raise ValueError("--tp and --fsdp exclude each other: shard the output layer (--tp) or every layer (--fsdp)")
    if (knobs.tp > 1 or knobs.fsdp) and knobs.trainer != "ours":
        raise ValueError("--tp and --fsdp work with --trainer ours (TRL's trainer shards the model its own way)")
    if knobs.max_steps is not None and knobs.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {knobs.max_steps}")
    if knobs.num_train_epochs < 0:
        raise ValueError(f"--num-train-epochs must be >= 0, got {knobs.num_train_epochs}")
    if knobs.warmup_steps is not None and knobs.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {knobs.warmup_steps}")
    if not 0 <= knobs.eval_split < 1:
        raise ValueError(f"--eval-split must be in [0, 1), got {knobs.eval_split}")
    if knobs.eval_split and knobs.eval_file:
        raise ValueError(
            "--eval-split and --eval-file exclude each other: hold out part of the train file, or name one"
        )
    unknown = [r for r in knobs.report_to if r not in REPORTERS]
    if unknown:
        raise ValueError(f"unknown --report-to {unknown[0]!r}; valid: {', '.join(REPORTERS)}")
    if "none" in knobs.report_to and len(knobs.report_to) > 1:
        raise ValueError("--report-to none excludes other reporters")
    for name, valid in (("head", ("fused", "logits")), ("trainer", ("ours", "trl"))):
        value = getattr(knobs, name)
        if value not in valid:
            raise ValueError(f"unknown --{name} {value!r}; valid: {', '.join(valid)}")
