"""The architecture comparison: every family trained for the same FLOPs, each at its own best
learning rate, with two seeds, then one card (quality vs training compute vs decode speed vs
cache). One command, resumable:

    python benchmarks/pareto.py                     # the whole sweep into runs/pareto, then the card
    python benchmarks/pareto.py --plan              # the runs, their steps and what is finished
    python benchmarks/pareto.py --card-only         # the card from whatever has finished
    python benchmarks/pareto.py --entries transformer moe --budgets 1e13   # a part of it
    python benchmarks/pareto.py --preset base --scale 3000 --batch-size 64 --seq-len 1024  # accelerator

What is compared (``entries``): every registered family at its ``small`` preset (a family added
later joins by having one; ``mor`` uses ``mor_small_deep``, see FAMILY_PRESET), plus the shapes
that the papers' claims need and the hybrids: an 8-layer vanilla model (MoR's depth), a
window + global pattern, the Gated DeltaNet hybrid and a Block Transformer at ~2.7x the
parameters. With ``--preset base`` the families' ``base`` presets and no extras.

How (``plan``): each budget is a number of training FLOPs, the same for every entry; an entry's
steps = budget / (its analytic training FLOPs per token at ``--seq-len`` x tokens per step), so
a cheaper model sees more tokens. At each budget every entry trains at each learning rate of
LR_GRID (seed 0), then with seeds 1.. at the best one. Warmup is 10% of the steps, cosine to
10%, AdamW as ``glocal train``'s defaults. Validation bits-per-byte comes from ``glocal eval`` on
the final checkpoint over the same 32 held-out batches for everyone (causal routing for MoR).

Resumable: each run is a workdir ``<runs-dir>/<entry>/<budget>/lr<lr>-s<seed>`` finished when
its ``result.json`` exists; a rerun skips finished runs and resumes an interrupted one from its
checkpoint (SIGTERM/SIGINT save one). An entry folder remembers the definition it was trained
with (``entry.json``); a changed definition is refused, never mixed or overwritten. Decode
speed (batch 32 after a 2,048-token prompt, random weights: the speed does not depend on them)
and cache bytes are measured once per entry into ``<runs-dir>/decode``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

BUDGETS = (1e13, 2e13)  # training FLOPs per run: ~0.26x and ~0.51x the README run of transformer_small
LR_GRID = (1.5e-3, 3e-3, 6e-3)  # a factor-2 log grid around the baseline's 3e-3
SEEDS = 2  # seeds at the best learning rate (seed 0 is the grid's run)
EXTEND = 2  # learning rates added beyond the grid's edge while the best sits there
EVAL_BATCHES = 32  # x 16 x 256 tokens: 512 windows spread over the whole validation split
FAMILY_PRESET = {"mor": "small_deep"}  # where `small` cannot show the family's claim (see its docstring)
ORDER = ["transformer", "moe", "mor", "transformer-8L", "block-wide", "block", "based", "fit"]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    config: str  # a preset, <family>_<preset>
    overrides: dict  # model fields on top of it
    note: str

    def spec(self, args) -> dict:
        """What the runs in this entry's folder were trained with."""
        return {"config": self.config, "overrides": self.overrides, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "warmup_fraction": 0.1, "eval_batches": EVAL_BATCHES,
                **({"data": args.data} if args.data != "default" else {})}


EXTRAS = {"small": [
    Entry("transformer-8L", "transformer_small", {"num_layers": 8}, "vanilla at MoR's unrolled depth"),
    Entry("window-global", "transformer_small", {"layer_pattern": "sssg", "window.size": 64},
          "3 sliding-window layers (64 tokens) + 1 global, repeated"),
    Entry("delta-hybrid", "transformer_delta_small", {}, "Gated DeltaNet x3 + 1 global (Qwen3-Next's mixers, dense FFN)"),
    Entry("block-wide", "block_small_wide", {}, "Block Transformer at ~2.7x the parameters (the paper's claim)"),
]}


def entries(preset: str) -> dict[str, Entry]:
    import glocal.models as gm
    out = {}
    for family in gm.list_models():
        own = FAMILY_PRESET.get(family) if preset == "small" else None
        name = own or preset
        if name in gm.list_presets(family):
            out[family] = Entry(family, f"{family}_{name}", {}, f"the family's `{name}` preset")
    out.update({e.name: e for e in EXTRAS.get(preset, [])})
    # The baseline first, then the claims' pairs, so a partial sweep answers them first.
    return {k: out[k] for k in sorted(out, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))}


def build_abstract(entry: Entry, max_len: int = 0):
    """The entry's model (shapes only); ``max_len`` raises the context (whole groups/blocks)."""
    from flax import nnx

    import glocal.models as gm
    family, preset = gm.split_config_name(entry.config)
    kw = dict(entry.overrides)
    cfg = gm.get_config(family, preset, **kw)
    if max_len:
        unit = getattr(cfg, "group_size", None) or getattr(cfg, "block_size", None) or 1
        kw["max_seq_len"] = -(-max_len // unit) * unit
    if cfg.routing_modes():
        kw["routing_mode"] = "threshold"  # decoding and caches use the causal router
    return family, preset, kw, nnx.eval_shape(lambda: gm.build(family, preset, **kw))


def describe(entry: Entry, seq_len: int) -> dict:
    from glocal.layers.params import active_param_count, param_count
    *_, m = build_abstract(entry)
    return {"params": int(param_count(m)), "active_params": int(active_param_count(m)),
            "flops_per_token": float(m.flops_per_token(seq_len))}


def plan(args, table: dict[str, Entry]) -> list[dict]:
    """The sweep's cells in order (every entry at the first budget, then the next budget):
    an entry at a budget, its steps and its folder of runs."""
    cells = []
    for budget in args.budgets:
        for entry in table.values():
            fpt = describe(entry, args.seq_len)["flops_per_token"]
            steps = max(1, round(budget / (fpt * args.batch_size * args.seq_len)))
            cells.append(dict(entry=entry, budget=budget, steps=steps,
                              folder=args.runs_dir / entry.name / f"{budget:.0e}"))
    return cells


def run_dir(folder: pathlib.Path, lr: float, seed: int) -> pathlib.Path:
    return folder / f"lr{lr:g}-s{seed}"


def grid(folder: pathlib.Path, lrs, extend: int) -> tuple[list[float], float | None]:
    """``(learning rates to run next, best)`` of a cell's seed-0 grid: ``lrs`` first; while
    the best finished value is at the grid's edge, one more value a factor 2 beyond it (at
    most ``extend`` times), so no entry is judged at a learning rate the grid cut off. The
    best is None until the grid is complete."""
    lrs = sorted(lrs)
    while True:
        results = {lr: read_result(run_dir(folder, lr, 0)) for lr in lrs}
        missing = [lr for lr, r in results.items() if r is None]
        if missing:
            return missing, None
        best = min(lrs, key=lambda lr: results[lr]["bpb"] if results[lr]["bpb"] is not None else math.inf)
        if extend <= 0 or best not in (lrs[0], lrs[-1]):
            return [], best
        lrs, extend = sorted([*lrs, best / 2 if best == lrs[0] else best * 2]), extend - 1


def read_result(wd: pathlib.Path) -> dict | None:
    p = wd / "result.json"
    return json.loads(p.read_text()) if p.is_file() else None


def check_entry_folder(entry: Entry, args) -> None:
    folder = args.runs_dir / entry.name
    spec = json.loads(json.dumps(entry.spec(args)))
    record = folder / "entry.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved != spec:
            sys.exit(f"error: {folder} holds runs of a different definition of {entry.name!r} ({saved} vs now "
                     f"{spec}); move that folder away or use another --runs-dir (nothing was changed).")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(spec, indent=1) + "\n")


def train_run(run: dict, args) -> dict:
    """Train (or resume) one run and evaluate it; writes and returns its result.json."""
    from glocal.train.evaluate import evaluate_workdir
    from glocal.train.trainer import TrainingDiverged, train

    entry, wd = run["entry"], run["dir"]
    over = {**{k: str(v) for k, v in entry.overrides.items()}, "steps": run["steps"], "batch_size": args.batch_size,
            "seq_len": args.seq_len, "learning_rate": run["lr"], "seed": run["seed"], "data": args.data,
            "warmup_steps": max(1, round(0.1 * run["steps"])), "lr_schedule": "cosine", "eval_every": 0,
            "eval_batches": 1, "sample_tokens": 0, "checkpoint_every": 0, "keep_last": 1, "tensorboard": False,
            "log_every": max(1, run["steps"] // 5)}
    over = {k: str(v) for k, v in over.items()}
    t0 = time.perf_counter()
    result = dict(entry=entry.name, config=entry.config, overrides=entry.overrides, budget=run["budget"],
                  steps=run["steps"], tokens=run["steps"] * args.batch_size * args.seq_len, lr=run["lr"],
                  seed=run["seed"], **describe(entry, args.seq_len))
    try:
        summary = train(entry.config if not (wd / "model.json").exists() else None, wd, over)
    except TrainingDiverged as e:
        result.update(bpb=None, diverged=str(e).splitlines()[0])
    else:
        if summary.get("stopped"):  # SIGTERM/SIGINT: the checkpoint is saved; the run is not finished
            sys.exit(f"stopped at step {summary['step']} of {run['steps']} in {wd}; run the same command to resume.")
        notes = []
        r = evaluate_workdir(wd, overrides={"eval_batches": str(EVAL_BATCHES)}, log=notes.append)
        result.update(bpb=r.get("eval_bpb_threshold", r.get("eval_bpb")), bpb_topk=r.get("eval_bpb_topk"),
                      eval=notes[0] if notes else "")
    result["wall_s"] = time.perf_counter() - t0
    (wd / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def measure_decode(entry: Entry, args) -> dict:
    """Decode tokens/s at batch ``args.decode_batch`` after a ``args.prompt_len``-token prompt, and
    cache bytes per sequence at 2k / 32k, cached in ``<runs-dir>/decode/<entry>.json``."""
    path = args.runs_dir / "decode" / f"{entry.name}.json"
    spec = json.loads(json.dumps(entry.spec(args)))
    if path.is_file() and json.loads(path.read_text()).get("spec") == spec:
        return json.loads(path.read_text())
    import jax
    import jax.numpy as jnp
    import numpy as np

    import glocal.models as gm
    from common import machine, time_fn
    from efficiency import decode_programs
    out = {"spec": spec, "machine": machine(), "batch": args.decode_batch, "prompt": args.prompt_len}
    for L in (2048, 32768):  # (a built model: FIT's empty cache holds projections of its start latents)
        family, preset, kw, _ = build_abstract(entry, L)
        out[f"cache_bytes_{L}"] = int(gm.build(family, preset, **kw).cache_nbytes(1, L))
    family, preset, kw, _ = build_abstract(entry, args.prompt_len + args.decode_new)
    model = gm.build(family, preset, **kw)
    state, prefill, decode = decode_programs(model)
    B, new = args.decode_batch, args.decode_new
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, args.prompt_len)), jnp.int32)
    logits, cache = prefill(state, tokens, model.init_cache(B, args.prompt_len + new))
    run = lambda n: jax.block_until_ready(decode(state, logits, cache, n))
    short = new // 4
    run(new), run(short)  # compile both
    # The marginal cost of (new - short) steps, from the fastest of interleaved calls: noise only
    # adds time, so minima are stable where a difference of medians can even come out negative
    # (tiny models, a busy machine). Longer series when the difference is still not positive.
    for iters in (3, 12, 48):
        t_new, t_short = [], []
        for _ in range(iters):
            t_new += time_fn(lambda: run(new), warmup=0, iters=1)
            t_short += time_fn(lambda: run(short), warmup=0, iters=1)
        if min(t_new) > min(t_short):
            break
    else:
        sys.exit(f"error: decoding {new} steps of {entry.name!r} never measured slower than {short}; "
                 f"use a larger --decode-new.")
    out["decode_tokens_per_s"] = B * (new - short) / (min(t_new) - min(t_short))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def cell_runs(cell: dict, args) -> list[dict]:
    """A cell's next runs: the grid's missing ones, else the further seeds at its best."""
    todo, best = grid(cell["folder"], args.lrs, args.extend)
    if best is not None:
        todo = [(best, seed) for seed in range(1, args.seeds)]
    else:
        todo = [(lr, 0) for lr in todo]
    return [dict(cell, lr=lr, seed=seed, dir=run_dir(cell["folder"], lr, seed)) for lr, seed in todo
            if read_result(run_dir(cell["folder"], lr, seed)) is None]


def sweep(args, table) -> None:
    """Every run in order; the decode measurements after the first budget (so a partial sweep
    already has every column of the card)."""
    cells = plan(args, table)
    for entry in table.values():
        check_entry_folder(entry, args)
    for i, cell in enumerate(cells):
        while runs := cell_runs(cell, args):
            run = runs[0]
            print(f"\n### {cell['entry'].name}: budget {cell['budget']:.0e} FLOPs, {cell['steps']} steps, "
                  f"lr {run['lr']:g}, seed {run['seed']} -> {run['dir']}", flush=True)
            r = train_run(run, args)
            print(f"RESULT pareto_run entry={r['entry']} budget={r['budget']:.0e} lr={r['lr']:g} seed={r['seed']} "
                  f"steps={r['steps']} bpb={r['bpb']} wall_s={r['wall_s']:.0f}", flush=True)
        if args.decode and (i + 1 == len(cells) or cells[i + 1]["budget"] != cell["budget"]):
            args.decode = False  # once, after the first budget
            for entry in table.values():
                d = measure_decode(entry, args)
                print(f"RESULT pareto_decode entry={entry.name} decode_tokens_per_s={d['decode_tokens_per_s']:.1f} "
                      f"cache_2k={d['cache_bytes_2048']} cache_32k={d['cache_bytes_32768']}", flush=True)


def finished(folder: pathlib.Path) -> list[dict]:
    return [r for p in sorted(folder.glob("lr*-s*/result.json")) if (r := json.loads(p.read_text()))]


def show_plan(args, table) -> None:
    """Each cell's finished runs and what is left, and the time left at the finished runs' speed."""
    done, wall, rate, left = 0, 0.0, {}, []
    for cell in plan(args, table):
        rs = finished(cell["folder"])
        todo, best = grid(cell["folder"], args.lrs, args.extend)
        n_left = (len(todo) + args.seeds - 1) if best is None else len(cell_runs(cell, args))
        done += len(rs)
        wall += sum(r["wall_s"] for r in rs)
        for r in rs:
            rate.setdefault(r["entry"], []).append(r["wall_s"] / r["budget"])
        left += [cell] * n_left
        runs = ", ".join(f"lr {r['lr']:g} s{r['seed']}: " + (f"{r['bpb']:.4f}" if r["bpb"] else "diverged")
                         for r in rs)
        print(f"{cell['entry'].name:16s} {cell['budget']:.0e} FLOPs {cell['steps']:6d} steps  best lr "
              f"{best if best is not None else '?'}  {runs or 'nothing yet'}" + (f"  ({n_left} to do)" if n_left else ""))
    mean_rate = sum(map(sum, rate.values())) / max(1, sum(map(len, rate.values())))
    eta = sum(c["budget"] * (sum(rate[n]) / len(rate[n]) if (n := c["entry"].name) in rate else mean_rate)
              for c in left)
    print(f"{done} runs finished, at least {len(left)} to do ({wall / 3600:.2f} h of wall time so far"
          + (f"; about {eta / 3600:.1f} h left at the finished runs' speed)" if rate else ")"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", type=pathlib.Path, default=pathlib.Path("runs/pareto"))
    ap.add_argument("--preset", default="small", help="preset class of the families (small | base | tiny)")
    ap.add_argument("--entries", nargs="*", help="only these entries (default: all)")
    ap.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS), help="training FLOPs per run")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every budget (an accelerator: 100-1000)")
    ap.add_argument("--lrs", nargs="*", type=float, default=list(LR_GRID))
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--extend", type=int, default=EXTEND, help="at most this many learning rates beyond the "
                    "grid's edge when the best is there")
    ap.add_argument("--data", default="default", help="training data, as glocal train's data= (default corpus)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--decode-new", type=int, default=64)
    ap.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decode/cache measurements")
    ap.add_argument("--plan", action="store_true", help="list the runs and what is finished; train nothing")
    ap.add_argument("--card-only", action="store_true", help="assemble the card from finished runs only")
    ap.add_argument("--card", type=pathlib.Path, default=pathlib.Path(__file__).parent / "pareto.md",
                    help="the card's markdown (PNGs go beside it)")
    args = ap.parse_args(argv)
    args.budgets = [b * args.scale for b in args.budgets]
    table = entries(args.preset)
    unknown = sorted(set(args.entries or ()) - set(table))
    if unknown:
        sys.exit(f"error: unknown entries {unknown}; this sweep has {sorted(table)}.")
    table = {k: v for k, v in table.items() if not args.entries or k in args.entries}
    if args.plan:
        return show_plan(args, table)
    if not args.card_only:
        sweep(args, table)
    from pareto_card import write_card
    write_card(args, table)


if __name__ == "__main__":
    main()
