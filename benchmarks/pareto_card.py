"""The card of the architecture comparison (``benchmarks/pareto.py``): a markdown table and
three PNGs assembled from whatever runs have finished. Nothing here trains or times."""

from __future__ import annotations

import datetime
import json
import statistics

from pareto import finished, grid, read_result, run_dir

BASE = "transformer"
# (challenger, reference, the paper's claim as this project tests it)
CLAIMS = [
    ("moe", "transformer", "MoE beats the dense model at equal active parameters and equal FLOPs"),
    ("mor", "transformer-8L", "MoR (expert choice) beats vanilla at equal FLOPs with fewer parameters"),
    ("block-wide", "transformer", "Block Transformer: >= 5x decode tokens/s at batch 32 after 2k at equal "
                                  "bits-per-byte (within 2%)"),
]


def collect(args, table) -> dict:
    """``{entry: {budget: cell}}``, a cell holding the grid's seed-0 results, the best
    learning rate and the results of every seed at it (only what has finished)."""
    out = {}
    for name in table:
        for budget in args.budgets:
            folder = args.runs_dir / name / f"{budget:.0e}"
            runs = {lr: r for r in finished(folder) if r["seed"] == 0 for lr in [r["lr"]]}
            if not runs:
                continue
            _, lr = grid(folder, args.lrs, args.extend)
            seeds = [r for s in range(args.seeds) if lr and (r := read_result(run_dir(folder, lr, s)))]
            out.setdefault(name, {})[budget] = {"grid": dict(sorted(runs.items())), "best": lr, "seeds": seeds,
                                                "any": next(iter(runs.values()))}
    return out


def bpbs(cell) -> list[float]:
    return [r["bpb"] for r in cell["seeds"] if r["bpb"] is not None]


def mean_text(cell) -> str:
    xs = bpbs(cell)
    if not xs:
        return "(grid running)" if cell["best"] is None else "diverged"
    spread = f" ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else " (1 seed)"
    return f"{statistics.mean(xs):.3f}{spread}"


def verdict(cell_a, cell_b) -> tuple[str, float | None]:
    """Does ``a`` have lower bits-per-byte than ``b`` across the seeds? (and the mean ratio)"""
    a, b = bpbs(cell_a), bpbs(cell_b)
    if len(a) < 2 or len(b) < 2:
        return "not yet measured (needs two seeds each)", None
    ratio = statistics.mean(a) / statistics.mean(b)
    if max(a) < min(b):
        return "met: lower with every seed", ratio
    if ratio < 1:
        return "lower mean, within the seed spread (not met)", ratio
    return "not met", ratio


def grid_text(cell) -> str:
    """Every seed-0 learning rate of the cell with its bits-per-byte; the best in bold and
    flagged when it still sits at the edge of what was run."""
    lrs = list(cell["grid"])
    parts = []
    for lr, r in cell["grid"].items():
        text = f"{lr:.2g}: " + ("div." if r["bpb"] is None else f"{r['bpb']:.3f}")
        parts.append(f"**{text}**" if lr == cell["best"] else text)
    edge = " (edge)" if cell["best"] in (lrs[0], lrs[-1]) and len(lrs) > 1 else ""
    return ", ".join(parts) + edge


def write_card(args, table) -> None:
    from common import machine
    data = collect(args, table)
    decode = {}
    for name in table:
        p = args.runs_dir / "decode" / f"{name}.json"
        if p.is_file():
            decode[name] = json.loads(p.read_text())
    runs = [r for e in data.values() for c in e.values() for r in (*c["grid"].values(), *c["seeds"][1:])]
    planned = len(table) * len(args.budgets) * (len(args.lrs) + args.seeds - 1)  # (before any extension)
    note = next((r["eval"].partition(" over ")[2] for r in runs if " over " in r.get("eval", "")), "")
    lines = [
        "# Architecture comparison card (`benchmarks/pareto.py`)", "",
        f"Assembled {datetime.date.today()} from {len(runs)} runs (the plan's minimum: {planned}) in "
        f"`{args.runs_dir}`; "
        f"{sum(r['wall_s'] for r in runs) / 3600:.2f} h of training and evaluation wall time. "
        f"Machine: {machine()}.", "",
        f"- Budgets: {', '.join(f'{b:.1e}' for b in args.budgets)} training FLOPs per run, the same for every "
        f"model (steps = budget / (analytic training FLOPs per token at {args.seq_len} x {args.batch_size} x "
        f"{args.seq_len} tokens per step)); warmup 10% of the steps, cosine to 10%, AdamW (b2 0.95, weight "
        f"decay 0.1, clip 1).",
        f"- Learning rates {', '.join(f'{lr:g}' for lr in args.lrs)} with seed 0, extended by a factor 2 beyond "
        f"the edge while the best sits there (at most {args.extend} times); {args.seeds} seeds at the best one "
        f"(in bold; '(edge)': the optimum may still lie beyond).",
        f"- Quality: validation bits-per-byte of the final checkpoint, `glocal eval`, {note or 'held-out windows'}"
        f" — the same windows for every model (MoR: causal routing, as it decodes).",
        f"- Decode: tokens/s at batch {args.decode_batch} after a {args.prompt_len}-token prompt (greedy on-device "
        f"loop, marginal cost per step, random weights); cache: decode state bytes per sequence.", "",
    ]
    for budget in args.budgets:
        if not any(budget in cells for cells in data.values()):
            lines += [f"## {budget:.1e} training FLOPs", "", "No run has finished at this budget yet.", ""]
            continue
        lines += [f"## {budget:.1e} training FLOPs", "",
                  f"| model | params total / active | train FLOPs/token | steps (tokens) | learning rate: "
                  f"bits-per-byte (seed 0) | bits-per-byte at the best lr, mean ± half-range over seeds | vs {BASE} |",
                  "|---|---|---|---|---|---|---|"]
        base = data.get(BASE, {}).get(budget)
        for name, cells in data.items():
            cell = cells.get(budget)
            if cell is None:
                continue
            r = cell["any"]
            ratio = ""
            if base and bpbs(base) and bpbs(cell):
                ratio = f"{statistics.mean(bpbs(cell)) / statistics.mean(bpbs(base)):.3f}x"
            lines.append(f"| `{name}` ({r['config']}{' ' + json.dumps(r['overrides']) if r['overrides'] else ''}) | "
                         f"{r['params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M | "
                         f"{r['flops_per_token'] / 1e6:.1f}M | {r['steps']} ({r['tokens'] / 1e6:.2f}M) | "
                         f"{grid_text(cell)} | {mean_text(cell)} | {ratio} |")
        lines.append("")
    lines += speed_table(args, data, decode) + claims(args, data, decode)
    args.card.write_text("\n".join(lines) + "\n")
    print(f"card: {args.card}")
    plots(args, data, decode)


def last_cell(cells) -> dict | None:
    """The largest budget with a seed-averaged result."""
    done = [c for _, c in sorted(cells.items()) if bpbs(c)]
    return done[-1] if done else None


def speed_table(args, data, decode) -> list[str]:
    lines = ["## Quality vs decode speed and cache", "",
             f"| model | bits-per-byte (largest finished budget) | decode tokens/s, batch {args.decode_batch} | "
             f"vs {BASE} | cache / sequence at 2k | at 32k |", "|---|---|---|---|---|---|"]
    base = decode.get(BASE, {}).get("decode_tokens_per_s")
    for name in dict.fromkeys([*data, *decode]):
        cell = last_cell(data.get(name, {}))
        d = decode.get(name)
        bpb = f"{mean_text(cell)} @ {cell['any']['budget']:.0e}" if cell else ""
        tps = f"{d['decode_tokens_per_s']:,.0f}" if d else ""
        ratio = f"{d['decode_tokens_per_s'] / base:.2f}x" if d and base else ""
        cache = (f"{d['cache_bytes_2048'] / 2**20:.2f} MiB | {d['cache_bytes_32768'] / 2**20:.2f} MiB" if d else " | ")
        lines.append(f"| `{name}` | {bpb} | {tps} | {ratio} | {cache} |")
    return lines + [""]


def claims(args, data, decode) -> list[str]:
    lines = ["## The papers' claims at this scale (computed from the runs above)", ""]
    for a, b, claim in CLAIMS:
        if a not in data or b not in data:
            lines.append(f"- {claim}: not measured (`{a}` or `{b}` not in this sweep yet).")
            continue
        for budget in args.budgets:
            ca, cb = data[a].get(budget), data[b].get(budget)
            if not ca or not cb:
                continue
            text, ratio = verdict(ca, cb)
            extra = ""
            if a == "block-wide" and ratio is not None:
                da, db = decode.get(a), decode.get(b)
                speed = da["decode_tokens_per_s"] / db["decode_tokens_per_s"] if da and db else None
                equal = ratio <= 1.02
                ok = equal and speed is not None and speed >= 5
                text = ("met" if ok else "not met") + (f": bits-per-byte {ratio:.3f}x `{b}`'s ("
                                                      f"{'within' if equal else 'outside'} 2%)")
                extra = f", decode {speed:.2f}x" if speed else ", decode not measured"
            elif ratio is not None:
                pa, pb = ca["any"], cb["any"]
                extra = (f" (bits-per-byte {ratio:.3f}x `{b}`'s; parameters {pa['params'] / pb['params']:.2f}x, "
                         f"active {pa['active_params'] / pb['active_params']:.2f}x)")
            lines.append(f"- {claim}, at {budget:.0e} FLOPs: **{text}**{extra}: `{a}` {mean_text(ca)} vs "
                         f"`{b}` {mean_text(cb)}.")
    return lines + [""]


def plots(args, data, decode) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNGs)")
        return
    stem = args.card.with_suffix("")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cells in data.items():
        pts = [(b, c) for b, c in sorted(cells.items()) if bpbs(c)]
        if not pts:
            continue
        xs = [b for b, _ in pts]
        ys = [statistics.mean(bpbs(c)) for _, c in pts]
        err = [(max(bpbs(c)) - min(bpbs(c))) / 2 for _, c in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation bits-per-byte (best lr, mean of seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{stem}_flops.png", dpi=110)
    plt.close(fig)
    pairs = {n: (last_cell(data.get(n, {})), decode.get(n)) for n in data}
    pairs = {n: (c, d) for n, (c, d) in pairs.items() if c and d}
    if not pairs:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "decode_tokens_per_s", f"decode tokens/s, batch {args.decode_batch}, "
                                                            f"after {args.prompt_len}"),
                           (axes[1], "cache_bytes_2048", "cache bytes / sequence at 2k"),
                           (axes[2], "cache_bytes_32768", "cache bytes / sequence at 32k")):
        for name, (c, d) in pairs.items():
            ax.scatter(d[key], statistics.mean(bpbs(c)))
            ax.annotate(name, (d[key], statistics.mean(bpbs(c))), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits-per-byte (largest finished budget)")
    fig.tight_layout()
    fig.savefig(f"{stem}_decode_cache.png", dpi=110)
    plt.close(fig)
    print(f"PNGs: {stem}_flops.png, {stem}_decode_cache.png")
