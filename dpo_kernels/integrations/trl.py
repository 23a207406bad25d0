"""TRL's `DPOTrainer` with dpo_kernels computing the log-probs and the loss: same options, same numbers.

    from dpo_kernels.integrations.trl import DPOTrainer      # instead of `from trl import DPOTrainer`
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(...), train_dataset=..., ...)

or, for a trainer that already exists, `patch_trainer(trainer)`.

Where it plugs in. TRL 1.16 replaces `model.forward` with a fused LM head (`trl.trainer.utils.add_fused_lm_head`)
that returns per-token log-probs only when called with `fused_lm_head=True`, and the model's own forward otherwise.
`compute_loss` calls the model without that flag, through whatever wraps it (DDP, FSDP, DeepSpeed), so it gets the
logits with the model's own soft-capping and scaling, for the positions from the first completion token on
(`logits_to_keep`), and hands them to `dpo_kernels.dpo_loss_from_logits` with TRL's shifted, masked labels. The
reference model runs the same forward under `no_grad` before the policy's, so its logits are freed before the
policy's exist. `compute_ref_log_probs` (used by `precompute_ref_log_probs`) goes through the same path. Every other
method is TRL's: the collator, the dataset preparation, the training step, `sync_ref_model`'s callback, `log`.

Every DPOConfig option that touches the loss is honoured: `loss_type` (a list) and `loss_weights`, `beta`,
`label_smoothing`, `discopop_tau`, `f_divergence_type`, `f_alpha_divergence_coef`, `ld_alpha`, `use_weighting`,
`precompute_ref_log_probs`, `sync_ref_model`, and the MoE `router_aux_loss_coef`. The logged metrics are TRL's keys,
per micro-batch, gathered across processes as TRL gathers them. Two places differ from TRL 1.16 on purpose, where
TRL fails: `use_weighting` with `hinge` or `sft` works (TRL raises in an in-place multiply), and `discopop` stays
finite for β·Δ < −88.7 (TRL returns NaN).

Refused at construction with a ValueError (never a silent difference): PEFT, vision-language models and datasets,
`padding_free=True` (which TRL 1.16 ignores), tensor/context/sequence parallelism, and the loss options for which
TRL 1.16 returns inf/NaN or divides by zero (`beta <= 0`, `discopop_tau <= 0`, `robust` with ε outside [0, 0.5),
`exo_pair` with ε >= 1, `ld_alpha` outside [0, 1]; see `dpo_kernels.losses.loss_config`).
"""

from __future__ import annotations

import functools
import inspect
import warnings

try:
    import trl
    from trl import DPOTrainer as _TRLDPOTrainer
except ImportError as e:
    raise ImportError(
        "dpo_kernels.integrations.trl needs TRL >= 1.16 and could not import it: pip install dpo-kernels[trl]"
    ) from e

import torch
from accelerate.utils import is_peft_model
from packaging.version import Version
from transformers import ProcessorMixin
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

__all__ = ["DPOTrainer", "patch_trainer"]

IGNORE_INDEX = -100
# Batch keys that are not model inputs (as in TRL's DPOTrainer).
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


def _refuse(what: str, fix: str) -> ValueError:
    return ValueError(f"dpo_kernels.integrations.trl.DPOTrainer does not support {what}; {fix}")


def _check_args(args) -> None:
    """The DPOConfig options that dpo_kernels cannot honour exactly (raise before TRL starts any work)."""
    if args.padding_free:
        raise _refuse(
            "padding_free=True", "TRL 1.16 ignores it (it falls back to padding); set padding_free=False explicitly"
        )
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None:
        sizes = {name: getattr(parallelism, name, None) or 1 for name in ("tp_size", "cp_size", "sp_size")}
        if any(size > 1 for size in sizes.values()):
            raise _refuse(
                f"tensor, context or sequence parallelism ({sizes})",
                "the per-sequence sums need whole sequences and the whole vocabulary on each rank; use data "
                "parallelism (DDP, FSDP, DeepSpeed)",
            )
    try:
        L.loss_config(**L.loss_options(args), use_weighting=args.use_weighting)
        checks.check_ld_alpha(args.ld_alpha)
    except ValueError as e:
        raise ValueError(f"dpo_kernels.integrations.trl.DPOTrainer: invalid DPOConfig loss options: {e}") from e


def _check_inputs(model, processing_class, train_dataset, peft_config) -> None:
    """PEFT and vision inputs, as far as they can be seen before TRL loads anything."""
    if peft_config is not None or (not isinstance(model, str) and is_peft_model(model)):
        raise _refuse("PEFT models (peft_config or a PeftModel)", "train the full model, or use trl.DPOTrainer")
    if isinstance(processing_class, ProcessorMixin):
        raise _refuse("vision-language models (a ProcessorMixin processing_class)", "use trl.DPOTrainer")
    if train_dataset is not None:
        sample = next(iter(train_dataset))
        if "image" in sample or "images" in sample:
            raise _refuse("vision datasets (an 'image' or 'images' column)", "use trl.DPOTrainer")


def _check_trainer(trainer) -> None:
    """What only a constructed trainer shows (a model loaded from a name, the processor TRL picked)."""
    if is_peft_model(trainer.model):
        raise _refuse("PEFT models (peft_config or a PeftModel)", "train the full model, or use trl.DPOTrainer")
    if trainer._is_vlm or trainer._is_vision_dataset:
        raise _refuse("vision-language models or datasets", "use trl.DPOTrainer")


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in dispatch.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(dispatch.BACKENDS)} (or None: automatic)")


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


# Autograd nodes that only view their input: the logits share storage with the input's producer.
_VIEW_NODES = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "AsStridedBackward", "SliceBackward")


def _output_saved_for_backward(t: torch.Tensor) -> bool:
    """Whether the node that produced `t` (looking through views) keeps its output for its own backward, as tanh or
    exp do. Then the logits' gradient must not be written into their storage."""
    node = t.grad_fn
    while node is not None:
        if hasattr(node, "_saved_result"):
            return True
        if not type(node).__name__.startswith(_VIEW_NODES):
            return False
        node = node.next_functions[0][0] if node.next_functions else None
    return False


def _shifted_labels(inputs: dict) -> tuple[torch.Tensor, int]:
    """TRL's labels, shifted: labels[:, t] is the token at t + 1 where that is a completion token, else -100 (the
    last column is always -100), so that they line up with the logits without slicing them. Also returns the first
    column that any row scores (0 when none does)."""
    input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    scored_columns = torch.nonzero((labels != IGNORE_INDEX).any(0))
    first = int(scored_columns[0, 0]) if scored_columns.numel() else 0
    return labels, first


class _KernelLoss:
    """The methods that replace TRL's log-prob and loss computation; mixed in before TRL's DPOTrainer."""

    _dk_backend: str | None = None
    _dk_inplace_grad: bool | None = None

    # -- the model's logits and TRL's labels

    def _dk_model_inputs(self, model, inputs: dict) -> tuple[dict, torch.Tensor]:
        """The model kwargs and the shifted labels, trimmed to the columns from the first scored one on when the
        model takes `logits_to_keep` (the prompt columns before it never reach the vocabulary projection)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels, first = _shifted_labels(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        if first > 0 and _accepts_logits_to_keep(type(unwrapped)):
            model_kwargs["logits_to_keep"] = labels.shape[1] - first
            labels = labels[:, first:]
        return model_kwargs, labels

    def _dk_sequence_logps(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sequence (LD-weighted) log-probs [2B] of reference logits, without gradient."""
        token_logps = dk.token_logps(logits, labels, backend=self._dk_backend)
        return dk.sequence_logps(token_logps, labels, ld_alpha=self.ld_alpha, backend=self._dk_backend).logps

    def _dk_reference_logps(self, inputs: dict, model_kwargs: dict, labels: torch.Tensor):
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.ref_model is None:
            raise ValueError("no reference model: pass ref_model, or set precompute_ref_log_probs=True")
        # The reference needs no MoE router logits (TRL drops the flag too).
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        keep = ref_kwargs.get("logits_to_keep")
        if keep is not None and not _accepts_logits_to_keep(type(self.accelerator.unwrap_model(self.ref_model))):
            del ref_kwargs["logits_to_keep"]  # a reference of another class: slice its logits instead
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logits = self.ref_model(**ref_kwargs).logits
            logps = self._dk_sequence_logps(logits[:, -labels.shape[1] :], labels)
        return logps.chunk(2)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs [B], [B] of one padded batch (for `precompute_ref_log_probs`)."""
        model_kwargs, labels = self._dk_model_inputs(model, inputs)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            logits = model(**model_kwargs).logits
            logps = self._dk_sequence_logps(logits, labels)
        return logps.chunk(2)

    # -- the loss

    def _dk_inplace(self, logits: torch.Tensor) -> bool:
        """Write the logits' gradient into their storage when nothing else reads the logits in the backward."""
        if self._dk_inplace_grad is not None:
            return self._dk_inplace_grad
        if not logits.requires_grad or logits.dtype == torch.float64:
            return False
        if dispatch.pick(logits, self._dk_backend) == "reference":
            return False
        return not _output_saved_for_backward(logits)

    def _dk_loss(self, logits, labels, completion_mask, ref_chosen, ref_rejected) -> dk.DPOOutput:
        options = L.loss_options(self.args)
        common = dict(inplace_grad=self._dk_inplace(logits), backend=self._dk_backend)
        # ipo and sigmoid_norm divide by TRL's completion lengths, counted on the unshifted completion mask: one more
        # than the scored tokens where a completion starts at column 0 (an empty prompt). Then the unfused path.
        normalised = L.LENGTH_NORMALISED_LOSSES.intersection(options["loss_type"])
        if not (normalised and bool(completion_mask[:, 0].any())):
            return dk.dpo_loss_from_logits(
                logits,
                labels,
                ref_chosen,
                ref_rejected,
                ld_alpha=self.ld_alpha,
                use_weighting=self.use_weighting,
                return_stats=True,
                **common,
                **options,
            )
        token_logps, token_stats = dk.token_logps(logits, labels, return_stats=True, **common)
        seq = dk.sequence_logps(
            token_logps, labels, ld_alpha=self.ld_alpha, token_stats=token_stats, backend=self._dk_backend
        )
        B = seq.logps.shape[0] // 2
        lengths = completion_mask.sum(1)
        # float64 sequence sums give float64 outputs: the loss in the logits' precision, as dpo_loss_from_logits
        return dk.dpo_loss(
            seq.logps[:B],
            seq.logps[B:],
            ref_chosen,
            ref_rejected,
            chosen_lengths=lengths[:B],
            rejected_lengths=lengths[B:],
            wpo_weights=dk.reference.wpo_weights(seq) if self.use_weighting else None,
            chosen_token_logp_sum=seq.raw_logps[:B],
            chosen_token_count=seq.n_tokens[:B],
            sequence_stats=seq.stats,
            backend=self._dk_backend,
            **options,
        ).to(torch.promote_types(logits.dtype, torch.float32))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_kwargs, labels = self._dk_model_inputs(model, inputs)
        ref_chosen, ref_rejected = self._dk_reference_logps(inputs, model_kwargs, labels)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        outputs = model(**model_kwargs)
        out = self._dk_loss(outputs.logits, labels, inputs["completion_mask"], ref_chosen, ref_rejected)
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._dk_log_metrics(mode, inputs, labels, out)
        if not return_outputs:
            return loss
        warnings.warn(
            "`return_outputs=True` (the logits for `compute_metrics`) is deprecated in TRL and costs an extra forward",
            FutureWarning,
            stacklevel=2,
        )
        model_kwargs.pop("logits_to_keep", None)
        with torch.no_grad():
            outputs = model(**model_kwargs)
        return loss, outputs

    def _dk_log_metrics(self, mode: str, inputs: dict, labels: torch.Tensor, out: dk.DPOOutput) -> None:
        """TRL's metrics, in TRL's order: token-weighted ones from sums and counts gathered per process, per-pair
        ones as means over the gathered pairs."""
        metrics, gather = self._metrics[mode], self.accelerator
        scored = labels != IGNORE_INDEX
        B = scored.shape[0] // 2
        n_chosen, n_rejected = scored[:B].sum().float(), scored[B:].sum().float()
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
    """TRL's DPOTrainer, with dpo_kernels computing the log-probs and the loss (see the module docstring).

    Takes TRL's arguments, plus:
        backend: dpo_kernels backend, "triton", "cpu" or "reference" (default: automatic, as in `dpo_kernels`).
        inplace_grad: write the logits' gradient into the logits' storage (saves one [tokens, V] buffer). Default:
            on when the backend allows it and the model's last op does not keep its output for its backward.

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
        inplace_grad: bool | None = None,
    ):
        _check_backend(backend)
        if args is not None:
            _check_args(args)
        _check_inputs(model, processing_class, train_dataset, peft_config)
        # Set before TRL's __init__: it calls compute_ref_log_probs when precomputing.
        self._dk_backend = backend
        self._dk_inplace_grad = inplace_grad
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
        _check_trainer(self)


@functools.lru_cache(maxsize=None)
def _with_kernels(cls: type) -> type:
    return type(cls.__name__, (_KernelLoss, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def patch_trainer(trainer, *, backend: str | None = None, inplace_grad: bool | None = None):
    """Makes a constructed TRL DPOTrainer (or subclass) compute its log-probs and loss with dpo_kernels, in place.

    Checks the same options as `DPOTrainer` (ValueError when one cannot be honoured). Reference log-probs that
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
    trainer._dk_inplace_grad = inplace_grad
    return trainer
