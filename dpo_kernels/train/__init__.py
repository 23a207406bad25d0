"""A minimal reference training script, SFT then DPO with the fused kernels: run it as
`python -m dpo_kernels.train` (knobs and loop in __main__.py; data.py, model.py, plots.py)."""
