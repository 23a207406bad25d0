"""Minimal DPO training with dpo_kernels: an optional SFT warm-up on the chosen completions, then
DPO against a reference model, on the bundled HH-RLHF harmless pairs by default.

    python -m dpo_kernels.train                # the tiny Llama on the CPU, a few minutes
    python -m dpo_kernels.train --model PATH --loss-type sigmoid sft --loss-weights 1 0.2
    torchrun --nproc-per-node 8 -m dpo_kernels.train --model PATH --padding-free
    python -m dpo_kernels.train --trainer trl   # the DPO phase in TRL's DPOTrainer, with our loss
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import itertools
import json
import logging
import math
import os
import sys
import types
import typing
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import dpo_kernels as dk
from dpo_kernels.api import BACKENDS
from dpo_kernels.losses import check_ld_alpha, loss_config
from dpo_kernels.train.data import (
    BUNDLED_TEST,
    BUNDLED_TRAIN,
    IGNORE_INDEX,
    chosen_half,
    collate,
    load_pairs,
    tokenize_pairs,
)
from dpo_kernels.train.model import Backbone, check_packing, load_model, load_tokenizer

log = logging.getLogger("dpo_kernels.train")


def knob(default, help: str):
    """A Knobs field: its default and its --help line."""
    return field(default_factory=lambda: copy.copy(default), metadata={"help": help})


@dataclass
class Knobs:
    # data
    train_file: str = knob(str(BUNDLED_TRAIN), "preference pairs to train on")
    eval_file: str = knob(str(BUNDLED_TEST), "held-out pairs, evaluated before and after DPO")
    max_train_pairs: int = knob(0, "use the first N training pairs (0: all)")
    max_eval_pairs: int = knob(0, "use the first N held-out pairs (0: all)")
    max_length: int = knob(160, "tokens per prompt + completion row")
    truncation_mode: str = knob("keep_start", "keep_start or keep_end")
    padding_free: bool = knob(False, "pack the rows of a batch into one row, with cu_seqlens")
    # model
    model: str = knob("tiny", "'tiny' (a small Llama built here) or a local checkpoint folder")
    cache_dir: str = knob("~/.cache/dpo_kernels", "where the tiny model's tokenizer is cached")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass")
    bf16: bool | None = knob(None, "bf16 autocast (default: on with CUDA only)")
    backend: str | None = knob(None, "kernels: triton, cpu or reference (default: by device)")
    # fused on the CPU too: its chunked torch path steps the tiny default as fast as the logits do
    # (about 0.5 s per DPO + SFT micro-batch each, within the noise of a shared 2-core machine)
    head: str = knob(
        "fused",
        "fused: log-probs from the last hidden states and the output layer, the logits never built "
        "(dk.dpo_loss_from_hidden; Triton on CUDA, chunked torch on the CPU, as fast for the tiny model); "
        "logits: the model's logits (dk.dpo_loss_from_logits)",
    )
    trainer: str = knob(
        "ours",
        "ours: this script's loop; trl: the DPO phase in TRL's DPOTrainer with dpo_kernels' loss (the SFT "
        "warm-up and the held-out table stay ours; TRL tokenizes the text itself, so its rows can differ "
        "slightly from ours; needs pip install dpo-kernels[trl])",
    )
    # torch's default is a thread per core; on a small CPU shared with other work, threads that wait
    # for each other at every op cost far more than they bring to a model this small
    cpu_threads: int = knob(1, "torch threads when training on the CPU (0: torch's default)")
    # optimization: steps are optimizer steps, a micro-batch is `batch_size` pairs per rank
    sft_steps: int = knob(250, "SFT warm-up steps on the chosen completions (0: none)")
    sft_lr: float = knob(3e-3, "peak learning rate of the SFT warm-up")
    dpo_steps: int = knob(150, "DPO steps")
    lr: float = knob(1.5e-4, "peak learning rate of DPO")
    batch_size: int = knob(8, "pairs per micro-batch (per rank)")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    warmup_ratio: float = knob(0.1, "linear warm-up over this fraction of the steps, then cosine")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    max_grad_norm: float = knob(1.0, "gradient clipping")
    seed: int = knob(0, "seed of the model init and of the data order")
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
    precompute_ref_logps: bool = knob(False, "one reference pass over the data, then free the copy")
    ref_sync_steps: int = knob(0, "TR-DPO: move the reference to the policy every N steps (0: off)")
    ref_mixup_alpha: float = knob(0.6, "TR-DPO: ref <- alpha * policy + (1 - alpha) * ref")
    # output
    output_dir: str = knob("runs/dpo", "metrics.jsonl, knobs.json, the final model and tokenizer")
    log_every: int = knob(10, "log the mean metrics every N steps")
    eval_batch_size: int = knob(16, "pairs per evaluation batch")
    plot: bool = knob(False, "also write curves.png")


def parse_knobs(argv: list[str] | None = None) -> Knobs:
    """argparse over Knobs: one --dashed-name per field, its type from the annotation."""
    parser = argparse.ArgumentParser(
        prog="python -m dpo_kernels.train",
        description=__doc__.split("\n\n")[0],
    )
    hints = typing.get_type_hints(Knobs)
    for f in fields(Knobs):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `X | None`
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default_factory()
        shown = "" if default is None else f" (default: {default})"
        opts = {"default": default, "help": f.metadata["help"] + shown}
        if kind is bool:
            opts["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            opts.update(nargs="+", type=typing.get_args(kind)[0])
        else:
            opts["type"] = kind
        parser.add_argument("--" + f.name.replace("_", "-"), **opts)
    return Knobs(**vars(parser.parse_args(argv)))


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


def prepare(knobs: Knobs) -> Run:
    """Checks the knobs and the data, tokenizes the pairs and builds the policy."""
    loss_config(**loss_options(knobs), use_weighting=knobs.use_weighting)
    check_ld_alpha(knobs.ld_alpha)
    if knobs.precompute_ref_logps and knobs.ref_sync_steps:
        raise ValueError("--precompute-ref-logps and --ref-sync-steps exclude each other")
    if knobs.backend not in (None, *BACKENDS):
        raise ValueError(f"unknown --backend {knobs.backend!r}; valid: {', '.join(BACKENDS)}")
    for name, valid in (("head", ("fused", "logits")), ("trainer", ("ours", "trl"))):
        value = getattr(knobs, name)
        if value not in valid:
            raise ValueError(f"unknown --{name} {value!r}; valid: {', '.join(valid)}")
    if knobs.trainer == "trl":
        if knobs.padding_free:
            raise ValueError("--padding-free does not work with --trainer trl (TRL 1.16 ignores padding_free)")
        if importlib.util.find_spec("trl") is None:
            raise ValueError("--trainer trl needs TRL: pip install dpo-kernels[trl]")
    for name in ("max_length", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
        if getattr(knobs, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(knobs, name)}")
    train_ds, eval_ds = load_pairs(knobs.train_file), load_pairs(knobs.eval_file)
    if knobs.max_train_pairs:
        train_ds = train_ds.select(range(min(knobs.max_train_pairs, len(train_ds))))
    if knobs.max_eval_pairs:
        eval_ds = eval_ds.select(range(min(knobs.max_eval_pairs, len(eval_ds))))
    rank, world, device = init_distributed()
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
    eval_pairs = tokenize(eval_ds, name=knobs.eval_file)
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
    return Run(knobs, tokenizer, policy, model, train_ds, eval_ds, train_pairs, eval_pairs, device, rank, world)


def loss_options(knobs: Knobs) -> dict:
    names = ["loss_type", "loss_weights", "beta", "label_smoothing", "discopop_tau"]
    return {n: getattr(knobs, n) for n in names + ["f_divergence_type", "f_alpha_divergence_coef"]}


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


def token_logps(model, batch: dict, knobs: Knobs) -> torch.Tensor:
    """Per-token log-probs of the labels: through the fused head, or from the logits."""
    out, head = forward(model, batch, knobs.bf16), fused_head(model)
    if head:
        return dk.linear_token_logps(out, labels=batch["labels"], **head, backend=knobs.backend)
    return dk.token_logps(out, batch["labels"], backend=knobs.backend)


def dpo_loss(model, batch: dict, ref_chosen, ref_rejected, knobs: Knobs):
    out, head = forward(model, batch, knobs.bf16), fused_head(model)
    loss_fn = partial(dk.dpo_loss_from_hidden, **head) if head else dk.dpo_loss_from_logits
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
            table = torch.zeros(len(pairs), 2, device=self.run.device)
            batches = eval_batches(self.run, pairs, stripe=False)
            for batch in tqdm(batches, desc=f"ref log-probs ({split})", disable=self.run.rank > 0):
                batch = to_device(batch, self.run.device)
                table[batch["index"]] = torch.stack(self.logps(batch), dim=1)
            self.tables[split] = table
        self.model = None

    @torch.no_grad()
    def sync(self, policy, alpha: float) -> None:
        """TR-DPO: ref <- alpha * policy + (1 - alpha) * ref."""
        for ref_param, param in zip(self.model.parameters(), policy.parameters()):
            ref_param.lerp_(param, alpha)


# -------------------------------------------------------------------------------------------------
# The loop


def train_batches(run: Run):
    """Training batches without end, reshuffled every epoch; each rank gets its share of pairs."""
    knobs = run.knobs
    sampler = None
    if run.world > 1:
        sampler = DistributedSampler(run.train_pairs, seed=knobs.seed, drop_last=True)
    batches = DataLoader(
        run.train_pairs,
        knobs.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(knobs.seed),
        collate_fn=collate_fn(run),
        drop_last=True,
    )
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from batches


def eval_batches(run: Run, pairs: list[dict], stripe: bool = True) -> DataLoader:
    """Batches in order; with `stripe`, rank r gets pairs r, r + world, ... (sums all-reduced)."""
    return DataLoader(
        pairs[run.rank :: run.world] if stripe else pairs,
        run.knobs.eval_batch_size,
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

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def all_reduce(values: dict[str, float], run: Run, average: bool = False) -> dict[str, float]:
    if run.world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / run.world if average else t).tolist()))


class Metrics:
    """Means of the per-micro-batch metrics since the last log (and over ranks), as TRL logs them:
    to metrics.jsonl and the console."""

    def __init__(self, run: Run):
        self.run = run
        self.window: dict[str, list[float]] = defaultdict(list)
        self.num_tokens = 0
        self.records: list[dict] = []
        path = Path(run.knobs.output_dir) / "metrics.jsonl"
        self.file = open(path, "w") if run.rank == 0 else None

    def add(self, values: dict[str, torch.Tensor], num_tokens: int) -> None:
        for key, value in values.items():
            self.window[key].append(float(value))
        self.num_tokens += num_tokens

    def flush(self, phase: str, step: int, **extra: float) -> None:
        means = {key: sum(values) / len(values) for key, values in self.window.items()}
        record = all_reduce(means, self.run, average=True)
        record["num_tokens"] = all_reduce({"n": self.num_tokens}, self.run)["n"]
        self.window.clear()
        self.write({"phase": phase, "step": step, **record, **extra})

    def write(self, record: dict, echo: bool = True) -> None:
        self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.file and echo:
            shown = {k: v for k, v in record.items() if k not in ("phase", "step")}
            values = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            tqdm.write(f"{record['phase']} {record['step']:>5}  {values}")

    def close(self) -> None:
        if self.file:
            self.file.close()


def optimize(run: Run, model, metrics, loss_fn, batches, phase, steps, lr, step, on_step=None):
    """`steps` AdamW steps with warm-up + cosine, gradient accumulation and clipping, where
    `loss_fn(batch) -> (loss, metrics)`; `step` counts the steps before. Returns the step count."""
    knobs = run.knobs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=knobs.weight_decay)
    factor = warmup_cosine(steps, knobs.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    bar = tqdm(range(1, steps + 1), desc=phase, disable=run.rank > 0, dynamic_ncols=True)
    for i in bar:
        for micro in range(1, knobs.grad_accum + 1):
            batch = to_device(next(batches), run.device)
            no_sync = run.world > 1 and micro < knobs.grad_accum  # all-reduce the last one only
            with model.no_sync() if no_sync else contextlib.nullcontext():
                loss, values = loss_fn(batch)
                (loss / knobs.grad_accum).backward()
            metrics.add({"loss": loss.detach(), **values}, num_tokens(batch))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, knobs.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step:
            on_step(i)
        bar.set_postfix(
            loss=f"{loss.item():.4f}",
            **({"acc": f"{float(values['rewards/accuracies']):.2f}"} if values else {}),
        )
        if i % knobs.log_every == 0 or i == steps:
            lr_now = schedule.get_last_lr()[0]
            metrics.flush(phase, step + i, learning_rate=lr_now, grad_norm=float(grad_norm))
    return step + steps


@torch.no_grad()
def evaluate(run: Run, reference: Reference) -> dict[str, float]:
    """Loss and TRL's metrics over the held-out pairs: means over all pairs (of all ranks)."""
    model = run.model  # not the DDP wrapper: ranks may see different numbers of batches
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    for batch in eval_batches(run, run.eval_pairs):
        batch = to_device(batch, run.device)
        out = dpo_loss(model, batch, *reference(batch, "eval"), run.knobs)
        n = len(batch["index"])
        for key, value in {"loss": out.loss, **out.metrics}.items():
            sums[key] += float(value) * n
        sums["pairs"] += n
    model.train()
    sums = all_reduce(dict(sums), run)
    pairs = sums.pop("pairs")
    return {key: value / pairs for key, value in sums.items()}


def train(run: Run) -> dict[str, dict[str, float]]:
    """SFT warm-up, then DPO (here, or in TRL's trainer). Returns the held-out metrics before and
    after DPO."""
    knobs, device = run.knobs, run.device
    Path(knobs.output_dir).mkdir(parents=True, exist_ok=True)
    metrics = Metrics(run)
    model = run.model
    if run.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
    batches = train_batches(run)
    optimize_ = partial(optimize, run, model, metrics)

    step = 0
    if knobs.sft_steps:
        sft = lambda batch: (sft_loss(model, batch, knobs), {})
        sft_batches = map(chosen_half, batches)  # SFT on the chosen rows
        step = optimize_(sft, sft_batches, "sft", knobs.sft_steps, knobs.sft_lr, step)

    reference = Reference(copy.deepcopy(run.model), run)
    if knobs.precompute_ref_logps and knobs.trainer == "ours":
        reference.precompute({"train": run.train_pairs, "eval": run.eval_pairs})
    before = evaluate(run, reference)
    metrics.write({"phase": "eval", "step": step, **{f"eval_{k}": v for k, v in before.items()}})

    def dpo(batch):
        out = dpo_loss(model, batch, *reference(batch, "train"), knobs)
        return out.loss, out.metrics

    def sync_reference(dpo_step: int) -> None:
        if knobs.ref_sync_steps and dpo_step % knobs.ref_sync_steps == 0:
            reference.sync(run.model, knobs.ref_mixup_alpha)

    if knobs.trainer == "trl":  # TRL's reference model is the frozen copy evaluated against here
        step = dpo_in_trl(run, getattr(reference.model, "lm", reference.model), metrics, step)
    else:
        step = optimize_(dpo, batches, "dpo", knobs.dpo_steps, knobs.lr, step, sync_reference)
    after = evaluate(run, reference)
    metrics.write({"phase": "eval", "step": step, **{f"eval_{k}": v for k, v in after.items()}})
    metrics.close()

    if run.rank == 0:
        print(results_table(before, after, len(run.eval_pairs)))
        run.policy.save_pretrained(knobs.output_dir)
        run.tokenizer.save_pretrained(knobs.output_dir)
        (Path(knobs.output_dir) / "knobs.json").write_text(json.dumps(asdict(knobs), indent=2))
        if knobs.plot:
            from dpo_kernels.train.plots import plot_curves

            plot_curves(metrics.records, Path(knobs.output_dir) / "curves.png")
        log.info("saved the model, tokenizer and metrics in %s", knobs.output_dir)
    return {"before": before, "after": after}


def dpo_in_trl(run: Run, ref_model, metrics: Metrics, step: int) -> int:
    """The DPO phase in TRL's DPOTrainer with dpo_kernels' loss, on the text pairs, with the knobs
    mapped to DPOConfig; TRL's logs go to metrics.jsonl. Returns the step count."""
    try:
        import transformers
        from trl import DPOConfig

        from dpo_kernels.integrations.trl import DPOTrainer
    except ImportError as err:
        raise ImportError(f"--trainer trl: {err} (pip install dpo-kernels[trl])") from err
    knobs = run.knobs
    config = DPOConfig(
        output_dir=knobs.output_dir,
        **loss_options(knobs),
        ld_alpha=knobs.ld_alpha,
        use_weighting=knobs.use_weighting,
        max_length=knobs.max_length,
        truncation_mode=knobs.truncation_mode,
        per_device_train_batch_size=knobs.batch_size,
        per_device_eval_batch_size=knobs.eval_batch_size,
        gradient_accumulation_steps=knobs.grad_accum,
        learning_rate=knobs.lr,
        max_steps=knobs.dpo_steps,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(knobs.warmup_ratio * knobs.dpo_steps),
        weight_decay=knobs.weight_decay,
        max_grad_norm=knobs.max_grad_norm,
        optim="adamw_torch",
        seed=knobs.seed,
        bf16=knobs.bf16,
        activation_checkpointing=knobs.gradient_checkpointing,  # gradient_checkpointing, renamed
        precompute_ref_log_probs=knobs.precompute_ref_logps,
        sync_ref_model=knobs.ref_sync_steps > 0,
        ref_model_sync_steps=max(1, knobs.ref_sync_steps),
        ref_model_mixup_alpha=knobs.ref_mixup_alpha,
        logging_steps=knobs.log_every,
        save_strategy="no",
        report_to="none",
    )

    class Log(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics.write({"phase": "dpo", "step": step + state.global_step, **logs}, echo=False)

    trainer = DPOTrainer(
        run.policy,
        ref_model=ref_model,
        args=config,
        train_dataset=run.train_ds,
        eval_dataset=run.eval_ds,
        processing_class=run.tokenizer,
        callbacks=[Log()],
        backend=knobs.backend,
    )
    trainer.train()
    return step + trainer.state.global_step


def results_table(before: dict, after: dict, pairs: int) -> str:
    keys = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"]
    lines = [f"held-out, {pairs} pairs         before DPO   after DPO"]
    for key in keys + ["logps/chosen", "logps/rejected"]:
        lines.append(f"{key:<24} {before[key]:>12.4f} {after[key]:>11.4f}")
    lines.append("(before DPO the policy is the reference: margins are 0, ties count as wrong)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun: only rank 0 logs its progress
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    datasets.disable_progress_bars()
    knobs = parse_knobs(argv)
    if knobs.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(knobs.cpu_threads)
    try:
        run = prepare(knobs)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    train(run)
    if run.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
