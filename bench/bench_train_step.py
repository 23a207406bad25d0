"""What does dpo_kernels change in a whole TRL DPO training step: time and peak memory, TRL alone vs TRL + dpo_kernels?

    python -m bench.bench_train_step [--device cuda|cpu] [--tiny] [--pairs 4 --T 1024] [--loss-type sigmoid]
                                     [--no-checkpointing] [--save]

The model is a Qwen2-0.5B-shaped Qwen2ForCausalLM built from its config with random weights (V = 151936, tied
embeddings; nothing is downloaded), fp32 weights under bf16 autocast on CUDA, as TRL's DPOTrainer runs it by default
(gradient checkpointing on), with a separate reference (the policy plus 1e-2 noise). One step is
`trainer.training_step`: the reference forward, the policy forward and backward (the optimizer step is the same for
both and left out). The batch is synthetic: B pairs of rows of T tokens, half prompt, completions of random lengths
in [T/4, T/2].

Providers: "trl" is trl.DPOTrainer (its chunked fused LM head, never the full logits); "trl + dpo_kernels" is
dpo_kernels.integrations.trl.DPOTrainer (the model's logits from the first completion column on, then
dpo_loss_from_logits, the logits' gradient written in place), and the same without the in-place gradient. The floor
is 6 · parameters · tokens FLOPs at the bf16 matmul rate measured in the same run (fwd + bwd, no recompute), so
"× floor" is 1 / MFU; the GB/s column holds TFLOP/s. "extra MiB" is the peak above the models and the batch; "max
err" is |loss − TRL's loss| on the same batch. `--tiny` (a 2-layer model, V = 1000, on the CPU) is a smoke check.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import tempfile

import torch

from bench import _harness as H

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SHAPES = [  # (pairs, tokens per row)
    (4, 1024),  # a common DPO micro-batch: 8 rows of 1k tokens
    (8, 2048),  # longer rows: 32k tokens per step, where the head's memory matters
]
TINY_SHAPES = [(2, 64)]

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
TINY = dict(
    QWEN2_05B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)


def _model(config_kwargs: dict, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**config_kwargs, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(config)


def _tokenizer():
    """A tiny word-level tokenizer: TRL's constructor needs one (the batches below are token ids already)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _batch(pairs: int, T: int, V: int, device: str) -> dict[str, torch.Tensor]:
    """TRL's layout: chosen rows then rejected rows, right-padded; half of each row is the shared prompt."""
    g = torch.Generator().manual_seed(1)
    prompt = T // 2
    lengths = torch.randint(T // 4, T // 2 + 1, (2 * pairs,), generator=g)
    input_ids = torch.randint(3, V, (2 * pairs, T), generator=g)
    input_ids[pairs:, :prompt] = input_ids[:pairs, :prompt]
    cols = torch.arange(T)
    attention_mask = (cols < prompt + lengths[:, None]).long()
    completion_mask = attention_mask * (cols >= prompt).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    return {k: v.to(device) for k, v in batch.items()}


def _providers() -> dict[str, tuple[type, dict] | str]:
    """name → (trainer class, extra constructor kwargs), or a string: why the provider is skipped."""
    try:
        from trl import DPOTrainer as TRLTrainer

        from dpo_kernels.integrations.trl import DPOTrainer
    except ImportError as e:
        return {"trl": f"trl not importable: {e}"}
    return {
        "trl": (TRLTrainer, {}),
        "trl + dpo_kernels": (DPOTrainer, {}),
        "trl + dpo_kernels, no inplace": (DPOTrainer, {"inplace_grad": False}),
    }


def _trainer(cls, extra: dict, policy, ref, args) -> object:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    pairs = Dataset.from_dict({"prompt": ["a b"], "chosen": [" a"], "rejected": [" b"]})
    trainer = cls(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=pairs,
        processing_class=_tokenizer(),
        **extra,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), read by training_step
    if args.gradient_checkpointing:  # Trainer.train() would turn it on; training_step alone does not
        enable = getattr(trainer.model, "activation_checkpointing_enable", None)  # transformers >= 5's name
        (enable or trainer.model.gradient_checkpointing_enable)(args.gradient_checkpointing_kwargs)
    return trainer


def run_case(pairs: int, T: int, config_kwargs: dict, device: str, rate: float, options: argparse.Namespace):
    from trl import DPOConfig

    policy = _model(config_kwargs, device)
    ref = copy.deepcopy(policy)  # the policy moved a little, so that the loss is not log 2 on both sides
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    n_params = sum(p.numel() for p in policy.parameters())
    batch = _batch(pairs, T, config_kwargs["vocab_size"], device)
    tokens = int(batch["attention_mask"].sum())
    flops = 6 * n_params * tokens
    floor_ms = flops / rate * 1e3
    rows = [H.Row("floor", floor_ms, floor_ms, floor_ms, rate / 1e12, 1.0, 0.0, math.nan, "6·params·tokens")]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_train_step-"),
        per_device_train_batch_size=pairs,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        gradient_checkpointing=options.checkpointing,
        loss_type=options.loss_type,
        report_to=[],
        save_strategy="no",
        max_length=None,
    )
    trl_loss = None
    for name, provider in _providers().items():
        if isinstance(provider, str):
            print(f"  skip {name}: {provider}")
            continue
        trainer = _trainer(*provider, policy, ref, args)
        params = [p for p in trainer.model.parameters() if p.requires_grad]

        def call(trainer=trainer):
            return trainer.training_step(trainer.model, batch)

        try:
            loss = call().item()  # first call: extension build, Triton compilation, allocator warm-up
            H._sync(device)
            for p in params:
                p.grad = None
            extra = H.extra_peak_mib(call, device)
            med, p20, p80 = H.time_ms(call, device, grad_to_none=params, rep_ms=2000 if device == "cuda" else 200)
        except Exception as e:  # OOM included: say so, keep going
            print(f"  skip {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        finally:
            del trainer, params
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        trl_loss = loss if name == "trl" else trl_loss
        err = abs(loss - trl_loss) if trl_loss is not None else math.nan
        print(f"  {name:32s} {med:9.1f} ms  {extra:9.0f} MiB  loss {loss:.6f}")
        rows.append(H.Row(name, med, p20, p80, flops / (med * 1e-3) / 1e12, med / floor_ms, extra, err))
    V = config_kwargs["vocab_size"]
    title = (
        f"DPO train step  {'bf16 autocast' if device == 'cuda' else 'fp32'}  {n_params / 1e6:.1f}M params  "
        f"B={pairs} pairs  T={T}  V={V}  {tokens} tokens  loss {'+'.join(options.loss_type)}  "
        f"checkpointing {'on' if options.checkpointing else 'off'}  (TFLOP/s in the GB/s column)"
    )
    case = {"pairs": pairs, "T": T, "V": V, "params": n_params, "loss_type": "+".join(options.loss_type)}
    return title, case, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model with V = 1000: a smoke check")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--T", type=int)
    parser.add_argument("--loss-type", nargs="+", default=["sigmoid"])
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--save", action="store_true", help="write bench/results/<date>-<card>-bench_train_step.*")
    args = parser.parse_args(argv)

    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.pairs or args.T:
        shapes = [(args.pairs or shapes[0][0], args.T or shapes[0][1])]
    env = H.environment(args.device)
    rate = H.matmul_rate(args.device)
    print(f"{env.header()}  matmul {rate / 1e12:.1f} TFLOP/s")
    config_kwargs = TINY if args.tiny else QWEN2_05B
    tables = [run_case(*shape, config_kwargs, args.device, rate, args) for shape in shapes]
    for title, _, rows in tables:
        print()
        print(H.format_table(title, env, rows))
    if args.save:
        for path in H.save("bench_train_step" + ("_tiny" if args.tiny else ""), env, tables):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
