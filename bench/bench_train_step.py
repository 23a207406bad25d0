"""What does dpo_kernels change in a whole TRL DPO training step: time and peak memory, TRL alone vs the drop-in,
padded and padding-free?

    python -m bench.bench_train_step [--device cpu|cuda] [--case qwen2-0.5b head-heavy] [--pairs 2 --T 512]
                                     [--reps 1] [--loss-type sigmoid] [--no-checkpointing] [--out FILE.md]

The model is a Qwen2-0.5B-shaped Qwen2ForCausalLM built from its config with random weights (V = 151936, tied
embeddings, sdpa attention; nothing is downloaded), and a head-heavy variant with its first 4 layers only (the
vocabulary projection is then most of the step). fp32 on the CPU, fp32 weights under bf16 autocast on CUDA, gradient
checkpointing on, as TRL's DPOTrainer runs by default; a separate reference model (the policy plus 1e-2 noise). One
step is `trainer.training_step`: the reference forward, the policy forward and backward (the optimizer step is the
same for every provider and left out).

The batch is B pairs whose lengths follow the bundled HH-RLHF pairs (dpo_kernels/train/hh_rlhf: prompt, chosen and
rejected lengths in tokens taken as characters / 4; each row cut to T tokens keeping the prompt's end; the first
pair is one that reaches T), token ids random, padded to its longest row as TRL's collator does. The padding share
is the share of padded positions in that batch.

Providers, each in a process of its own (so that the peak resident memory of one does not hide another's):
  trl                         trl.DPOTrainer (its own chunked fused head)
  dpo_kernels                 dpo_kernels.integrations.trl.DPOTrainer, padded (our fused head, no logits)
  dpo_kernels, padding-free   the same with padding_free=True (the pairs packed, no padding rows)
"ms": the median step time over --reps steps after a warm-up step; "extra MiB": the peak above what was allocated
before the step (CPU: peak RSS minus RSS before, see bench/_harness.extra_peak_mib); "|Δloss|": against TRL's loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import _harness as H

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TQDM_DISABLE", "1")

HH_PAIRS = Path(__file__).resolve().parent.parent / "dpo_kernels" / "train" / "hh_rlhf" / "hh_harmless_train.jsonl"
CHARS_PER_TOKEN = 4

# Qwen2-0.5B's architecture (config.json of Qwen/Qwen2-0.5B), weights random.
QWEN2_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
CASES = {
    "qwen2-0.5b": QWEN2_05B,
    "head-heavy": dict(QWEN2_05B, num_hidden_layers=4),
    # a smoke check: 2 layers, V = 1000
    "tiny": dict(
        QWEN2_05B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
}
PROVIDERS = ("trl", "dpo_kernels", "dpo_kernels, padding-free")
GPU_SHAPES = [(4, 1024), (8, 2048)]  # (pairs, T) on CUDA
CPU_SHAPES = [(2, 512)]


def hh_lengths(pairs: int, T: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token lengths of `pairs` bundled HH pairs (characters / 4), each row cut to T
    tokens from the prompt's start: the first pair one whose longest row reaches T, the others drawn at random."""
    records = [json.loads(line) for line in HH_PAIRS.read_text().splitlines() if line.strip()]
    tokens = lambda text: max(1, math.ceil(len(text) / CHARS_PER_TOKEN))  # noqa: E731
    lengths = []
    for r in records:
        prompt, chosen, rejected = tokens(r["prompt"]), tokens(r["chosen"]), tokens(r["rejected"])
        chosen, rejected = min(chosen, T - 1), min(rejected, T - 1)
        lengths.append((min(prompt, T - max(chosen, rejected)), chosen, rejected))
    g = torch.Generator().manual_seed(seed)
    long = [x for x in lengths if x[0] + max(x[1:]) == T]
    first = long[int(torch.randint(len(long), (), generator=g))]
    rest = [lengths[int(i)] for i in torch.randint(len(lengths), (pairs - 1,), generator=g)]
    return [first, *rest]


def make_batch(pairs: int, T: int, V: int, device: str) -> dict[str, torch.Tensor]:
    """TRL's collator layout (chosen rows, then rejected rows, right-padded to the longest row)."""
    lengths = hh_lengths(pairs, T)
    g = torch.Generator().manual_seed(1)
    width = max(p + max(c, r) for p, c, r in lengths)
    input_ids = torch.zeros(2 * pairs, width, dtype=torch.long)
    attention_mask, completion_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (p, c, r) in enumerate(lengths):
        prompt = torch.randint(3, V, (p,), generator=g)  # shared by the pair's two rows
        for row, n in ((i, c), (pairs + i, r)):
            input_ids[row, : p + n] = torch.cat([prompt, torch.randint(3, V, (n,), generator=g)])
            attention_mask[row, : p + n] = 1
            completion_mask[row, p : p + n] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    return {k: v.to(device) for k, v in batch.items()}


def _tokenizer():
    """A tiny word-level tokenizer: TRL's constructor needs one (the batches are token ids already)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _trainer(provider: str, config_kwargs: dict, device: str, options: argparse.Namespace):
    from datasets import Dataset, disable_progress_bars
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import DPOConfig

    disable_progress_bars()
    config = Qwen2Config(**config_kwargs, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        policy = Qwen2ForCausalLM(config)
    ref = copy.deepcopy(policy)  # the policy moved a little, so that the loss is not log 2
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_train_step-"),
        per_device_train_batch_size=options.pairs,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        gradient_checkpointing=options.checkpointing,
        loss_type=options.loss_type,
        report_to=[],
        save_strategy="no",
        max_length=None,
        padding_free=provider.endswith("padding-free"),
    )
    if provider == "trl":
        from trl import DPOTrainer
    else:
        from dpo_kernels.integrations.trl import DPOTrainer
    pairs = Dataset.from_dict({"prompt": ["a b"], "chosen": [" a"], "rejected": [" b"]})
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=pairs, processing_class=_tokenizer())
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), read by training_step
    if args.gradient_checkpointing:  # Trainer.train() would turn it on; training_step alone does not
        enable = getattr(trainer.model, "activation_checkpointing_enable", None)  # transformers >= 5's name
        (enable or trainer.model.gradient_checkpointing_enable)(args.gradient_checkpointing_kwargs)
    return trainer


def worker(options: argparse.Namespace) -> dict:
    """One provider, one case, in this process: {"ms", "extra_mib", "loss"}."""
    device, config_kwargs = options.device, CASES[options.case]
    trainer = _trainer(options.worker, config_kwargs, device, options)
    batch = make_batch(options.pairs, options.T, config_kwargs["vocab_size"], device)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        return trainer.training_step(trainer.model, batch)

    loss = step().item()  # warm-up: extension build, Triton compilation, allocator
    times, extra = [], []
    for _ in range(options.reps):
        H._sync(device)
        start = time.perf_counter()
        extra.append(H.extra_peak_mib(step, device))
        H._sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "extra_mib": max(extra), "loss": loss}


def markdown(title: str, rows: list[H.Row]) -> str:
    """The case's table: step time, extra peak memory, |loss − TRL's loss|."""
    trl = next((r for r in rows if r.provider == "trl"), None)
    lines = [
        title,
        "",
        "| provider | step ms | vs TRL | extra peak MiB | vs TRL | abs(Δloss) vs TRL |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        time_ratio = f"{r.median_ms / trl.median_ms:.2f}×" if trl else "—"
        mem_ratio = f"{r.extra_mib / trl.extra_mib:.2f}×" if trl and trl.extra_mib > 0 else "—"
        lines.append(
            f"| {r.provider} | {r.median_ms:.0f} | {time_ratio} | {r.extra_mib:.0f} | {mem_ratio} | {r.max_err:.1e} |"
        )
    return "\n".join(lines)


def run_case(case: str, pairs: int, T: int, options: argparse.Namespace) -> tuple[str, list[H.Row], dict]:
    """Every provider in its own process; the table rows and the batch's figures."""
    V = CASES[case]["vocab_size"]
    batch = make_batch(pairs, T, V, "cpu")
    real = int(batch["attention_mask"].sum())
    padded = batch["input_ids"].numel()
    figures = {"tokens": real, "padded": padded, "padding": 1 - real / padded, "width": batch["input_ids"].shape[1]}
    results = {}
    for provider in PROVIDERS:
        command = [sys.executable, "-m", "bench.bench_train_step", "--worker", provider, "--case", case]
        command += ["--device", options.device, "--pairs", str(pairs), "--T", str(T), "--reps", str(options.reps)]
        command += ["--loss-type", *options.loss_type] + ([] if options.checkpointing else ["--no-checkpointing"])
        proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            print(f"  {provider}: failed\n{proc.stderr[-2000:]}")
            continue
        results[provider] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[provider]
        print(f"  {case} {provider:28s} {r['ms']:10.0f} ms  {r['extra_mib']:8.0f} MiB  loss {r['loss']:.6f}")
    trl_loss = results.get("trl", {}).get("loss")
    rows = [
        H.Row(
            provider,
            r["ms"],
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            r["extra_mib"],
            abs(r["loss"] - trl_loss) if trl_loss is not None else math.nan,
            note="TRL's padded step" if provider == "trl" else "",
        )
        for provider, r in results.items()
    ]
    n_layers = CASES[case]["num_hidden_layers"]
    title = (
        f"{case} ({n_layers} layers, V = {V})  {pairs} pairs, rows of up to {T} tokens (batch width "
        f"{figures['width']}): {real} real tokens of {padded}, padding {figures['padding']:.0%}"
    )
    return title, rows, figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=["qwen2-0.5b", "head-heavy"])
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--T", type=int)
    parser.add_argument("--reps", type=int, help="timed steps after the warm-up (default: 1 on the CPU, 5 on CUDA)")
    parser.add_argument("--loss-type", nargs="+", default=["sigmoid"])
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--save", action="store_true", help="write bench/results/<date>-<card>-bench_train_step.*")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.reps = options.reps or (1 if options.device == "cpu" else 5)

    if options.worker:
        options.case = options.case[0]
        print(json.dumps(worker(options)))
        return
    shapes = CPU_SHAPES if options.device == "cpu" else GPU_SHAPES
    if options.pairs or options.T:
        shapes = [(options.pairs or shapes[0][0], options.T or shapes[0][1])]
    env = H.environment(options.device)
    print(env.header())
    tables = []
    for case in options.case:
        for pairs, T in shapes:
            title, rows, figures = run_case(case, pairs, T, options)
            ms = {row.provider: row.median_ms for row in rows}
            if "dpo_kernels" in ms and "dpo_kernels, padding-free" in ms:
                saved = 1 - ms["dpo_kernels, padding-free"] / ms["dpo_kernels"]
                title += f"; padding-free saves {saved:.0%} of our padded step"
            print("\n" + markdown(title, rows))
            case_fields = {"case": case, "pairs": pairs, "T": T, **figures, "loss_type": "+".join(options.loss_type)}
            tables.append((title, case_fields, rows))
    if options.save:
        for path in H.save("bench_train_step", env, tables):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
