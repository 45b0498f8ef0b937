"""The loss and throughput curves of a run, as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [h["loss"] for h in history], label="train loss")
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy")
    a.legend()
    b.plot(steps, [h["tokens_per_s"] for h in history], color="tab:green")
    b.set_xlabel("step")
    b.set_ylabel("tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
