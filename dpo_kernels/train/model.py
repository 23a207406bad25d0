"""The policy and its tokenizer: a local causal-LM checkpoint, or `tiny`, a small Llama built from a
config, with a byte-level BPE trained on the bundled HH-RLHF train split (and cached)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from dpo_kernels.train.data import BUNDLED_TRAIN

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
TINY_VOCAB = 2048
# The `tiny` model: 0.66M parameters (half of them the tied embedding).
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def load_tokenizer(name: str, cache_dir: str | Path):
    """The tokenizer of checkpoint `name` (for `tiny`: the cached HH BPE); pads with EOS when it has
    no pad token."""
    if name == "tiny":
        path = _tiny_bpe(Path(cache_dir).expanduser())
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, pad_token=EOS)
    else:
        tokenizer = AutoTokenizer.from_pretrained(_checkpoint(name))
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {name!r} has no EOS token (appended to completions)")
    if tokenizer.pad_token is None:
        log.info("the tokenizer has no pad token: padding with EOS (%r)", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _checkpoint(name: str) -> str:
    """A local checkpoint folder, or the snapshot folder of Hub id `name` in the local Hugging Face cache (resolved
    by transformers, offline under HF_HUB_OFFLINE=1)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    from transformers.utils import cached_file

    try:
        config = cached_file(name, "config.json")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"--model {name!r}: not 'tiny', not a local checkpoint folder, and not a Hub id in the local Hugging "
            f"Face cache ({str(err).splitlines()[0]})"
        ) from None
    return str(Path(config).parent)


def load_model(name: str, tokenizer, max_length: int, attn_implementation: str | None = None):
    """A causal LM in fp32: the optimizer's master weights (autocast gives bf16 compute on GPUs).
    `attn_implementation` None is transformers' default (sdpa)."""
    if name != "tiny":
        options = dict(dtype=torch.float32, attn_implementation=attn_implementation)
        return AutoModelForCausalLM.from_pretrained(_checkpoint(name), **options)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_length,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    config._attn_implementation = attn_implementation or "sdpa"
    return LlamaForCausalLM(config)


def check_packing(model) -> None:
    """Raises ValueError unless the model restarts attention where position_ids go back to 0, which
    `--padding-free` relies on: two sequences packed in one row must give their logits alone."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(vocab, (1, n), generator=generator).to(device) for n in (5, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    was_training = model.training
    model.eval()
    bf16 = device.type == "cuda"  # flash-attn needs half precision
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        alone = torch.cat([model(a).logits, model(b).logits], dim=1).float()
        packed = model(torch.cat([a, b], dim=1), position_ids=positions, use_cache=False).logits
    model.train(was_training)
    # mixed sequences differ by about the logits' own spread; rounding, by far less than 5% of it
    if not (packed.float() - alone).abs().max() <= 0.05 * alone.std():
        impl = model.config._attn_implementation
        raise ValueError(
            f"--padding-free: {type(model).__name__} (attn_implementation={impl!r}) does not "
            "separate packed sequences at position_ids resets; install flash-attn or drop it"
        )


class Backbone(torch.nn.Module):
    """A causal LM without its output layer, for `--head fused`: forward gives the last hidden states
    ([rows, T, H]). A module of its own so that DDP can wrap it; the LM stays a submodule, so the
    output layer's gradient is all-reduced too. `head()`: the output layer and logit transform, as
    `dk.dpo_loss_from_hidden` / `dk.linear_token_logps` take them."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.transform = fused_head_transform(lm)

    def forward(self, **inputs) -> torch.Tensor:
        return self.lm.base_model(**inputs).last_hidden_state

    def head(self) -> dict:
        layer = self.lm.get_output_embeddings()
        return {"weight": layer.weight, "bias": layer.bias, **self.transform}


def fused_head_transform(model) -> dict:
    """The final-logit softcap and scale of `model`, from its config (Gemma's final_logit_softcapping,
    Cohere's logit_scale, Granite's logits_scaling), checked on a short input: raises ValueError
    unless its logits are transform(last_hidden_state @ weightᵀ + bias)."""
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
    layer, base = model.get_output_embeddings(), model.base_model
    name = type(model).__name__
    if layer is None or base is model:
        raise ValueError(f"--head fused: {name} has no separate output layer / base model; use --head logits")
    ids = torch.randint(layer.weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(layer.weight.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.double()
        hidden = base(ids, use_cache=False).last_hidden_state.double()
        y = torch.nn.functional.linear(
            hidden, layer.weight.double(), None if layer.bias is None else layer.bias.double()
        )
        y = y * scale if softcap is None else softcap * torch.tanh(y * scale / softcap)
    model.train(was_training)
    if not torch.allclose(y, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
        raise ValueError(
            f"--head fused: {name}'s logits are not softcap/scale(hidden @ weight + bias) (a logit transform "
            "dpo_kernels cannot reproduce); use --head logits"
        )
    return {"softcap": softcap, "logit_scale": scale}


def _tiny_bpe(cache_dir: Path) -> Path:
    """The json file of a byte-level BPE with TINY_VOCAB tokens, trained on the bundled train split
    unless cached."""
    path = cache_dir / f"hh-harmless-bpe-{TINY_VOCAB}.json"
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    log.info("training the tiny model's BPE tokenizer (once) -> %s", path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(BUNDLED_TRAIN) as f:
        rows = [json.loads(line) for line in f]
    texts = (row["prompt"] + row[key] for row in rows for key in ("chosen", "rejected"))
    tokenizer.train_from_iterator(texts, trainer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: ranks may race
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def tensor_parallel(lm, mesh) -> None:
    """`--tp`: the output layer sharded over the vocabulary with torch's tensor-parallel API (ColwiseParallel, its
    logits a DTensor sharded on the last dim); a tied input embedding sharded alike (RowwiseParallel) and kept the same
    parameter. The rest of the model stays replicated: every rank runs it on the same batch, and the grad_hidden the
    sharded loss all-reduces makes its gradients the same on every rank."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied = head.weight is embed.weight
    parallelize_module(head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    if tied:
        parallelize_module(embed, mesh, RowwiseParallel(input_layouts=Replicate()))
        embed.weight = head.weight  # both Shard(0) of [V, H]: one parameter again


def fully_shard_model(model, lm, mesh) -> None:
    """`--fsdp`: FSDP2's fully_shard of each decoder layer, then of `model` (the LM, or its Backbone for the fused
    head: the module whose forward the loop calls, so that the root's parameters, the output layer among them, are
    gathered for it and stay so until the backward)."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(lm.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"--fsdp: {type(lm).__name__} has no base_model.layers to shard one by one")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state_dict(module) -> dict:
    """The module's state dict with every DTensor gathered whole (a collective: every rank calls it); tied weights
    stay one tensor."""
    from torch.distributed.tensor import DTensor

    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():  # the parameters themselves: tied ones are one
        if id(value) not in gathered:
            gathered[id(value)] = (value.full_tensor() if isinstance(value, DTensor) else value).detach()
        out[name] = gathered[id(value)]
    return out
