"""Efficiency card: the baseline, FIT, the Block Transformer, Based, MoE and MoR at the `small` shape.
(any preset too: ``--models transformer moe:qwen3_next_small``, the Qwen3-Next-style hybrid)

    python benchmarks/efficiency.py                       # every section, `small` presets
    python benchmarks/efficiency.py --sections cache decode --preset small
    python benchmarks/efficiency.py --sections bpb --workdirs transformer=runs/t fit=runs/f block=runs/b

Sections:
  params   total and non-embedding parameters
  flops    training FLOPs per token (the models' analytic counts, as used for MFU) at 256 and 2,048
  cache    decode cache bytes per sequence at L = 2k / 8k / 32k: formula and allocated pytree
           (``jax.eval_shape``, nothing allocated), and the ratio to the baseline
  train    training step (forward + backward of the token loss, batch 1) at L = 1k..16k:
           compiled temp memory (XLA memory analysis, every L) and tokens/s (L <= --time-max-len)
  decode   prefill and decode tokens/s at batch 1 and 32 after a 2,048-token prompt: a jitted
           prefill and a jitted on-device greedy decode loop, timed separately (compilation
           excluded); decode per step = (t(--new steps) - t(--new/4 steps)) / (3/4 --new)
  bpb      validation bits-per-byte and tokens seen, read from training workdirs

Lines starting with RESULT are machine-readable.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine, median, time_fn  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.layers.cache import tree_nbytes  # noqa: E402

FAMILIES = ("transformer", "fit", "block", "based", "moe", "mor")
SECTIONS = ("params", "flops", "cache", "train", "decode", "bpb")


def build(name, preset, max_len, **kw):
    """The preset with a context of at least ``max_len`` (rounded to whole groups/blocks);
    a router that is non-causal in training runs its causal mode (what decoding uses).
    ``name`` is a family (its ``preset``) or ``family:preset`` (e.g. ``moe:qwen3_next_small``)."""
    name, _, own = name.partition(":")
    preset = own or preset
    cfg = gm.get_config(name, preset)
    unit = getattr(cfg, "group_size", None) or getattr(cfg, "block_size", None) or 1
    if cfg.routing_modes():
        kw.setdefault("routing_mode", "threshold")
    return gm.build(name, preset, max_seq_len=-(-max_len // unit) * unit, **kw)


def abstract(name, preset, max_len=2048):
    return nnx.eval_shape(lambda: build(name, preset, max_len))


def params(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    total = sum(x.size for _, x in flat)
    emb = sum(x.size for p, x in flat if p[-1] in ("table_VD", "w_DV"))  # lookup tables and heads
    return total, total - emb


def section_params(args):
    print("\n## parameters")
    for name in args.models:
        total, non_emb = params(abstract(name, args.preset))
        print(f"{name:12s} total {total / 1e6:7.2f}M   non-embedding {non_emb / 1e6:7.2f}M")
        print(f"RESULT params model={name} total={total} non_embedding={non_emb}")


def section_flops(args):
    print("\n## training FLOPs per token (6N-style analytic count incl. attention)")
    base = {}
    for name in args.models:
        m = abstract(name, args.preset)
        row = {L: m.flops_per_token(L) for L in (256, 2048)}
        base.setdefault("transformer", row) if name == "transformer" else None
        ratio = "" if "transformer" not in base else \
            f"   vs baseline {row[2048] / base['transformer'][2048]:.2f}x at 2k"
        print(f"{name:12s} " + "  ".join(f"L={L}: {v / 1e6:7.2f} MFLOP" for L, v in row.items()) + ratio)
        print(f"RESULT flops model={name} " + " ".join(f"L{L}={v:.0f}" for L, v in row.items()))


def section_cache(args):
    print("\n## decode cache bytes per sequence (formula == allocated pytree)")
    lengths = (2048, 8192, 32768)
    base = {}
    for name in args.models:
        cells = []
        for L in lengths:
            m = build(name, args.preset, L)  # init_cache computes (FIT's x2l of zero latents)
            measured = tree_nbytes(jax.eval_shape(lambda: m.init_cache(1, L)))
            formula = m.cache_nbytes(1, L)
            assert measured == formula, (name, L, measured, formula)
            if name == "transformer":
                base[L] = measured
            ratio = f" ({measured / base[L]:.3f}x)" if L in base else ""
            cells.append(f"L={L}: {measured / 2**20:8.2f} MiB{ratio}")
            print(f"RESULT cache model={name} L={L} bytes={measured} formula={formula}"
                  + (f" ratio_vs_baseline={measured / base[L]:.4f}" if L in base else ""))
        print(f"{name:12s} " + "   ".join(cells))


def train_step_fn(model):
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(p, x):
        logits, _ = nnx.merge(graphdef, p)(x[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1).mean()

    return jax.jit(jax.value_and_grad(loss)), state


def section_train(args):
    print(f"\n## training step (forward + backward, batch 1, attention_impl={args.attention_impl}): "
          f"compiled temp memory and tokens/s")
    for name in args.models:
        cells = []
        for L in args.train_lens:
            model = build(name, args.preset, L + 1, attention_impl=args.attention_impl)
            step, state = train_step_fn(model)
            x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, L + 1)), jnp.int32)
            compiled = step.lower(state, x).compile()
            mem = compiled.memory_analysis().temp_size_in_bytes
            tps = None
            if L <= args.time_max_len:
                t = median(time_fn(lambda: jax.block_until_ready(compiled(state, x)), warmup=1, iters=args.iters))
                tps = L / t
            cells.append(f"L={L}: {mem / 2**20:7.0f} MiB" + (f", {tps:7,.0f} tok/s" if tps else ""))
            print(f"RESULT train model={name} L={L} temp_bytes={mem}" + (f" tokens_per_s={tps:.1f}" if tps else ""),
                  flush=True)
        print(f"{name:12s} " + " | ".join(cells))


def decode_programs(model):
    """Jitted prefill and an on-device greedy decode loop of ``n`` steps, timed separately."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens_BT, cache):
        lengths_B = jnp.full((tokens_BT.shape[0],), tokens_BT.shape[1], jnp.int32)
        return nnx.merge(graphdef, state).prefill(tokens_BT, lengths_B, cache)

    @functools.partial(jax.jit, static_argnames="n")
    def decode(state, logits_BV, cache, n):
        m = nnx.merge(graphdef, state)

        def step(_, carry):
            logits_BV, cache = carry
            return m.decode(jnp.argmax(logits_BV, -1).astype(jnp.int32), cache)

        return jax.lax.fori_loop(0, n, step, (logits_BV, cache))

    return state, prefill, decode


def decode_speeds(model, args):
    """``(batch, prefill tokens/s, decode tokens/s)`` for each of ``args.batches`` after an
    ``args.prompt_len``-token prompt; decode = marginal cost per step: t(new) - t(new / 4)
    cancels the one-off copy of the (non-donated) prefilled cache into the loop and the
    dispatch overhead."""
    state, prefill, decode = decode_programs(model)
    rng = np.random.default_rng(0)
    for B in args.batches:
        tokens = jnp.asarray(rng.integers(0, 256, (B, args.prompt_len)), jnp.int32)
        cache0 = model.init_cache(B, args.prompt_len + args.new)
        t_pre = median(time_fn(lambda: jax.block_until_ready(prefill(state, tokens, cache0)), warmup=1,
                               iters=args.iters))
        logits, cache = prefill(state, tokens, cache0)
        t_of = lambda n: median(time_fn(lambda: jax.block_until_ready(decode(state, logits, cache, n)),
                                        warmup=1, iters=args.iters))
        short = args.new // 4
        t_dec = (t_of(args.new) - t_of(short)) / (args.new - short) * args.new
        yield B, B * args.prompt_len / t_pre, B * args.new / t_dec


def section_decode(args):
    print(f"\n## prefill and decode after a {args.prompt_len}-token prompt (greedy on-device loop; decode = "
          f"marginal cost per step between {args.new // 4} and {args.new} steps)")
    base = {}
    for name in args.models:
        model = build(name, args.preset, args.prompt_len + args.new)
        for B, prefill_tps, decode_tps in decode_speeds(model, args):
            if name == "transformer":
                base[B] = (prefill_tps, decode_tps)
            ratio = (f" (prefill {prefill_tps / base[B][0]:.2f}x, decode {decode_tps / base[B][1]:.2f}x baseline)"
                     if B in base else "")
            print(f"{name:12s} batch {B:3d}: prefill {prefill_tps:10,.0f} tok/s  decode {decode_tps:9,.0f} tok/s "
                  f"({1e3 * B / decode_tps:.2f} ms/step){ratio}", flush=True)
            print(f"RESULT decode model={name} batch={B} prompt={args.prompt_len} prefill_tokens_per_s={prefill_tps:.1f} "
                  f"decode_tokens_per_s={decode_tps:.1f}"
                  + (f" decode_ratio_vs_baseline={decode_tps / base[B][1]:.3f}" if B in base else ""))


def section_bpb(args):
    print("\n## validation bits-per-byte after training (from metrics.jsonl)")
    base = None
    for item in args.workdirs:
        name, path = item.split("=", 1)
        rows = [json.loads(line) for line in (pathlib.Path(path) / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "eval_bpb" in r]
        if not evals:
            print(f"{name}: no evaluation in {path}")
            continue
        last = evals[-1]
        tokens = max(r.get("tokens", 0) for r in rows)
        base = last["eval_bpb"] if name == "transformer" else base
        ratio = f" ({last['eval_bpb'] / base:.3f}x baseline)" if base else ""
        curve = ", ".join(f"{r['step']}: {r['eval_bpb']:.3f}" for r in evals)
        print(f"{name:12s} {last['eval_bpb']:.3f} bpb after {tokens:,} tokens{ratio}   [{curve}]")
        print(f"RESULT bpb model={name} bpb={last['eval_bpb']:.4f} tokens={tokens}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS[:-1]), choices=SECTIONS)
    p.add_argument("--models", nargs="+", default=list(FAMILIES),
                   help=f"families ({', '.join(FAMILIES)}; each at --preset) or family:preset")
    p.add_argument("--preset", default="small")
    p.add_argument("--train-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--time-max-len", type=int, default=4096, help="time the train step up to this L")
    p.add_argument("--attention-impl", default="xla",
                   help="attention for the train section (xla = dense, as recorded; auto = the library default)")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--workdirs", nargs="*", default=[], help="name=workdir pairs for the bpb section")
    args = p.parse_args()
    print(machine())
    for s in args.sections:
        globals()[f"section_{s}"](args)


if __name__ == "__main__":
    main()
