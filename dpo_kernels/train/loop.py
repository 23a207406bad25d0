"""The training loop of `python -m dpo_kernels.train`: an optional SFT warm-up on the chosen completions, then DPO
against a reference model, on the bundled HH-RLHF harmless pairs by default.

    python -m dpo_kernels.train                # the tiny Llama on the CPU, a few minutes
    python -m dpo_kernels.train --model PATH --loss-type sigmoid sft --loss-weights 1 0.2
    python -m dpo_kernels.train --save-steps 50 ... ; python -m dpo_kernels.train --resume latest ...
    torchrun --nproc-per-node 8 -m dpo_kernels.train --model PATH --padding-free
    torchrun --nproc-per-node 2 -m dpo_kernels.train --tp 2     # the output layer sharded over the vocabulary
    torchrun --nproc-per-node 2 -m dpo_kernels.train --fsdp     # FSDP2
    python -m dpo_kernels.train --trainer trl   # the DPO phase in TRL's DPOTrainer (trl_phase.py), with our loss

The knobs are in knobs.py, checkpoints in checkpoint.py. A run is exactly resumable: SIGINT or SIGTERM finishes the
step, saves a checkpoint and exits non-zero; a NaN/inf loss or gradient norm stops it before the step is applied.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import signal
import typing
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import dpo_kernels as dk
from dpo_kernels.api import BACKENDS
from dpo_kernels.checks import check_ld_alpha
from dpo_kernels.losses import loss_config, loss_options
from dpo_kernels.train import checkpoint
from dpo_kernels.train.data import (
    BUNDLED_TEST,
    BUNDLED_TRAIN,
    IGNORE_INDEX,
    chosen_half,
    collate,
    load_pairs,
    tokenize_pairs,
)
from dpo_kernels.train.knobs import DEFAULT_MAX_STEPS, TRL_DEFAULT_SYNC_STEPS, Knobs, check_knobs
from dpo_kernels.train.model import (
    Backbone,
    check_packing,
    full_state_dict,
    fully_shard_model,
    load_model,
    load_tokenizer,
    tensor_parallel,
)

log = logging.getLogger("dpo_kernels.train")

# what a resumed run must share with the run that saved the checkpoint
SAME_ON_RESUME = (
    "model",
    "train_file",
    "eval_file",
    "eval_split",
    "max_train_pairs",
    "max_eval_pairs",
    "max_length",
    "truncation_mode",
    "padding_free",
    "head",
    "trainer",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "sft_steps",
    "precompute_ref_log_probs",
    "tp",
    "fsdp",
)


class StopTraining(Exception):
    """Ends the run with a one-line message and a non-zero exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -------------------------------------------------------------------------------------------------
# Set-up: whatever is wrong with the input fails here, before any training


@dataclass
class Run:
    """Everything `train` needs, checked and built by `prepare`."""

    knobs: Knobs
    tokenizer: typing.Any
    policy: torch.nn.Module
    model: torch.nn.Module  # what the losses call: the policy, or its Backbone (--head fused)
    train_ds: datasets.Dataset  # the text pairs (for --trainer trl)
    eval_ds: datasets.Dataset
    train_pairs: list[dict]
    eval_pairs: list[dict]
    device: torch.device
    rank: int = 0
    world: int = 1
    resume: Path | None = None  # the checkpoint to resume from
    mesh: typing.Any = None  # --tp / --fsdp: the 1-D device mesh of all the ranks
    attn: str | None = None  # the attention implementation the policy was loaded with

    @property
    def sharded(self) -> bool:
        """The parameters are DTensors (--tp, --fsdp): no DDP, gathered to save."""
        return self.mesh is not None

    @property
    def data_ranks(self) -> tuple[int, int]:
        """(this rank's index, the number of ranks) among those that see different batches: every rank but under
        --tp, where all see the same."""
        return (0, 1) if self.knobs.tp > 1 else (self.rank, self.world)


def prepare(knobs: Knobs) -> Run:
    """Checks the knobs and the data, tokenizes the pairs and builds the policy."""
    check_knobs(knobs)
    loss_config(**loss_options(knobs), use_weighting=knobs.use_weighting)
    check_ld_alpha(knobs.ld_alpha)
    if knobs.sync_ref_model and not knobs.ref_model_sync_steps:
        knobs.ref_model_sync_steps = TRL_DEFAULT_SYNC_STEPS
    if knobs.precompute_ref_log_probs and knobs.ref_model_sync_steps:
        raise ValueError("--precompute-ref-log-probs and --ref-model-sync-steps exclude each other")
    if knobs.backend not in (None, *BACKENDS):
        raise ValueError(f"unknown --backend {knobs.backend!r}; valid: {', '.join(BACKENDS)}")
    if knobs.trainer == "trl":
        if importlib.util.find_spec("trl") is None:
            raise ValueError("--trainer trl needs TRL: pip install dpo-kernels[trl]")
    if "tensorboard" in knobs.report_to and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    if "wandb" in knobs.report_to and importlib.util.find_spec("wandb") is None:
        raise ValueError("--report-to wandb needs the wandb package: pip install wandb")
    resume = None
    if knobs.resume_from_checkpoint and (knobs.tp > 1 or knobs.fsdp):
        raise ValueError(
            "--resume-from-checkpoint does not work with --tp / --fsdp yet: their checkpoints hold the model "
            "(save_pretrained) but not the sharded optimizer and reference"
        )
    if knobs.resume_from_checkpoint:
        resume = checkpoint.resolve(knobs.resume_from_checkpoint, knobs.output_dir)
        check_same_knobs(knobs, resume)
    elif checkpoint.checkpoints(knobs.output_dir):
        # a fresh run there would mix its checkpoints with the earlier run's, and `latest` could pick theirs
        raise ValueError(
            f"--output-dir {knobs.output_dir} holds checkpoints of an earlier run: go on with "
            "--resume-from-checkpoint latest, or write to another --output-dir"
        )
    train_ds, eval_ds, eval_name = load_datasets(knobs)
    rank, world, device = init_distributed()
    if knobs.tp > 1 and world != knobs.tp:
        raise ValueError(
            f"--tp {knobs.tp} runs on exactly {knobs.tp} processes (torchrun --nproc-per-node {knobs.tp}), got "
            f"{world}: data parallelism across tensor-parallel groups is not supported yet"
        )
    if knobs.fsdp and world == 1:
        raise ValueError("--fsdp needs torchrun with 2 or more processes")
    if knobs.bf16 is None:
        knobs.bf16 = device.type == "cuda"
    tokenizer = load_tokenizer(knobs.model, knobs.cache_dir)
    tokenize = partial(
        tokenize_pairs,
        tokenizer=tokenizer,
        max_length=knobs.max_length,
        truncation_mode=knobs.truncation_mode,
    )
    train_pairs = tokenize(train_ds, name=knobs.train_file)
    eval_pairs = tokenize(eval_ds, name=eval_name)
    per_step = knobs.per_device_train_batch_size * (1 if knobs.tp > 1 else world)
    if len(train_pairs) < per_step:
        raise ValueError(
            f"{knobs.train_file}: {len(train_pairs)} pairs, fewer than one batch of {per_step} "
            "(--per-device-train-batch-size times the ranks)"
        )
    if knobs.max_steps is None:
        epoch_steps = len(train_pairs) // per_step / knobs.gradient_accumulation_steps
        epochs = knobs.num_train_epochs
        knobs.max_steps = max(1, math.ceil(epochs * epoch_steps)) if epochs else DEFAULT_MAX_STEPS
    if knobs.warmup_steps is not None:
        w = knobs.warmup_steps
        knobs.warmup_ratio = w if w < 1 else min(1.0, w / knobs.max_steps)
    torch.manual_seed(knobs.seed)
    # packed rows: flash-attn's varlen kernels where installed, else the model's own mask support
    flash = knobs.padding_free and device.type == "cuda" and importlib.util.find_spec("flash_attn")
    attn = "flash_attention_2" if flash else None
    policy = load_model(knobs.model, tokenizer, knobs.max_length, attn).to(device)
    if knobs.padding_free:
        check_packing(policy)
    if knobs.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = Backbone(policy) if knobs.head == "fused" else policy
    run = Run(knobs, tokenizer, policy, model, train_ds, eval_ds, train_pairs, eval_pairs, device, rank, world, resume)
    run.attn = attn
    if knobs.tp > 1 or knobs.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        run.mesh = init_device_mesh(device.type, (world,))
        shard_model(run, model, policy)
    return run


def shard_model(run: Run, model: torch.nn.Module, lm: torch.nn.Module) -> None:
    """--tp: the output layer sharded over the vocabulary; --fsdp: FSDP2 over the decoder layers and `model`."""
    if run.knobs.tp > 1:
        tensor_parallel(lm, run.mesh)
    else:
        fully_shard_model(model, lm, run.mesh)


def reference_model(run: Run) -> torch.nn.Module:
    """A frozen copy of the policy as it is now (after SFT): a deep copy, or under --fsdp (whose modules cannot be
    copied) a fresh model loaded with the gathered weights and sharded alike."""
    if not run.knobs.fsdp:
        return copy.deepcopy(run.model)
    weights = full_state_dict(run.policy)
    lm = load_model(run.knobs.model, run.tokenizer, run.knobs.max_length, run.attn).to(run.device)
    lm.load_state_dict(weights)
    model = Backbone(lm) if run.knobs.head == "fused" else lm
    shard_model(run, model, lm)
    return model


def load_datasets(knobs: Knobs) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """The train and held-out pairs, and the held-out set's name: --eval-file, --eval-split of the train file, or
    the bundled test set when training on the bundled train set."""
    train_ds = load_pairs(knobs.train_file)
    bundled = Path(knobs.train_file).expanduser().resolve() == BUNDLED_TRAIN.resolve()
    if knobs.eval_split:
        split = train_ds.train_test_split(test_size=knobs.eval_split, seed=knobs.seed)
        if len(split["test"]) == 0 or len(split["train"]) == 0:
            raise ValueError(f"--eval-split {knobs.eval_split} of {len(train_ds)} pairs leaves one side empty")
        train_ds, eval_ds = split["train"], split["test"]
        eval_name = f"{knobs.train_file} (--eval-split {knobs.eval_split})"
    elif knobs.eval_file or bundled:
        eval_name = knobs.eval_file or str(BUNDLED_TEST)
        eval_ds = load_pairs(eval_name)
    else:
        raise ValueError(
            f"--train-file {knobs.train_file}: name the held-out pairs with --eval-file FILE, or hold out part "
            "of the train file with --eval-split 0.1 (the bundled test set goes with the bundled train set only)"
        )
    if knobs.max_train_pairs:
        train_ds = train_ds.select(range(min(knobs.max_train_pairs, len(train_ds))))
    if knobs.max_eval_pairs:
        eval_ds = eval_ds.select(range(min(knobs.max_eval_pairs, len(eval_ds))))
    return train_ds, eval_ds, eval_name


def check_same_knobs(knobs: Knobs, path: Path) -> None:
    saved = json.loads((path / "knobs.json").read_text())
    now = asdict(knobs)
    changed = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in SAME_ON_RESUME if saved.get(k) != now[k]
    ]
    if changed:
        raise ValueError(f"--resume-from-checkpoint {path}: the run was saved with other knobs: {'; '.join(changed)}")


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun, joins the process group (NCCL, CPUs: gloo)."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


# -------------------------------------------------------------------------------------------------
# Model calls and losses


def forward(model, batch: dict, bf16: bool) -> torch.Tensor:
    """Logits [2B, T, V] of padded rows, [N, V] of packed ones (bf16 under autocast); from a
    Backbone, the last hidden states [2B, T, H] or [N, H]."""
    if "cu_seqlens" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(**inputs, use_cache=False)
    out = getattr(out, "logits", out)
    return out[0] if "cu_seqlens" in batch else out


def fused_head(model) -> dict | None:
    """The output layer and logit transform of a Backbone (under DDP or not), else None."""
    model = getattr(model, "module", model)  # DDP
    return model.head() if isinstance(model, Backbone) else None


def losses_of(knobs: Knobs):
    """The module of the log-prob and loss functions: dpo_kernels, or under --tp dpo_kernels.parallel (the same
    functions on logits / an output layer sharded over the vocabulary)."""
    if knobs.tp > 1:
        from dpo_kernels import parallel

        return parallel
    return dk


def token_logps(model, batch: dict, knobs: Knobs) -> torch.Tensor:
    """Per-token log-probs of the labels: through the fused head, or from the logits."""
    out, head, lib = forward(model, batch, knobs.bf16), fused_head(model), losses_of(knobs)
    if head:
        return lib.linear_token_logps(out, labels=batch["labels"], **head, backend=knobs.backend)
    return lib.token_logps(out, batch["labels"], backend=knobs.backend)


def dpo_loss(model, batch: dict, ref_chosen, ref_rejected, knobs: Knobs):
    out, head, lib = forward(model, batch, knobs.bf16), fused_head(model), losses_of(knobs)
    loss_fn = partial(lib.dpo_loss_from_hidden, **head) if head else lib.dpo_loss_from_logits
    # labels are shifted (labels[t] is the token at t + 1, -100 at each row's end): they line up with
    # the logits or hidden states as they are, no copy
    return loss_fn(
        out,
        labels=batch["labels"],
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        cu_seqlens=batch.get("cu_seqlens"),
        ld_alpha=knobs.ld_alpha,
        use_weighting=knobs.use_weighting,
        return_stats=True,  # TRL's logits/*, entropy and mean_token_accuracy metrics
        backend=knobs.backend,
        **loss_options(knobs),
    )


def sft_loss(model, batch: dict, knobs: Knobs) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens."""
    logps = token_logps(model, batch, knobs)
    return -logps.sum() / (batch["labels"] != IGNORE_INDEX).sum().clamp(min=1)


class Reference:
    """Reference log-probs of a batch's chosen and rejected rows ([B] each, LD-weighted like the
    policy's): from a frozen model, or from tables filled in one pass."""

    def __init__(self, model, run: Run):
        self.model, self.run = model.eval().requires_grad_(False), run
        self.tables: dict[str, torch.Tensor] = {}

    def __call__(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split in self.tables:
            return self.tables[split][batch["index"]].unbind(1)
        return self.logps(batch)

    @torch.no_grad()
    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        knobs = self.run.knobs
        seq = dk.sequence_logps(
            token_logps(self.model, batch, knobs),
            batch["labels"],
            ld_alpha=knobs.ld_alpha,
            cu_seqlens=batch.get("cu_seqlens"),
            backend=knobs.backend,
        )
        return seq.logps.chunk(2)

    def precompute(self, splits: dict[str, list[dict]]) -> None:
        """One pass over each split (every rank does all of it), then the model is freed."""
        for split, pairs in splits.items():
            table = None  # in the dtype of the sequence sums (float64)
            batches = eval_batches(self.run, pairs, stripe=False)
            for batch in tqdm(batches, desc=f"ref log-probs ({split})", disable=self.run.rank > 0):
                batch = to_device(batch, self.run.device)
                logps = torch.stack(self.logps(batch), dim=1)
                if table is None:
                    table = logps.new_zeros(len(pairs), 2)
                table[batch["index"]] = logps
            self.tables[split] = table
        self.model = None

    @torch.no_grad()
    def sync(self, policy, alpha: float) -> None:
        """TR-DPO: ref <- alpha * policy + (1 - alpha) * ref."""
        for ref_param, param in zip(self.model.parameters(), policy.parameters()):
            ref_param.lerp_(param, alpha)

    def state_dict(self) -> dict:
        if self.model is None:
            return {"tables": self.tables}
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "tables" in state:
            self.tables, self.model = {k: v.to(self.run.device) for k, v in state["tables"].items()}, None
        else:
            self.model.load_state_dict(state["model"])


# -------------------------------------------------------------------------------------------------
# Data order, metrics, signals


class Batches:
    """Training batches without end, reshuffled every epoch, each rank its share of the pairs. Resumable: its state
    is the epoch, the shuffling generator's state at the epoch's start and the batches taken in the epoch.

    One shuffled order for any number of ranks: a step's global batch is the next `per_device_train_batch_size`
    times the data-parallel ranks pairs, split among them in rank order, so that a run on R ranks sees the global
    batches of one process with R times the batch size (under --tp every rank takes the whole global batch)."""

    def __init__(self, run: Run):
        knobs = run.knobs
        self.size = knobs.per_device_train_batch_size
        self.data_rank, data_ranks = run.data_ranks
        self.generator = torch.Generator().manual_seed(knobs.seed)
        # pairs are collated when taken, so that skipping to a resumed position costs nothing
        self.loader = DataLoader(
            run.train_pairs,
            self.size * data_ranks,
            shuffle=True,
            generator=self.generator,
            collate_fn=list,
            drop_last=True,
        )
        self.collate = collate_fn(run)
        self.epoch, self.taken, self.iterator = 0, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.iterator is None:
            self.epoch_start = self.generator.get_state()
            self.iterator = iter(self.loader)
            for _ in range(self.taken):
                next(self.iterator)
        pairs = next(self.iterator, None)
        if pairs is None:
            self.epoch, self.taken, self.iterator = self.epoch + 1, 0, None
            return next(self)
        self.taken += 1
        return self.collate(pairs[self.data_rank * self.size : (self.data_rank + 1) * self.size])

    def state_dict(self) -> dict:
        start = self.epoch_start if self.iterator is not None else self.generator.get_state()
        return {"epoch": self.epoch, "taken": self.taken, "generator": start}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.taken, self.iterator = state["epoch"], state["taken"], None
        self.generator.set_state(state["generator"])


def eval_batches(run: Run, pairs: list[dict], stripe: bool = True) -> DataLoader:
    """Batches in order; with `stripe`, data rank r of R gets pairs r, r + R, ... (sums all-reduced; under --tp
    every rank takes all of them, and the all-reduced sums and pair counts both count each pair tp times)."""
    data_rank, data_ranks = run.data_ranks
    return DataLoader(
        pairs[data_rank::data_ranks] if stripe else pairs,
        run.knobs.per_device_eval_batch_size,
        collate_fn=collate_fn(run),
    )


def collate_fn(run: Run):
    return partial(collate, pad_id=run.tokenizer.pad_token_id, padding_free=run.knobs.padding_free)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def num_tokens(batch: dict) -> int:
    """Tokens of a batch but its padding (prompts included, as TRL counts them)."""
    return len(batch["labels"]) if "cu_seqlens" in batch else int(batch["attention_mask"].sum())


def warmup_cosine(steps: int, warmup_ratio: float):
    warmup = math.ceil(warmup_ratio * steps)

    def factor(step: int) -> float:  # transformers' get_cosine_schedule_with_warmup, as TRL runs it: 0 at step 0
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def all_reduce(values: dict[str, float], run: Run, average: bool = False) -> dict[str, float]:
    if run.world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / run.world if average else t).tolist()))


def finite_or_none(record: dict) -> dict:
    """JSON has no NaN or inf: null instead."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class Metrics:
    """Means of the per-micro-batch metrics since the last log (and over ranks), as TRL logs them:
    to metrics.jsonl, the console and the --report-to trackers."""

    def __init__(self, run: Run, resumed: dict | None = None):
        self.run = run
        self.window: dict[str, list[float]] = defaultdict(list)
        self.num_tokens = 0
        self.records: list[dict] = []
        if resumed:
            self.records = resumed["records"]
            self.window.update(copy.deepcopy(resumed["window"]))
            self.num_tokens = resumed["num_tokens"]
        self.file = self.trackers = None
        if run.rank == 0:
            self.file = open(Path(run.knobs.output_dir) / "metrics.jsonl", "w")
            for record in self.records:  # the resumed run's metrics.jsonl is the uninterrupted run's
                self.file.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
            self.file.flush()
            self.trackers = Trackers(run, resumed_step=resumed["step"] if resumed else None)

    def add(self, values: dict[str, torch.Tensor], num_tokens: int) -> None:
        for key, value in values.items():
            self.window[key].append(float(value))
        self.num_tokens += num_tokens

    def flush(self, phase: str, step: int, **extra: float) -> None:
        means = {key: sum(values) / len(values) for key, values in self.window.items()}
        record = all_reduce(means, self.run, average=True)
        # under --tp the ranks count the same tokens: divided by tp, as TRL does
        record["num_tokens"] = all_reduce({"n": self.num_tokens}, self.run)["n"] / self.run.knobs.tp
        self.window.clear()
        self.write({"phase": phase, "step": step, **record, **extra})

    def write(self, record: dict, echo: bool = True, track: bool = True) -> None:
        self.records.append(record)
        if self.file:
            self.file.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
            self.file.flush()
            if track:
                self.trackers.log(record)
        if self.file and echo:
            shown = {k: v for k, v in record.items() if k not in ("phase", "step")}
            values = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            tqdm.write(f"{record['phase']} {record['step']:>5}  {values}")

    def state_dict(self) -> dict:
        return {"records": list(self.records)}  # the window and token count are per rank: Trainer.save

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.trackers.close()


class Trackers:
    """--report-to: tensorboard (event files in output_dir/tensorboard) and wandb (offline without a network)."""

    def __init__(self, run: Run, resumed_step: int | None):
        knobs, self.writers = run.knobs, []
        out = Path(knobs.output_dir)
        if "tensorboard" in knobs.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events the interrupted run logged past its checkpoint
            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step)
            self.writers.append(self._tensorboard)
        if "wandb" in knobs.report_to:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_reachable() else "offline")
            if mode == "offline":
                log.warning("--report-to wandb: no network to wandb.ai, logging offline in %s (wandb sync)", out)
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "dpo_kernels"),
                dir=str(out),
                config=asdict(knobs),
                mode=mode,
                resume="allow" if resumed_step is not None else None,
            )
            self.writers.append(self._wandb)

    def _tensorboard(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def _wandb(self, step: int, scalars: dict) -> None:
        self.wandb.log(scalars, step=step)

    def log(self, record: dict) -> None:
        phase = record["phase"]
        scalars = {
            (k if phase == "eval" else f"{phase}/{k}"): v
            for k, v in record.items()
            if k not in ("phase", "step") and isinstance(v, (int, float))
        }
        for write in self.writers:
            write(record["step"], scalars)

    def close(self) -> None:
        if hasattr(self, "tensorboard"):
            self.tensorboard.close()
        if hasattr(self, "wandb"):
            self.wandb.finish()


def _wandb_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
        return True
    except OSError:
        return False


class Signals:
    """SIGINT and SIGTERM (what preemption sends) only set a flag: the loop finishes its step, saves a checkpoint
    and stops. A second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: keep the default handlers
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        tqdm.write(f"{name}: finishing the step, then saving a checkpoint (a second Ctrl-C stops at once)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """The state of a run (what a checkpoint holds) and its loop: `train()` runs SFT, then DPO."""

    def __init__(self, run: Run, signals: Signals):
        self.run, self.knobs, self.signals = run, run.knobs, signals
        self.resumed = checkpoint.load(run.resume, run.policy) if run.resume else None
        self.rank_state = None  # what differs between ranks: the metrics not yet logged, the RNG states
        if self.resumed:
            ranks = self.resumed["ranks"]
            if len(ranks) != run.world:
                raise ValueError(f"{run.resume}: saved by {len(ranks)} ranks, resumed by {run.world}")
            self.rank_state = ranks[run.rank]
        resumed_metrics = {**self.resumed["metrics"], **self.rank_state} if self.resumed else None
        self.metrics = Metrics(run, resumed_metrics)
        self.batches = Batches(run)
        self.model = run.model
        if run.world > 1 and not run.sharded:  # --tp / --fsdp: the gradients are the shards' own (no DDP)
            ids = [run.device.index] if run.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
        self.reference: Reference | None = None
        self.before: dict | None = None
        self.skipped = 0
        self.last_checkpoint: Path | None = run.resume
        if self.resumed:
            self.batches.load_state_dict(self.resumed["batches"])
            self.skipped = self.resumed["skipped_steps"]

    def train(self) -> dict[str, dict[str, float]]:
        """SFT warm-up, then DPO (here, or in TRL's trainer). Returns the held-out metrics before and after DPO."""
        knobs, run, resumed = self.knobs, self.run, self.resumed
        step = 0
        if knobs.sft_steps and (resumed is None or resumed["phase"] == "sft"):
            sft = lambda batch: (sft_loss(self.model, batch, knobs), {})
            sft_batches = map(chosen_half, self.batches)  # SFT on the chosen rows
            step = self.optimize(sft, sft_batches, "sft", knobs.sft_steps, knobs.sft_lr, step)
            resumed = None
        else:
            step = knobs.sft_steps

        self.reference = Reference(reference_model(run), run)
        if resumed is not None:  # in DPO: the reference and the metrics before it come from the checkpoint
            self.reference.load_state_dict(resumed["reference"])
            self.before = resumed["before"]
        else:
            if knobs.precompute_ref_log_probs and knobs.trainer == "ours":
                self.reference.precompute({"train": run.train_pairs, "eval": run.eval_pairs})
            self.evaluate(step, "before")

        def dpo(batch):
            out = dpo_loss(self.model, batch, *self.reference(batch, "train"), knobs)
            return out.loss, out.metrics

        if knobs.trainer == "trl":  # TRL's reference model is the frozen copy evaluated against here
            from dpo_kernels.train.trl_phase import dpo_in_trl

            ref_model = getattr(self.reference.model, "lm", self.reference.model)
            step = dpo_in_trl(self, ref_model, step)
        else:
            step = self.optimize(dpo, self.batches, "dpo", knobs.max_steps, knobs.learning_rate, step)
        after = self.evaluate(step, "after")
        self.metrics.close()
        weights = full_state_dict(run.policy) if run.sharded else None  # every rank takes part in the gathers

        if run.rank == 0:
            print(results_table(self.before, after, len(run.eval_pairs)))
            run.policy.save_pretrained(knobs.output_dir, state_dict=weights)
            run.tokenizer.save_pretrained(knobs.output_dir)
            if knobs.plot:
                from dpo_kernels.train.plots import plot_curves

                plot_curves(self.metrics.records, Path(knobs.output_dir) / "curves.png")
            log.info("saved the model, tokenizer and metrics in %s", knobs.output_dir)
        if run.world > 1:  # no rank leaves (and tears the process group down) while rank 0 still writes
            dist.barrier()
        return {"before": self.before, "after": after}

    def optimize(self, loss_fn, batches, phase: str, steps: int, lr: float, step: int) -> int:
        """`steps` AdamW steps with warm-up + cosine, gradient accumulation and clipping, where
        `loss_fn(batch) -> (loss, metrics)`; `step` counts the steps before. Returns the step count."""
        knobs, run = self.knobs, self.run
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=knobs.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, knobs.warmup_ratio))
        first = 1
        if self.resumed is not None and self.resumed["phase"] == phase:
            optimizer.load_state_dict(self.resumed["optimizer"])
            schedule.load_state_dict(self.resumed["scheduler"])
            first = self.resumed["phase_step"] + 1
            checkpoint.set_rng_state(self.rank_state["rng"])
            log.info("resumed from %s at %s step %d", run.resume, phase, first - 1)
        bar = tqdm(range(first, steps + 1), desc=phase, disable=run.rank > 0, dynamic_ncols=True)
        for i in bar:
            losses = []
            for micro in range(1, knobs.gradient_accumulation_steps + 1):
                batch = to_device(next(batches), run.device)
                last = micro == knobs.gradient_accumulation_steps  # the gradients are reduced on the last one
                with self.grad_sync(last):
                    loss, values = loss_fn(batch)
                    (loss / knobs.gradient_accumulation_steps).backward()
                losses.append(loss.detach())
                self.metrics.add({"loss": loss.detach(), **values}, num_tokens(batch))
            if run.sharded:
                grad_norm = sharded_grad_norm(params, knobs.max_grad_norm, run)
            elif knobs.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, knobs.max_grad_norm)
            else:  # no clipping, as in HF and TRL
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            loss_value = float(torch.stack(losses).mean())
            finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
            stop = {"nonfinite": float(not finite), "signal": float(self.signals.received or 0)}
            stop = all_reduce(stop, run)  # every rank decides the same
            if stop["nonfinite"] and not knobs.skip_nonfinite_steps:
                self.metrics.flush(phase, step + i, learning_rate=schedule.get_last_lr()[0], grad_norm=float(grad_norm))
                self.metrics.close()
                raise StopTraining(self.nonfinite_message(phase, i, step + i, loss_value, float(grad_norm)))
            if stop["nonfinite"]:
                self.skipped += 1
                log.warning(
                    "%s step %d: non-finite loss or gradient norm, step skipped (%d so far)", phase, i, self.skipped
                )
            else:
                optimizer.step()
            lr_used = schedule.get_last_lr()[0]  # logged: the step's own rate, as TRL logs it
            with warnings.catch_warnings():  # a skipped step still moves the schedule: no warning about it
                warnings.simplefilter("ignore", UserWarning)
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if phase == "dpo" and knobs.ref_model_sync_steps and i % knobs.ref_model_sync_steps == 0:
                self.reference.sync(run.model, knobs.ref_model_mixup_alpha)
            bar.set_postfix(
                loss=f"{loss_value:.4f}",
                **({"acc": f"{float(values['rewards/accuracies']):.2f}"} if values else {}),
            )
            if i % knobs.logging_steps == 0 or i == steps:
                extra = {"skipped_steps": self.skipped} if knobs.skip_nonfinite_steps else {}
                self.metrics.flush(phase, step + i, learning_rate=lr_used, grad_norm=float(grad_norm), **extra)
            if phase == "dpo" and knobs.eval_steps and i % knobs.eval_steps == 0 and i < steps:
                self.evaluate(step + i, "during")
            if (knobs.save_steps and (step + i) % knobs.save_steps == 0) or stop["signal"]:
                state = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict()}
                self.save(phase, i, step + i, state)
            if stop["signal"]:
                signum = int(self.signals.received or signal.SIGTERM)  # a rank that got none: the launcher's
                name = signal.Signals(signum).name
                self.metrics.close()
                raise StopTraining(
                    f"{name} at {phase} step {i} (step {step + i} of the run): saved {self.last_checkpoint}; "
                    "continue with --resume-from-checkpoint latest (and the same knobs)",
                    128 + signum,
                )
        return step + steps

    def grad_sync(self, last: bool):
        """The context of a micro-batch's backward: DDP and FSDP2 reduce the gradients on the last micro-batch only
        (--tp has nothing to reduce: the ranks' gradients are their shards', or the same everywhere)."""
        if self.run.world == 1 or last or self.knobs.tp > 1:
            return contextlib.nullcontext()
        if self.knobs.fsdp:
            return _fsdp_no_sync(self.model)
        return self.model.no_sync()

    def nonfinite_message(self, phase: str, i: int, run_step: int, loss: float, grad_norm: float) -> str:
        last = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        return (
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at {phase} step {i} "
            f"(step {run_step} of the run) "
            f"(loss {loss}, grad norm {grad_norm}): stopped before applying it, the final model not saved; {last} "
            "(--save-steps N saves more often; --skip-nonfinite-steps skips such steps instead)"
        )

    def save(self, phase: str, phase_step: int, step: int, state: dict) -> None:
        """A checkpoint of everything the loop holds at global step `step` (rank 0 writes it). Under --tp / --fsdp
        the model's weights are gathered whole (a normal save_pretrained folder), but the sharded optimizer and
        reference are left out: such a checkpoint is a model, not a point to resume from."""
        weights = None
        if self.run.sharded:
            weights = full_state_dict(self.run.policy)
            state = {key: None for key in state}
        state = {
            **state,
            "phase": phase,
            "phase_step": phase_step,
            "step": step,
            "skipped_steps": self.skipped,
            "reference": self.reference.state_dict() if phase == "dpo" and not self.run.sharded else None,
            "before": self.before,
            "batches": self.batches.state_dict(),
            "metrics": {**self.metrics.state_dict(), "step": step},
        }
        mine = {
            "window": dict(self.metrics.window),
            "num_tokens": self.metrics.num_tokens,
            "rng": checkpoint.rng_state(),
        }
        state["ranks"] = [mine]
        if self.run.world > 1:
            state["ranks"] = [None] * self.run.world
            dist.all_gather_object(state["ranks"], mine)
        path = None
        if self.run.rank == 0:
            path = checkpoint.save(
                self.knobs.output_dir,
                step,
                self.run.policy,
                self.run.tokenizer,
                state,
                self.knobs.save_total_limit,
                weights=weights,
            )
            knobs_json = Path(self.knobs.output_dir) / "knobs.json"
            (path / "knobs.json").write_text(knobs_json.read_text())
            tqdm.write(f"saved {path}")
        if self.run.world > 1:
            dist.barrier()
        self.last_checkpoint = path or Path(self.knobs.output_dir) / f"checkpoint-{step}"

    @torch.no_grad()
    def evaluate(self, step: int, when: str) -> dict[str, float]:
        """Loss and TRL's metrics over the held-out pairs (means over all pairs of all ranks), logged as eval_*."""
        run = self.run
        model = run.model  # not the DDP wrapper: ranks may see different numbers of batches
        model.eval()
        sums: dict[str, float] = defaultdict(float)
        for batch in eval_batches(run, run.eval_pairs):
            batch = to_device(batch, run.device)
            out = dpo_loss(model, batch, *self.reference(batch, "eval"), run.knobs)
            n = len(batch["index"])
            for key, value in {"loss": out.loss, **out.metrics}.items():
                sums[key] += float(value) * n
            sums["pairs"] += n
        model.train()
        if run.knobs.fsdp:  # FSDP2 keeps the root's parameters gathered after a forward without backward
            model.reshard()
        sums = all_reduce(dict(sums), run)
        pairs = sums.pop("pairs")
        result = {key: value / pairs for key, value in sums.items()}
        if when == "before":
            self.before = result
        self.metrics.write({"phase": "eval", "step": step, **{f"eval_{k}": v for k, v in result.items()}})
        return result


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sharded_grad_norm(params: list, max_norm: float, run: Run) -> torch.Tensor:
    """The global gradient norm where parameters are DTensors (--tp, --fsdp), clipped to `max_norm` as
    clip_grad_norm_ clips (> 0): each sharded gradient's local squares summed over the ranks, a replicated one's
    (--tp) counted once."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float32, device=run.device)
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    sharded = sum((g.float().pow(2).sum() for g in local), zero)
    dist.all_reduce(sharded)
    replicated = sum((g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)), zero)
    norm = (sharded + replicated).sqrt()
    if max_norm > 0:
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for g in grads:
            g.mul_(coef)
    return norm


def train(run: Run) -> dict[str, dict[str, float]]:
    """SFT then DPO; knobs.json is written first. Raises StopTraining when interrupted (after saving a checkpoint)
    or on a non-finite loss."""
    out = Path(run.knobs.output_dir)
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "knobs.json").write_text(json.dumps(asdict(run.knobs), indent=2) + "\n")
    if run.world > 1:
        dist.barrier()
    with Signals() as signals:
        return Trainer(run, signals).train()


def results_table(before: dict, after: dict, pairs: int) -> str:
    keys = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"]
    lines = [f"held-out, {pairs} pairs         before DPO   after DPO"]
    for key in keys + ["logps/chosen", "logps/rejected"]:
        lines.append(f"{key:<24} {before[key]:>12.4f} {after[key]:>11.4f}")
    lines.append("(before DPO the policy is the reference: margins are 0, ties count as wrong)")
    return "\n".join(lines)
