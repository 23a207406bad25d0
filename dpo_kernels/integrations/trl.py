"""TRL's `DPOTrainer` with dpo_kernels computing the log-probs and the loss: same options, same numbers, no logits.

    from dpo_kernels.integrations.trl import DPOTrainer      # instead of `from trl import DPOTrainer`
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(...), train_dataset=..., ...)

or, for a trainer that already exists, `patch_trainer(trainer)`.

Where it plugs in. The (unwrapped) model gets a forward that, when called with `dpo_kernels_head=fn`, runs the
backbone only and hands its last hidden states, the output layer's weight and bias (an FSDP2 DTensor gathered once
per call with `full_tensor()`) and the model's logit transform to `fn` inside the forward, as TRL 1.16's own fused
LM head does (`trl.trainer.utils.add_fused_lm_head`); without the keyword it is the forward it replaced. The model is
called through whatever wraps it (DDP, FSDP, accelerate), so hooks, autocast and gradient reduction are TRL's.
`compute_loss` keeps only the rows that score a completion token (compact rows, one per scored token, sequences
delimited by `cu_seqlens`) and passes them to `dpo_kernels.dpo_loss_from_hidden`; the reference runs first, under
`no_grad`, through `dpo_kernels.linear_token_logps` and `sequence_logps`, giving [2B] log-probs. No tensor of
[tokens, V] is ever built, for the policy or the reference: the head works through the vocabulary tile by tile.
`compute_ref_log_probs` (used by `precompute_ref_log_probs`) goes through the same path. The logit transform is the
one TRL's fused head reads from the config: `final_logit_softcapping`, and `logit_scale` / `output_multiplier` /
`lm_head_multiplier` / `logits_scaling`, temperature 1; tied embeddings are the same Parameter, so their gradient
adds up as in the model.

PEFT: a `peft_config` or a PeftModel trains as in TRL; with `ref_model=None` the reference is the model with its
adapters disabled (or TRL's frozen "ref" adapter copy for a PeftModel passed with an adapter), through TRL's own
`use_adapter`. `modules_to_save=["lm_head"]` works (the head reads the active copy's weight); an adapter on the
output layer itself (LoRA on `lm_head`) is refused, as TRL refuses it: the fused head reads `lm_head.weight`.

Padding-free (`padding_free=True`, which TRL 1.16 ignores for DPO): the collator's padded rows (chosen first, then
rejected) are packed into one row of their real tokens with `position_ids` restarting at 0 for each sequence and no
attention mask. The scored positions are those of the padded batch (labels shifted within each sequence, never across
two), so the per-sequence log-probs, lengths (ipo, sigmoid_norm), LD-DPO and WPO weights, loss, metrics and
gradients are those of the padded run. Accepted only on models whose attention restarts where position_ids go back
to 0 (flash-attention varlen; transformers' sdpa and eager do so when no attention mask and no cache are given):
each model is checked on a short packed input before its first packed step (at construction when it can be), and
refused with a ValueError otherwise.

Every DPOConfig option that touches the loss is honoured: `loss_type` (a list) and `loss_weights`, `beta`,
`label_smoothing`, `discopop_tau`, `f_divergence_type`, `f_alpha_divergence_coef`, `ld_alpha`, `use_weighting`,
`precompute_ref_log_probs`, `sync_ref_model`, and the MoE `router_aux_loss_coef`. The logged metrics are TRL's keys,
per micro-batch, gathered across processes as TRL gathers them. Two places differ from TRL 1.16 on purpose, where
TRL fails: `use_weighting` with `hinge` or `sft` works (TRL raises in an in-place multiply), and `discopop` stays
finite for β·Δ < −88.7 (TRL returns NaN).

Refused with a ValueError (never a silent difference): vision-language models and datasets, prompt-learning PEFT
(virtual tokens), an adapter on the output layer, DeepSpeed ZeRO-3 (the head's backward would read the partitioned
weight; FSDP2 works), tensor/context/sequence parallelism, `padding_free=True` on a model whose attention does not
restart at position resets, and the loss options for which TRL 1.16 returns inf/NaN or divides by zero
(`beta <= 0`, `discopop_tau <= 0`, `robust` with ε outside [0, 0.5), `exo_pair` with ε >= 1, `ld_alpha` outside
[0, 1]; see `dpo_kernels.losses.loss_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

try:
    import trl
    from trl import DPOTrainer as _TRLDPOTrainer
except ImportError as e:
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL >= 1.16 and could not import it: pip install dpo-kernels[trl]"
    ) from e

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from packaging.version import Version
from transformers import ProcessorMixin
from transformers.utils import ModelOutput
from trl.models.utils import disable_gradient_checkpointing

import dpo_kernels as dk
from dpo_kernels import checks, dispatch
from dpo_kernels import losses as L

if Version(trl.__version__) < Version("1.16.0"):
    raise ImportError(
        f"dpo_kernels.integrations.trl needs TRL >= 1.16, found {trl.__version__}: pip install -U dpo-kernels[trl]"
    )
if Version(trl.__version__).release[:2] != (1, 16):
    warnings.warn(
        f"dpo_kernels.integrations.trl reproduces TRL 1.16's DPO math; TRL {trl.__version__} may differ",
        stacklevel=2,
    )

__all__ = ["DPOTrainer", "logit_transform", "patch_trainer"]

IGNORE_INDEX = -100
# Batch keys that are not model inputs (as in TRL's DPOTrainer).
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
_HEAD_ADAPTER = (
    "a PEFT adapter on the output layer (e.g. LoRA with 'lm_head' in target_modules)",
    "the fused head reads lm_head.weight directly, so the adapter would be ignored; remove the output layer from "
    "target_modules (modules_to_save=['lm_head'] works), as TRL requires too",
)


def _refuse(what: str, fix: str) -> ValueError:
    return ValueError(f"dpo_kernels.integrations.trl.DPOTrainer does not support {what}; {fix}")


# ----------------------------------------------------------------------------------------------------------------
# What cannot be honoured exactly: refused before any work


def _check_args(args) -> None:
    """The DPOConfig options that dpo_kernels cannot honour exactly (raise before TRL starts any work)."""
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None:
        sizes = {name: getattr(parallelism, name, None) or 1 for name in ("tp_size", "cp_size", "sp_size")}
        if any(size > 1 for size in sizes.values()):
            raise _refuse(
                f"tensor, context or sequence parallelism ({sizes})",
                "the per-sequence sums need whole sequences and the whole vocabulary on each rank; use data "
                "parallelism (DDP, FSDP, DeepSpeed ZeRO-1/2)",
            )
    deepspeed = getattr(args, "deepspeed_plugin", None)
    if deepspeed is not None and getattr(deepspeed, "zero_stage", None) == 3:
        raise _refuse(
            "DeepSpeed ZeRO-3",
            "the fused head's backward reads lm_head.weight after ZeRO-3 has partitioned it again; use FSDP2 "
            "(the head is gathered once per step) or ZeRO-1/2",
        )
    try:
        L.loss_config(**L.loss_options(args), use_weighting=args.use_weighting)
        checks.check_ld_alpha(args.ld_alpha)
    except ValueError as e:
        raise ValueError(f"dpo_kernels.integrations.trl.DPOTrainer: invalid DPOConfig loss options: {e}") from e


def _is_tuner_layer(module) -> bool:
    """Whether `module` is a PEFT adapter layer (LoRA & co.), which computes more than `weight`'s projection."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def _targets_output_layer(model, peft_config) -> bool:
    """Whether `peft_config` would put an adapter on `model`'s output layer (as PEFT matches module names)."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if not isinstance(peft_config, PeftConfig) or not hasattr(peft_config, "target_modules"):
        return False  # not a PeftConfig: TRL's TypeError says what it must be; prompt learning: refused later
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if module is head]
    return any(check_target_module_exists(peft_config, name) for name in names)


def _check_inputs(model, processing_class, train_dataset, peft_config) -> None:
    """Vision inputs and an adapter on the output layer, as far as they can be seen before TRL loads anything."""
    if isinstance(processing_class, ProcessorMixin):
        raise _refuse("vision-language models (a ProcessorMixin processing_class)", "use trl.DPOTrainer")
    if train_dataset is not None:
        sample = next(iter(train_dataset))
        if "image" in sample or "images" in sample:
            raise _refuse("vision datasets (an 'image' or 'images' column)", "use trl.DPOTrainer")
    if peft_config is not None and isinstance(model, torch.nn.Module) and _targets_output_layer(model, peft_config):
        raise _refuse(*_HEAD_ADAPTER)


def _check_trainer(trainer) -> None:
    """What only a constructed trainer shows (a model loaded from a name, the PEFT model, the processor TRL
    picked)."""
    if trainer._is_vlm or trainer._is_vision_dataset:
        raise _refuse("vision-language models or datasets", "use trl.DPOTrainer")
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        raise _refuse(
            "prompt-learning PEFT (prefix / prompt tuning: virtual tokens in the hidden states)",
            "use LoRA-style adapters, or trl.DPOTrainer",
        )
    if _is_tuner_layer(_inner_model(model).get_output_embeddings()):
        raise _refuse(*_HEAD_ADAPTER)


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in dispatch.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(dispatch.BACKENDS)} (or None: automatic)")


def _head_options(keep_logits: bool) -> dict:
    """The fused head's keywords for the trainer's keep_logits choice (never keep by default: no logits, as TRL)."""
    if not isinstance(keep_logits, bool):
        raise ValueError(f"keep_logits must be True or False, got {keep_logits!r}")
    return {"keep_logits": keep_logits}


# ----------------------------------------------------------------------------------------------------------------
# The model's side: a forward that stops at the last hidden states and hands them to a head function


def logit_transform(config) -> dict[str, float | None]:
    """The model family's final-logit transform as TRL 1.16's fused head reads it from `config` (its text config):
    `softcap` from `final_logit_softcapping` (Gemma 2), `logit_scale` from `logit_scale` (Cohere),
    `output_multiplier`, `lm_head_multiplier` (Falcon-H1) or 1 / `logits_scaling` (Granite, MiniCPM3; HyperCLOVA X
    multiplies by it). Keywords of `dpo_kernels.linear_token_logps`."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None) if scale is None else scale
    scaling = getattr(text, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if text.model_type == "hyperclovax" else 1 / scaling
    return {"softcap": getattr(text, "final_logit_softcapping", None), "logit_scale": 1.0 if scale is None else scale}


def _full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2-sharded DTensor → the whole tensor (one all-gather; its backward reduce-scatters the gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclasses.dataclass
class HeadOutput(ModelOutput):
    """What the patched forward returns with `dpo_kernels_head=fn`: fn's result, and the MoE load-balancing loss
    when the call asked for router logits."""

    result: Any = None
    aux_loss: torch.Tensor | None = None


def _aux_loss(model, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The MoE load-balancing loss, as TRL 1.16's fused head computes it (Mixtral's, over the real tokens)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text = model.config.get_text_config()
    num_experts = getattr(text, "num_experts", None) or getattr(model, "num_experts", None)
    return load_balancing_loss_func(router_logits, num_experts, text.num_experts_per_tok, attention_mask)


def _head_forward(self, *args, dpo_kernels_head: Callable | None = None, **kwargs):
    """The forward `_install_head_forward` gives a causal LM: the one it replaced without `dpo_kernels_head`; with
    it, the backbone only, then dpo_kernels_head(hidden [rows, T, H], weight, bias, transform) inside the forward
    (where FSDP has the parameters unsharded), returned as `HeadOutput`."""
    if dpo_kernels_head is None:
        return self._dk_replaced_forward(*args, **kwargs)
    kwargs["use_cache"] = False
    outputs = self.base_model(*args, **kwargs)
    layer = self.get_output_embeddings()
    if _is_tuner_layer(layer):  # also when an adapter was added after the trainer was built
        raise _refuse(*_HEAD_ADAPTER)
    weight, bias = _full_tensor(layer.weight), _full_tensor(layer.bias)  # once per call, not per tile
    hidden = outputs.last_hidden_state.to(weight.device)  # a model split over devices ends on another one
    result = dpo_kernels_head(hidden, weight, bias, logit_transform(self.config))
    aux = None
    if kwargs.get("output_router_logits"):
        aux = _aux_loss(self, outputs.router_logits, kwargs.get("attention_mask"))
    return HeadOutput(result=result, aux_loss=aux)


def _install_head_forward(model) -> None:
    """Gives `model` (a transformers causal LM, not a wrapper) the `dpo_kernels_head=` forward, once. The replaced
    forward (the model's own, or TRL's fused one) is kept on the instance, so that a deep copy calls its own."""
    if getattr(model, "_dk_replaced_forward", None) is not None:
        return
    model._dk_replaced_forward = model.forward
    model.forward = types.MethodType(functools.wraps(type(model).forward)(_head_forward), model)


def _inner_model(model):
    """The transformers model of a PeftModel (the one TRL gives its fused head), or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def _check_packing_once(model) -> None:
    """`check_packing`, once per model instance (a flag on the model)."""
    if not getattr(model, "_dk_packing_checked", False):
        check_packing(model)
        model._dk_packing_checked = True


def check_packing(model) -> None:
    """Raises ValueError unless `model`'s attention restarts where position_ids go back to 0: two sequences packed
    in one row must give the hidden states they give alone (what padding-free DPO relies on)."""
    backbone = model.base_model
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(vocab, (1, n), generator=generator).to(device) for n in (5, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    was_training = model.training
    model.eval()
    half = device.type == "cuda"  # flash-attention needs half precision
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            alone = torch.cat([backbone(input_ids=x, use_cache=False).last_hidden_state for x in (a, b)], 1)
            packed = backbone(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False)
    finally:
        model.train(was_training)
    alone, packed = alone.float(), packed.last_hidden_state.float()
    error = (packed - alone).abs().max().item()
    # mixed sequences differ by about the hidden states' own spread; rounding, by far less than 5% of it
    if not error <= 0.05 * alone.std().item():
        impl = model.config._attn_implementation
        raise _refuse(
            f"padding_free=True with {type(model).__name__} (attn_implementation={impl!r}): its attention does not "
            f"restart where position_ids go back to 0 (packed vs alone: max |Δ hidden| = {error:.3g})",
            "load it with attn_implementation='flash_attention_2' (or transformers' 'sdpa' / 'eager', which detect "
            "packed position_ids), or set padding_free=False",
        )


# ----------------------------------------------------------------------------------------------------------------
# The batch's side: which hidden rows score which token, padded or packed


class _Batch(NamedTuple):
    """One TRL batch as the head sees it. `model_kwargs`: the model inputs (padded rows, or one packed row);
    `select`: bool, the hidden positions that score a completion token (shaped like the hidden states but H);
    `labels`, `scored`: [M] the tokens they score (M scored tokens, sequence by sequence) and an all-True mask;
    `cu_seqlens`: [2B+1] the sequences' offsets in those M rows; `counts`: [2B] scored tokens per sequence;
    `lengths`: [2B] TRL's completion lengths (the unshifted completion mask: ipo and sigmoid_norm divide by them)."""

    model_kwargs: dict
    select: torch.Tensor
    labels: torch.Tensor
    scored: torch.Tensor
    cu_seqlens: torch.Tensor
    counts: torch.Tensor
    lengths: torch.Tensor


def _pack(model_kwargs: dict, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The padded rows' real tokens as one row [1, N], position_ids restarting at 0 for each row and no attention
    mask; also the [R, T] → [N] selection. Each row's real tokens must be one run, holding its completion."""
    real = attention_mask.bool()
    runs = real[:, :1].sum(1) + (real[:, 1:] & ~real[:, :-1]).sum(1)
    if bool((runs > 1).any() | (completion_mask.bool() & ~real).any()):
        raise ValueError(
            "padding_free=True needs each row's attention_mask to be one run of real tokens (left or right padding) "
            "that holds its completion_mask; got a row with gaps, or completion tokens outside it"
        )
    shape = attention_mask.shape
    packed = {
        k: v[real][None] if isinstance(v, torch.Tensor) and v.shape == shape else v for k, v in model_kwargs.items()
    }
    del packed["attention_mask"]
    packed["position_ids"] = (real.cumsum(1) - 1)[real][None]
    return packed, real


def _batch(inputs: dict, padding_free: bool) -> _Batch:
    """The compact rows of a TRL batch (chosen rows, then rejected, right-padded by TRL's collator): position t
    scores input_ids[t + 1] where that is a completion token, so labels never cross from one sequence to the next."""
    input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    target = completion_mask[:, 1:].bool()
    select = F.pad(target, (0, 1), value=False)
    labels = input_ids[:, 1:][target]
    counts = target.sum(1)
    cu_seqlens = F.pad(counts.cumsum(0), (1, 0))
    if padding_free:
        model_kwargs, real = _pack(model_kwargs, inputs["attention_mask"], completion_mask)
        select = select[real][None]
    scored = torch.ones_like(labels, dtype=torch.bool)
    return _Batch(model_kwargs, select, labels, scored, cu_seqlens, counts, completion_mask.sum(1))


# ----------------------------------------------------------------------------------------------------------------
# The trainer's side


class _KernelLoss:
    """The methods that replace TRL's log-prob and loss computation; mixed in before TRL's DPOTrainer."""

    _dk_backend: str | None = None
    _dk_head: dict = {}  # the fused head's options (keep_logits)
    _dk_padding_free: bool = False  # pack the batches (args.padding_free, which TRL 1.16 turns off in its own copy)

    def _dk_model(self, model):
        """The transformers model inside `model` (wrappers, PEFT), given the head forward and, for padding-free,
        checked for packing before its first packed call."""
        inner = _inner_model(self.accelerator.unwrap_model(model))
        _install_head_forward(inner)
        if self._dk_padding_free:
            _check_packing_once(inner)
        return inner

    def _dk_prepare_models(self) -> None:
        """Install the head forward and check packing now (fail at construction, not at the first step)."""
        for model in (self.model, self.ref_model):
            if model is not None:
                self._dk_model(model)

    def _dk_call(self, model, batch: _Batch, head: Callable, **extra) -> HeadOutput:
        self._dk_model(model)
        return model(**batch.model_kwargs, **extra, dpo_kernels_head=head)

    # -- the reference

    def _dk_sequence_head(self, batch: _Batch, hidden, weight, bias, transform) -> torch.Tensor:
        """Per-sequence (LD-weighted) log-probs [2B] of the compact rows (float64 sums)."""
        token_logps = dk.linear_token_logps(
            hidden[batch.select], weight, batch.labels, bias=bias, backend=self._dk_backend, **transform
        )  # no gradient: nothing to keep
        return dk.sequence_logps(
            token_logps, batch.scored, cu_seqlens=batch.cu_seqlens, ld_alpha=self.ld_alpha, backend=self._dk_backend
        ).logps

    def _dk_reference(self, model, batch: _Batch, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs [B], [B] without gradient: `model` itself, or, for a PEFT policy without ref_model,
        the policy with its adapters disabled (or TRL's "ref" adapter), as TRL does it."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
            self.accelerator.autocast() if autocast else contextlib.nullcontext(),
        ):
            logps = self._dk_call(model, batch, functools.partial(self._dk_sequence_head, batch)).result
        return logps.chunk(2)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs [B], [B] of one batch (for `precompute_ref_log_probs`)."""
        return self._dk_reference(model, _batch(inputs, self._dk_padding_free), autocast=True)

    # -- the policy and the loss

    def _dk_policy_head(self, batch: _Batch, ref_chosen, ref_rejected, hidden, weight, bias, transform):
        """`DPOOutput` of the compact rows, with TRL's metrics."""
        hidden = hidden[batch.select]
        options = L.loss_options(self.args)
        common = dict(backend=self._dk_backend, **self._dk_head, **transform)
        # ipo and sigmoid_norm divide by TRL's completion lengths, counted on the unshifted completion mask: one more
        # than the scored tokens where a completion starts at column 0 (an empty prompt). Then the unfused path.
        normalised = L.LENGTH_NORMALISED_LOSSES.intersection(options["loss_type"])
        if not (normalised and bool((batch.lengths != batch.counts).any())):
            return dk.dpo_loss_from_hidden(
                hidden,
                weight,
                batch.labels,
                ref_chosen,
                ref_rejected,
                bias=bias,
                cu_seqlens=batch.cu_seqlens,
                ld_alpha=self.ld_alpha,
                use_weighting=self.use_weighting,
                return_stats=True,
                **common,
                **options,
            )
        token_logps, token_stats = dk.linear_token_logps(
            hidden, weight, batch.labels, bias=bias, return_stats=True, **common
        )
        seq = dk.sequence_logps(
            token_logps,
            batch.scored,
            cu_seqlens=batch.cu_seqlens,
            ld_alpha=self.ld_alpha,
            token_stats=token_stats,
            backend=self._dk_backend,
        )
        B = seq.logps.shape[0] // 2
        # float64 sequence sums give float64 outputs: the loss in the hidden states' precision, as
        # dpo_loss_from_hidden returns it
        return dk.dpo_loss(
            seq.logps[:B],
            seq.logps[B:],
            ref_chosen,
            ref_rejected,
            chosen_lengths=batch.lengths[:B],
            rejected_lengths=batch.lengths[B:],
            wpo_weights=dk.reference.wpo_weights(seq) if self.use_weighting else None,
            chosen_token_logp_sum=seq.raw_logps[:B],
            chosen_token_count=seq.n_tokens[:B],
            sequence_stats=seq.stats,
            backend=self._dk_backend,
            **options,
        ).to(torch.promote_types(hidden.dtype, torch.float32))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        batch = _batch(inputs, self._dk_padding_free)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif self.ref_model is None and not is_peft_model(self.model):
            raise ValueError("no reference model: pass ref_model, or set precompute_ref_log_probs=True")
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model
            ref_chosen, ref_rejected = self._dk_reference(ref_model, batch, autocast=False)
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        head = functools.partial(self._dk_policy_head, batch, ref_chosen, ref_rejected)
        outputs = self._dk_call(model, batch, head, **extra)
        out = outputs.result
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._dk_log_metrics(mode, inputs, batch, out)
        if not return_outputs:
            return loss
        warnings.warn(
            "`return_outputs=True` (the logits for `compute_metrics`) is deprecated in TRL and costs an extra forward "
            "that builds the logits",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(**{k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}, use_cache=False)
        return loss, outputs

    def _dk_log_metrics(self, mode: str, inputs: dict, batch: _Batch, out: dk.DPOOutput) -> None:
        """TRL's metrics, in TRL's order: token-weighted ones from sums and counts gathered per process, per-pair
        ones as means over the gathered pairs."""
        metrics, gather = self._metrics[mode], self.accelerator
        B = batch.counts.shape[0] // 2
        n_chosen, n_rejected = batch.counts[:B].sum().float(), batch.counts[B:].sum().float()
        m = out.metrics
        sums = torch.stack(
            [
                m["entropy"] * (n_chosen + n_rejected),
                n_chosen + n_rejected,
                m["logits/chosen"] * n_chosen,
                n_chosen,
                m["logits/rejected"] * n_rejected,
                n_rejected,
                torch.round(m["mean_token_accuracy"] * n_chosen),
            ]
        )
        # One row per process, as TRL's gathers of 0-dim sums give (gather_for_metrics trims rows, not elements).
        entropy, n_all, logits_c, n_c, logits_r, n_r, correct = gather.gather_for_metrics(sums[None]).sum(0).tolist()
        ratio = lambda num, den: num / den if den > 0 else 0.0  # noqa: E731

        metrics["entropy"].append(ratio(entropy, n_all))
        if mode == "train":
            n_tokens = gather.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["logits/chosen"].append(ratio(logits_c, n_c))
        metrics["logits/rejected"].append(ratio(logits_r, n_r))
        metrics["mean_token_accuracy"].append(ratio(correct, n_c))

        rc, rr = out.chosen_rewards.float(), out.rejected_rewards.float()
        pc, pr = out.chosen_logps.detach().float(), out.rejected_logps.detach().float()
        pairs = torch.stack([rc, rr, (rc > rr).float(), rc - rr, pc, pr], dim=1)
        means = gather.gather(pairs).mean(0).tolist()
        for key, value in zip(
            (
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected",
            ),
            means,
        ):
            metrics[key].append(value)


class DPOTrainer(_KernelLoss, _TRLDPOTrainer):
    """TRL's DPOTrainer, with dpo_kernels computing the log-probs and the loss from the last hidden states (see the
    module docstring); `padding_free=True` packs each batch.

    Takes TRL's arguments, plus:
        backend: dpo_kernels backend, "triton", "cpu" or "reference" (default: automatic, as in `dpo_kernels`;
            "reference" is plain torch and builds the logits).
        keep_logits: keep the policy head's forward tiles for its backward (the compact logits, scored tokens × V
            in the matmul's dtype) instead of recomputing them: one GEMM fewer per step, at that memory. Default
            False: the logits never exist, and the extra memory stays at most TRL's.

    Example:
        >>> trainer = DPOTrainer(model, ref_model=ref, args=DPOConfig(loss_type=["sigmoid", "sft"]),
        ...                      train_dataset=pairs, processing_class=tokenizer)
        >>> trainer.train()
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        backend: str | None = None,
        keep_logits: bool = False,
    ):
        _check_backend(backend)
        if args is not None:
            _check_args(args)
        _check_inputs(model, processing_class, train_dataset, peft_config)
        # Set before TRL's __init__: it calls compute_ref_log_probs when precomputing.
        self._dk_backend = backend
        self._dk_head = _head_options(keep_logits)
        padding_free = args is not None and args.padding_free
        self._dk_padding_free = padding_free
        if padding_free:
            if isinstance(model, torch.nn.Module):  # fail before TRL tokenizes or precomputes anything
                _check_packing_once(_inner_model(model))
            args.padding_free = False  # TRL 1.16 would warn that it falls back to padding: we do not
        try:
            super().__init__(
                model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        finally:
            if padding_free:
                args.padding_free = True
        _check_trainer(self)
        self._dk_prepare_models()


@functools.lru_cache(maxsize=None)
def _with_kernels(cls: type) -> type:
    return type(cls.__name__, (_KernelLoss, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def patch_trainer(trainer, *, backend: str | None = None, keep_logits: bool = False):
    """Makes a constructed TRL DPOTrainer (or subclass) compute its log-probs and loss with dpo_kernels, in place.

    Takes `DPOTrainer`'s backend and keep_logits, and checks the same options (ValueError when one cannot be
    honoured); `args.padding_free` (which TRL 1.16 ignores) packs the batches from now on. Reference log-probs that
    TRL already precomputed are kept. A subclass's own `compute_loss` / `compute_ref_log_probs` are replaced.
    Returns the trainer.
    """
    if not isinstance(trainer, _TRLDPOTrainer):
        raise TypeError(f"patch_trainer expects a trl.DPOTrainer, got {type(trainer).__name__}")
    _check_backend(backend)
    _check_args(trainer.args)
    _check_trainer(trainer)
    if not isinstance(trainer, _KernelLoss):
        trainer.__class__ = _with_kernels(type(trainer))
    trainer._dk_backend = backend
    trainer._dk_head = _head_options(keep_logits)
    trainer._dk_padding_free = bool(trainer.args.padding_free)
    trainer._dk_prepare_models()
    return trainer
