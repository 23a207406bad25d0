"""`--trainer trl`: the DPO phase in TRL's DPOTrainer with dpo_kernels' loss, on the text pairs, with the knobs mapped
to DPOConfig (checkpoints, evaluation and trackers included: TRL writes its checkpoints in output_dir/trl). TRL's
logs go to metrics.jsonl; SIGINT/SIGTERM make TRL save a checkpoint and stop; a non-finite loss or gradient norm
stops the run."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

from dpo_kernels.train import checkpoint
from dpo_kernels.train.knobs import Knobs

TOKENS = "dpo_kernels_num_tokens.json"


def trl_config(knobs: Knobs, **extra):
    """DPOConfig from the knobs (same names where TRL has the knob)."""
    from trl import DPOConfig

    from dpo_kernels.losses import loss_options

    report_to = [r for r in knobs.report_to if r != "none"] or "none"
    return DPOConfig(
        output_dir=str(Path(knobs.output_dir) / "trl"),
        **loss_options(knobs),
        ld_alpha=knobs.ld_alpha,
        use_weighting=knobs.use_weighting,
        max_length=knobs.max_length,
        truncation_mode=knobs.truncation_mode,
        per_device_train_batch_size=knobs.per_device_train_batch_size,
        per_device_eval_batch_size=knobs.per_device_eval_batch_size,
        gradient_accumulation_steps=knobs.gradient_accumulation_steps,
        learning_rate=knobs.learning_rate,
        max_steps=knobs.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(knobs.warmup_ratio * knobs.max_steps),
        weight_decay=knobs.weight_decay,
        max_grad_norm=knobs.max_grad_norm if knobs.max_grad_norm > 0 else 0.0,  # 0: no clipping in HF too
        optim="adamw_torch",
        seed=knobs.seed,
        bf16=knobs.bf16,
        activation_checkpointing=knobs.gradient_checkpointing,  # gradient_checkpointing, renamed
        precompute_ref_log_probs=knobs.precompute_ref_log_probs,
        padding_free=knobs.padding_free,  # TRL 1.16 ignores it; dpo_kernels' DPOTrainer packs the rows
        sync_ref_model=knobs.ref_model_sync_steps > 0,
        ref_model_sync_steps=max(1, knobs.ref_model_sync_steps),
        ref_model_mixup_alpha=knobs.ref_model_mixup_alpha,
        logging_steps=knobs.logging_steps,
        eval_strategy="steps" if knobs.eval_steps else "no",
        eval_steps=knobs.eval_steps or None,
        save_strategy="steps" if knobs.save_steps else "no",
        save_steps=knobs.save_steps or 500,
        save_total_limit=knobs.save_total_limit or None,
        report_to=report_to,
        **extra,
    )


def dpo_in_trl(ours, ref_model, step: int) -> int:
    """Trains the policy of `ours` (the loop's Trainer) against `ref_model` in TRL's DPOTrainer; returns the step
    count. Our checkpoint at the start of DPO holds the reference; resuming from it also resumes TRL from its newest
    checkpoint."""
    try:
        import transformers

        from dpo_kernels.integrations.trl import DPOTrainer
    except ImportError as err:
        raise ImportError(f"--trainer trl: {err} (pip install dpo-kernels[trl])") from err
    from dpo_kernels.train.loop import StopTraining

    run, metrics, signals = ours.run, ours.metrics, ours.signals
    knobs = run.knobs
    config = trl_config(knobs)
    trl_resume = None
    if ours.resumed is not None and ours.resumed["phase"] == "dpo":
        found = checkpoint.checkpoints(config.output_dir, "trainer_state.json")
        trl_resume = str(found[-1]) if found else None
        if trl_resume:  # TRL's logs up to its checkpoint, as the uninterrupted run wrote them
            history = json.loads((Path(trl_resume) / "trainer_state.json").read_text())["log_history"]
            for logs in history:
                metrics.write({"phase": "dpo", "step": step + logs.pop("step"), **logs}, echo=False, track=False)
    else:
        ours.save("dpo", 0, step, {})  # the reference, which TRL's checkpoints do not hold
    bad: list[str] = []

    class Log(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            # TRL's trackers get its logs: ours only write them to metrics.jsonl
            metrics.write({"phase": "dpo", "step": step + state.global_step, **logs}, echo=False, track=False)
            values = [logs.get(k) for k in ("loss", "grad_norm") if isinstance(logs.get(k), float)]
            if not knobs.skip_nonfinite_steps and not all(math.isfinite(v) for v in values):
                bad.append(f"non-finite loss or gradient norm at TRL step {state.global_step} ({logs})")
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            # TRL 1.16 does not save its num_tokens counter: a resumed run would count from 0
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / TOKENS
            path.write_text(json.dumps({"num_tokens": getattr(trainer, "_total_train_tokens", 0)}))

        def on_step_end(self, args, state, control, **kwargs):
            if signals.received:
                control.should_save = True
                control.should_training_stop = True

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
    if trl_resume:
        logging.getLogger("dpo_kernels.train").info("resuming TRL from %s", trl_resume)
    if trl_resume and (Path(trl_resume) / TOKENS).exists():
        trainer._total_train_tokens = json.loads((Path(trl_resume) / TOKENS).read_text())["num_tokens"]
    trainer.train(resume_from_checkpoint=trl_resume)
    if bad:
        metrics.close()
        raise StopTraining(f"{bad[0]}: stopped, the final model not saved (--skip-nonfinite-steps goes on)")
    if signals.received:
        metrics.close()
        name = signal.Signals(signals.received).name
        found = checkpoint.checkpoints(config.output_dir, "trainer_state.json")
        raise StopTraining(
            f"{name} at TRL step {trainer.state.global_step}: TRL saved {found[-1] if found else 'nothing'}; "
            "continue with --resume-from-checkpoint latest (and the same knobs)",
            128 + signals.received,
        )
    return step + trainer.state.global_step
