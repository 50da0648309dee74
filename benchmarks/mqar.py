"""MQAR (multi-query associative recall): recall accuracy against decoding-state size, the axes
of the Based paper's figure 2, for 2-layer models (a short convolution, then the mixer under
test; no MLP; LayerNorm pre-norm; one head) trained on CPU.

    python benchmarks/mqar.py                       # the default sweep (about 30 min on 2 cores)
    python benchmarks/mqar.py --models attn64 based64_f16 --steps 300   # a quick look

Models (name: layer pattern, width, options): attention (``cg``, d 64 / 128), sliding window
(``cs``, d 128, windows of 16 and 64 tokens), Based linear attention (``cl``, d 64 / 128,
feature dim 8 / 16 / 24). Training: AdamW (lr 3e-3, weight decay 0.1, cosine), batches drawn
fresh each step from a mixture of (sequence length, pairs) = (64, 4), (128, 8), (256, 16),
(256, 32), (256, 64). Evaluation: 256 fresh sequences per setting. State size = bytes of the
model's decoding cache per sequence at the setting's length (float32; attention grows with
the length, the others do not). Prints a table, RESULT lines, and writes a PNG.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.train.mqar import IGNORE, mqar  # noqa: E402

MODELS = {
    "attn64": dict(layer_pattern="cg", d_model=64),
    "attn128": dict(layer_pattern="cg", d_model=128),
    "swa128_w16": dict(layer_pattern="cs", d_model=128, sliding_window=16),
    "swa128_w64": dict(layer_pattern="cs", d_model=128, sliding_window=64),
    "based64_f8": dict(layer_pattern="cl", d_model=64, feature_dim=8),
    "based64_f16": dict(layer_pattern="cl", d_model=64, feature_dim=16),
    "based64_f24": dict(layer_pattern="cl", d_model=64, feature_dim=24),
    "based128_f8": dict(layer_pattern="cl", d_model=128, feature_dim=8),
    "based128_f16": dict(layer_pattern="cl", d_model=128, feature_dim=16),
    "based128_f24": dict(layer_pattern="cl", d_model=128, feature_dim=24),
}
TRAIN_MIX = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
TEST = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128))


def build(name: str, vocab: int, max_len: int):
    kw = dict(MODELS[name])
    return gm.build("based", "tiny", vocab_size=vocab, num_layers=2, num_heads=1, num_kv_heads=None, ffn="none",
                    norm="layer", d_ff=8, max_seq_len=max_len, **kw)


def masked_loss(model, x, y):
    logits = model(x)
    mask = (y != IGNORE).astype(jnp.float32)
    safe = jnp.where(y == IGNORE, 0, y)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1.0)


def train_and_eval(name: str, args) -> dict:
    model = build(name, args.vocab, max(L for L, _ in TEST))
    graphdef, params = nnx.split(model, nnx.Param)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps, args.lr * 0.05)
    tx = optax.adamw(sched, weight_decay=0.1)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        loss, grads = jax.value_and_grad(lambda p: masked_loss(nnx.merge(graphdef, p), x, y))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    @jax.jit
    def correct(params, x, y):
        pred = jnp.argmax(nnx.merge(graphdef, params)(x), -1)
        return jnp.sum((pred == y) & (y != IGNORE)), jnp.sum(y != IGNORE)

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(args.steps):
        L, D = TRAIN_MIX[i % len(TRAIN_MIX)]
        batch = mqar(args.batch, L, D, vocab_size=args.vocab, seed=int(rng.integers(1 << 30)))
        params, opt, loss = step(params, opt, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))
    train_s = time.perf_counter() - t0
    out = {"name": name, "train_s": train_s, "final_loss": float(loss), "acc": {}, "state": {}}
    trained = nnx.merge(graphdef, params)
    for L, D in TEST:
        data = mqar(args.eval_examples, L, D, vocab_size=args.vocab, seed=10_000 + L + D)
        c, n = correct(params, jnp.asarray(data["inputs"]), jnp.asarray(data["targets"]))
        out["acc"][(L, D)] = float(c) / float(n)
        out["state"][(L, D)] = trained.cache_nbytes(1, L) - 4  # minus the int32 length counter
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=1024, help="the paper uses 8192; smaller trains faster on CPU")
    p.add_argument("--eval-examples", type=int, default=256)
    p.add_argument("--png", default="mqar.png")
    args = p.parse_args()
    print(machine())
    print(f"steps {args.steps} x batch {args.batch}, lr {args.lr}, vocab {args.vocab}, mixture {TRAIN_MIX}")
    rows = []
    for name in args.models:
        r = train_and_eval(name, args)
        rows.append(r)
        accs = "  ".join(f"L{L}/D{D} {a:.3f}" for (L, D), a in r["acc"].items())
        print(f"{name:13s} ({r['train_s']:5.0f} s, loss {r['final_loss']:.3f}) {accs}  "
              f"state@256 {r['state'][(256, 64)]:,} B", flush=True)
        for (L, D), a in r["acc"].items():
            print(f"RESULT mqar model={name} L={L} pairs={D} accuracy={a:.4f} state_bytes={r['state'][(L, D)]}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, setting in zip(axes, ((256, 64), (512, 128))):
        for r in rows:
            kind = r["name"].split("_")[0].rstrip("0123456789")
            ax.scatter(r["state"][setting], r["acc"][setting], label=r["name"],
                       marker={"attn": "o", "swa": "s", "based": "^"}[kind])
        ax.set_xscale("log")
        ax.set_xlabel("decoding state per sequence (bytes)")
        ax.set_ylabel("MQAR accuracy")
        ax.set_title(f"L = {setting[0]}, {setting[1]} key-value pairs")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
