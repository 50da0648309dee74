"""``glocal plot DIR [DIR...] -o curves.png``: training and validation loss of several runs
against tokens seen and against wall-clock time, one figure, one colour per run; for
mixture-of-experts runs a third panel shows expert load (max / mean, averaged over layers)
and the dropped-assignment fraction."""

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


def _records(workdir: pathlib.Path) -> list[dict]:
    """The metrics of a training workdir, or a WorkdirError that says why there are none."""
    from glocal.workdir import WorkdirError, check_workdir

    if not workdir.exists():
        raise WorkdirError(f"{workdir} does not exist; pass the --workdir folders of training runs.")
    check_workdir(workdir, writable=False)
    if not (workdir / "metrics.jsonl").is_file():
        raise WorkdirError(f"{workdir} is not a glocal training workdir (no metrics.jsonl); pass the "
                           f"--workdir folders of training runs.")
    try:
        return read_metrics(workdir)
    except ValueError as e:  # a line that is not JSON
        raise WorkdirError(f"{workdir}/metrics.jsonl is corrupt ({e}); remove the damaged line.") from None


def plot_runs(workdirs, output="curves.png") -> pathlib.Path:
    from glocal.errors import UserError
    from glocal.workdir import WorkdirError

    out = pathlib.Path(output)
    out = out if out.suffix else out.with_suffix(".png")  # (what matplotlib would write)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: the folder {out.parent} does not exist; create it or "
                        f"pass another -o path.")
    runs = []  # everything is checked before anything is drawn
    for wd in map(pathlib.Path, workdirs):
        records = _records(wd)
        train = [r for r in records if "loss" in r and "tokens" in r]
        evals = [r for r in records if "eval_loss" in r and "tokens" in r]
        if not train and not evals:
            raise WorkdirError(f"{wd}/metrics.jsonl has no loss records yet; plot it once training has "
                               f"logged a step.")
        runs.append((wd, train, evals))

    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    routed = any("moe_load_max_over_mean" in r for _, train, _ in runs for r in train)
    fig, axes = plt.subplots(1, 3 if routed else 2, figsize=(18 if routed else 12, 4.5))
    ax_tok, ax_time = axes[0], axes[1]
    kinds = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in kinds:
        plt.close(fig)
        raise UserError(f"cannot write {out}: -o must end in one of "
                        f"{', '.join('.' + k for k in sorted(kinds))} (e.g. curves.png).")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (wd, train, evals) in enumerate(runs):
        c, label = colors[i % len(colors)], _label(wd)
        for ax, x in ((ax_tok, "tokens"), (ax_time, "elapsed_s")):
            if train:
                ax.plot([r[x] for r in train], [r["loss"] / math.log(2) for r in train], color=c,
                        alpha=0.8, label=f"{label} train")
            if evals:
                ax.plot([r[x] for r in evals], [r["eval_bpb"] for r in evals], "o--", color=c,
                        label=f"{label} validation")
    if routed:  # mixture-of-experts runs: how balanced the routers are
        ax_moe = axes[2]
        for i, (wd, train, _) in enumerate(runs):
            rows = [r for r in train if "moe_load_max_over_mean" in r]
            if not rows:
                continue
            c = colors[i % len(colors)]
            ax_moe.plot([r["tokens"] for r in rows], [r["moe_load_max_over_mean"] for r in rows], color=c,
                        label=f"{_label(wd)} max/mean expert load")
            if any(r.get("moe_dropped", 0) for r in rows):
                ax_moe.plot([r["tokens"] for r in rows], [r["moe_dropped"] for r in rows], ":", color=c,
                            label=f"{_label(wd)} dropped fraction")
        ax_moe.set_xlabel("tokens seen")
        ax_moe.set_ylabel("expert load max / mean (1 = balanced)")
        ax_moe.grid(alpha=0.3)
        ax_moe.legend(fontsize=8)
    ax_tok.set_xlabel("tokens seen")
    ax_time.set_xlabel("wall-clock seconds")
    for ax in (ax_tok, ax_time):
        ax.set_ylabel("loss (bits per token)")
        ax.grid(alpha=0.3)
    ax_tok.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except PermissionError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); pass another -o path.") from None
    finally:
        plt.close(fig)
    return out
