"""Adapters that put dpo_kernels under other libraries' trainers.

Each adapter is a submodule that imports its library on import, so `import dpo_kernels` never does:

- `dpo_kernels.integrations.trl`: `DPOTrainer`, a drop-in for TRL's (>= 1.16), and `patch_trainer(trainer)`.
"""
