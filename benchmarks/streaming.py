"""Attention sinks (StreamingLLM): decode cost against length, and quality past the training length.

    python benchmarks/streaming.py decode [--lengths 1024 ... 32768] [--batch 1]
    python benchmarks/streaming.py bpb --workdir runs/small [--workdir runs/sinks_small] [--length 4096]

``decode``: per-step latency and cache bytes of ``transformer_sinks_small`` (every layer a
128-token window + 4 sinks: a cache of 132 slots per layer) against ``transformer_small``
(global attention; its cache is sized for the whole generation, as ``glocal.generate`` sizes
it) at each generated length L. The step is the jitted ``decode`` of one token per row after a
cache holding L tokens, timed in a ``fori_loop`` of 32 steps, the two models interleaved
(A B A B). ``glocal.generate`` runs the same step L times, so L / (L x step) is its tok/s.
The sinks model also runs one real ``glocal.generate`` of the longest length end to end.

``bpb``: bits-per-byte on the validation text of the built-in corpus, in rows of
``--length`` tokens (the training windows were 256), consumed in chunks of 64 through the
cache, so every token sees exactly what token-by-token decoding would. The trained weights run
under several attention set-ups (same parameters, only the mask / cache / positions change):
``as trained``, ``window`` (sliding window, no sinks), ``window+4 sinks`` with RoPE at cache
positions (StreamingLLM) or at absolute positions, and ``global`` (every earlier token, RoPE
past the trained positions). Reported per position range.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine  # noqa: E402

import glocal  # noqa: E402
import glocal.models as gm  # noqa: E402
from glocal import workdir as workdirs  # noqa: E402
from glocal.models.transformer import TransformerCache  # noqa: E402

STEPS = 32


def _step_time(model, batch: int, length: int):
    """Seconds per decode step with a cache that holds ``length`` tokens per row."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, cache, tok_B):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            cache, tok_B = carry
            logits_BV, cache = m.decode(tok_B, cache)
            return cache, jnp.argmax(logits_BV, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, STEPS, body, (cache, tok_B))

    cache = model.init_cache(batch, min(length + STEPS, model.config.max_seq_len))
    # Fill the cache as after ``length`` tokens: positions (masks and slots) are what matter for
    # the cost; the values are random.
    cache = _filled(cache, length)
    tok_B = jnp.zeros((batch,), jnp.int32)
    jax.block_until_ready(run(state, cache, tok_B))
    return lambda: _timed(lambda: jax.block_until_ready(run(state, cache, tok_B))) / STEPS


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _held_positions(cache, length: int) -> np.ndarray:
    """``[S]``: the position each slot of ``cache`` holds after ``length`` tokens (-1: empty)."""
    S = cache.pos_BS.shape[-1]
    pos = np.full((S,), -1, np.int32)
    n = getattr(cache, "num_sinks", None)
    if n is not None:  # SinkRingKVCache: the sinks, then a ring of S - n slots
        pos[:min(n, length)] = np.arange(min(n, length))
        recent = np.arange(max(n, length - (S - n)), length)
        pos[n + (recent - n) % (S - n)] = recent
    elif cache.wraps:  # RingKVCache
        recent = np.arange(max(0, length - S), length)
        pos[recent % S] = recent
    else:  # KVCache: slot = position
        pos[:min(S, length)] = np.arange(min(S, length))
    return pos


def _filled(cache: TransformerCache, length: int) -> TransformerCache:
    """``cache`` as if ``length`` tokens had been consumed (positions decide masks and cost;
    the keys and values stay zero)."""
    def fill(c):
        pos_BS = jnp.broadcast_to(jnp.asarray(_held_positions(c, length)), c.pos_BS.shape)
        return dataclasses.replace(c, pos_BS=pos_BS)
    layers = tuple(fill(c) for c in cache.layers_P)
    return TransformerCache(layers, jnp.full_like(cache.length_B, length))


def decode(args):
    print(machine())
    sinks = gm.build("transformer", "sinks_small")
    rows = []
    for L in args.lengths:
        full = gm.build("transformer", "small", max_seq_len=max(512, L + STEPS))
        t_full, t_sink = _step_time(full, args.batch, L), _step_time(sinks, args.batch, L)
        a, b = [], []
        for _ in range(args.repeats):  # interleaved
            a.append(t_full())
            b.append(t_sink())
        ms_full, ms_sink = 1e3 * float(np.median(a)), 1e3 * float(np.median(b))
        mib = lambda m, n: m.cache_nbytes(args.batch, n) / 2**20
        rows.append((L, ms_full, ms_sink, mib(full, L + STEPS), mib(sinks, L + STEPS)))
        print(f"L={L:6d}: global {ms_full:7.2f} ms/step ({args.batch / ms_full * 1e3:8,.0f} tok/s), cache "
              f"{rows[-1][3]:8.2f} MiB | window+sinks {ms_sink:6.2f} ms/step ({args.batch / ms_sink * 1e3:8,.0f} "
              f"tok/s), cache {rows[-1][4]:.2f} MiB | speed-up {ms_full / ms_sink:.2f}x", flush=True)
    print("\n| generated L | global ms/step | global tok/s | global cache MiB | window+sinks ms/step | "
          "window+sinks tok/s | window+sinks cache MiB | speed-up |\n|---|---|---|---|---|---|---|---|")
    for L, f, s, mf, ms in rows:
        print(f"| {L:,} | {f:.2f} | {args.batch / f * 1e3:,.0f} | {mf:.2f} | {s:.2f} | {args.batch / s * 1e3:,.0f} | "
              f"{ms:.2f} | {f / s:.2f}x |")
    L = max(args.lengths)
    t = time.perf_counter()
    out = glocal.generate(sinks, [[1, 2, 3]] * args.batch, L, temperature=0.8, top_k=40)
    dt = time.perf_counter() - t
    print(f"glocal.generate of {len(out[0]):,} tokens x {args.batch} rows with transformer_sinks_small "
          f"(max_seq_len {sinks.config.max_seq_len}): {dt:.1f} s incl. compile, "
          f"{args.batch * len(out[0]) / dt:,.0f} tok/s")


def _extend_all(model, tokens_BT, cache):
    """Like ``decode``/``prefill`` on a chunk, but the logits of every position."""
    B, T = tokens_BT.shape
    positions_BT = cache.length_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    x_BTD, layers, _ = model.decoder(model.embed(tokens_BT), positions_BT=positions_BT, caches=cache.layers_P,
                                     valid_BT=jnp.ones((B, T), bool))
    return model._logits(x_BTD), TransformerCache(layers, cache.length_B + T)


def _bits(model, rows_BT, chunk: int):
    """Bits of each next-token prediction ``[B, T - 1]``, consuming the rows chunk by chunk."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, tok_BT, nxt_BT):
        logits_BTV, cache = _extend_all(nnx.merge(graphdef, state), tok_BT, cache)
        logp = jax.nn.log_softmax(logits_BTV, axis=-1)
        return cache, -jnp.take_along_axis(logp, nxt_BT[..., None], axis=-1)[..., 0] / np.log(2)

    B, T = rows_BT.shape
    cache = model.init_cache(B, min(T, model.config.max_seq_len))
    out = []
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        tok, nxt = rows_BT[:, s:e], rows_BT[:, s + 1:e + 1]
        if tok.shape[1] < chunk:  # pad the last chunk (padding logits are dropped)
            pad = chunk - tok.shape[1]
            tok, nxt = np.pad(tok, ((0, 0), (0, pad))), np.pad(nxt, ((0, 0), (0, pad)))
            cache, bits = step(state, cache, jnp.asarray(tok), jnp.asarray(nxt))
            out.append(np.asarray(bits)[:, :chunk - pad])
        else:
            cache, bits = step(state, cache, jnp.asarray(tok), jnp.asarray(nxt))
            out.append(np.asarray(bits))
    return np.concatenate(out, axis=1)


def _setups(config, length: int):
    """Named attention set-ups over the same weights (config overrides)."""
    window = config.options.get("window")  # (a KindSettings mapping)
    w = getattr(window, "size", None) or 256
    trained = "as trained" + (f" (window {w} + {window.sinks} sinks)" if window and window.sinks else " (global)")
    yield trained, {"max_seq_len": max(length, config.max_seq_len)}
    big = {"max_seq_len": max(length, config.max_seq_len)}
    if window and window.sinks:
        yield f"window {w}, no sinks", {**big, "window.sinks": 0}
        yield f"window {w} + {window.sinks} sinks, cache positions", {**big, "window.rope_positions": "cache"}
    else:
        yield f"window {w}, no sinks", {**big, "layer_pattern": "s", "window.size": w}
        yield f"window {w - 4} + 4 sinks, cache positions", {**big, "layer_pattern": "s", "window.size": w - 4,
                                                             "window.sinks": 4, "window.rope_positions": "cache"}
        yield f"window {w - 4} + 4 sinks, absolute positions", {**big, "layer_pattern": "s", "window.size": w - 4,
                                                                "window.sinks": 4}


def bpb(args):
    print(machine())
    buckets = [(0, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    buckets = [(a, min(b, args.length - 1)) for a, b in buckets if a < args.length - 1]
    header = " | ".join(f"{a}-{b}" for a, b in buckets)
    print(f"\n| model | attention | {header} |\n|---|---|" + "---|" * len(buckets))
    for wd in args.workdir:
        model, step = workdirs.load_model(wd)
        tokenizer = workdirs.load_tokenizer(wd)
        from glocal.train.data import load_corpus

        corpus = load_corpus("default", tokenizer=tokenizer, vocab_size=model.config.vocab_size)
        val = np.asarray(corpus.val)
        starts = np.linspace(0, len(val) - args.length - 1, args.rows).astype(int)
        rows_BT = np.stack([val[s:s + args.length] for s in starts]).astype(np.int32)
        params = nnx.state(model, nnx.Param)
        for name, overrides in _setups(model.config, args.length):
            variant = gm.build_from_config(model.config.replace(**overrides))
            nnx.update(variant, params)
            bits = _bits(variant, rows_BT, args.chunk)
            cells = " | ".join(f"{bits[:, a:b].mean():.3f}" for a, b in buckets)
            print(f"| {pathlib.Path(wd).name} (step {step}) | {name} | {cells} |", flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--repeats", type=int, default=5)
    b = sub.add_parser("bpb")
    b.add_argument("--workdir", action="append", required=True)
    b.add_argument("--length", type=int, default=4096)
    b.add_argument("--rows", type=int, default=8)
    b.add_argument("--chunk", type=int, default=64)
    args = p.parse_args()
    decode(args) if args.what == "decode" else bpb(args)


if __name__ == "__main__":
    main()
