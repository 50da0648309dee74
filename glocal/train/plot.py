"""``glocal plot DIR [DIR...] -o curves.png``: training and validation loss of several runs
against tokens seen and against wall-clock time, one figure, one colour per run."""

from __future__ import annotations

import json
import math
import pathlib

from glocal.train.metrics import read_metrics


def _label(workdir: pathlib.Path) -> str:
    try:
        model = json.loads((workdir / "model.json").read_text())["model"]
    except (OSError, ValueError, KeyError):
        return workdir.name
    return f"{workdir.name} ({model})"


def plot_runs(workdirs, output="curves.png") -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, wd in enumerate(map(pathlib.Path, workdirs)):
        records = read_metrics(wd)
        c, label = colors[i % len(colors)], _label(wd)
        train = [r for r in records if "loss" in r and "tokens" in r]
        evals = [r for r in records if "eval_loss" in r and "tokens" in r]
        if not train and not evals:
            raise ValueError(f"{wd}/metrics.jsonl has no loss records yet.")
        for ax, x in ((ax_tok, "tokens"), (ax_time, "elapsed_s")):
            if train:
                ax.plot([r[x] for r in train], [r["loss"] / math.log(2) for r in train], color=c,
                        alpha=0.8, label=f"{label} train")
            if evals:
                ax.plot([r[x] for r in evals], [r["eval_bpb"] for r in evals], "o--", color=c,
                        label=f"{label} validation")
    ax_tok.set_xlabel("tokens seen")
    ax_time.set_xlabel("wall-clock seconds")
    for ax in (ax_tok, ax_time):
        ax.set_ylabel("loss (bits per token)")
        ax.grid(alpha=0.3)
    ax_tok.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(output)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
