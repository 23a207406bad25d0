"""Training curves from the metrics records (metrics.jsonl): one PNG, one panel per quantity."""

from __future__ import annotations

from pathlib import Path

# (title, phase of the train curves, metric keys); the held-out evaluations are drawn as dots
PANELS = (
    ("SFT loss", "sft", ("loss",)),
    ("DPO loss", "dpo", ("loss",)),
    ("reward accuracy", "dpo", ("rewards/accuracies",)),
    ("rewards", "dpo", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("log-probs", "dpo", ("logps/chosen", "logps/rejected")),
)


def plot_curves(records: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(r["phase"] == p[1] for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    evals = [r for r in records if r["phase"] == "eval"]
    for ax, (title, phase, keys) in zip(axes[0], panels):
        for key in keys:
            train = [(r["step"], r[key]) for r in records if r["phase"] == phase and key in r]
            (line,) = ax.plot(*zip(*train), label=key)
            held_out = [(r["step"], r[f"eval_{key}"]) for r in evals if f"eval_{key}" in r]
            if phase == "dpo" and held_out:
                ax.plot(*zip(*held_out), "o--", color=line.get_color(), label=f"held-out {key}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
