"""A reference training script, SFT then DPO with the fused kernels: run it as `python -m dpo_kernels.train`
(__main__.py parses the knobs of knobs.py, then runs the loop of loop.py; checkpoint.py saves and resumes, trl_phase.py
is --trainer trl; data.py, model.py, plots.py)."""
