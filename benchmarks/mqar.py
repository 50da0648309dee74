"""MQAR (multi-query associative recall): recall accuracy against decoding-state size, the axes
of the Based paper's figure 2, for 2-layer models (a short convolution, then the mixer under
test; no MLP; LayerNorm pre-norm; one head) trained on CPU.

    python benchmarks/mqar.py                       # the default sweep (about 30 min on 2 cores)
    python benchmarks/mqar.py --models attn64 based64_f16 --steps 300   # a quick look

Models (name: layer pattern, width, options): attention (``cg``, d 64 / 128), sliding window
(``cs``, d 128, windows of 16 and 64 tokens), Based linear attention (``cl``, d 64 / 128,
feature dim 8 / 16 / 24), Gated DeltaNet (``cd``, d 64 / 128 with one head, d 128 with two heads
of 64: states of 16 / 64 / 32 KiB plus the convolution windows). Training (every model the same): AdamW (lr 3e-3, weight decay 0.1,
5% warm-up, cosine), vocabulary 256, batches of 4,096 tokens (64 sequences of 64 tokens, 16 of
256) drawn fresh each step; the first 300 of 900 steps use only short sequences ((L, pairs) =
(64, 4), (64, 8), (64, 16): MQAR's phase transition comes after a few hundred steps there),
the rest cycle through (64, 4), (128, 8), (256, 16), (256, 32), (256, 64). Evaluation: 256
fresh sequences per setting, up to L = 512 (twice the longest training length). State size =
bytes of the model's decoding cache per sequence at the setting's length (float32; attention
grows with the length, the others do not). Prints a table, RESULT lines, and writes a PNG.
"""

from __future__ import annotations

import os

# XLA:CPU's experimental YNNPACK fusions (on by default in jaxlib 0.10.2) returned garbage for
# the Based models' jitted forward at 64 x 64 tokens (linear attention's single chunk inside
# the layer scan: accuracy 0.3% where the same parameters score 100% run op by op). Turned
# off here before JAX starts; the plain XLA:CPU path gives the same numbers as eager mode.
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

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
    # Gated DeltaNet (``cd``): one head of width d, or two heads of 64 at d 128 (state F x E per head).
    "gdn64": dict(layer_pattern="cd", d_model=64),
    "gdn128_h2": dict(layer_pattern="cd", d_model=128, **{"gated_delta.key_heads": 2, "gated_delta.value_heads": 2,
                                                          "gated_delta.key_dim": 64, "gated_delta.value_dim": 64}),
    "gdn128": dict(layer_pattern="cd", d_model=128),
}
SHORT_MIX = ((64, 4), (64, 8), (64, 16))  # the first --short-steps steps
TRAIN_MIX = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))  # the rest
TEST = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 64))
PLOT = ((256, 64), (512, 64))


def build(name: str, vocab: int, max_len: int):
    kw = dict(MODELS[name])
    return gm.build("based", "tiny", vocab_size=vocab, num_layers=2, num_heads=1, num_kv_heads=None, ffn="none",
                    norm="layer", d_ff=8, max_seq_len=max_len, **kw)


def masked_loss(model, x, y):
    logits, _ = model(x)
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
        pred = jnp.argmax(nnx.merge(graphdef, params)(x)[0], -1)
        return jnp.sum((pred == y) & (y != IGNORE)), jnp.sum(y != IGNORE)

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(args.steps):
        L, D = SHORT_MIX[i % len(SHORT_MIX)] if i < args.short_steps else TRAIN_MIX[i % len(TRAIN_MIX)]
        batch = mqar(max(1, args.tokens // L), L, D, vocab_size=args.vocab, seed=int(rng.integers(1 << 30)))
        params, opt, loss = step(params, opt, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))
    train_s = time.perf_counter() - t0
    out = {"name": name, "train_s": float(train_s), "final_loss": float(loss), "acc": {}, "state": {}}
    trained = nnx.merge(graphdef, params)
    for L, D in TEST:
        data = mqar(args.eval_examples, L, D, vocab_size=args.vocab, seed=10_000 + L + D)
        c, n = correct(params, jnp.asarray(data["inputs"]), jnp.asarray(data["targets"]))
        out["acc"][(L, D)] = float(c) / float(n)
        out["state"][(L, D)] = trained.cache_nbytes(1, L) - 4  # minus the int32 length counter
    return out


def print_table(rows, total=None):
    took = "" if total is None else f"; total {total:.0f} s"
    print(f"\nMQAR accuracy (state bytes per sequence at L = 256 / 512){took}")
    print("| model | " + " | ".join(f"L{L}/D{D}" for L, D in TEST) + " | state@256 | state@512 |")
    print("|---" * (len(TEST) + 3) + "|")
    for r in rows:
        accs = " | ".join(f"{r['acc'][s]:.3f}" for s in TEST)
        print(f"| {r['name']} | {accs} | {r['state'][(256, 64)]:,} | {r['state'][(512, 64)]:,} |")


def plot(rows, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    fig, axes = plt.subplots(1, len(PLOT), figsize=(10, 4))
    kinds = {"attn": ("attention", "tab:blue", "o"), "swa": ("sliding window", "tab:orange", "s"),
             "based": ("Based", "tab:green", "^"), "gdn": ("Gated DeltaNet", "tab:red", "D")}
    for ax, setting in zip(axes, PLOT):
        seen = set()
        for r in rows:
            kind = r["name"].split("_")[0].rstrip("0123456789")
            label, color, marker = kinds[kind]
            x, y = r["state"][setting], r["acc"][setting]
            ax.scatter(x, y, color=color, marker=marker, label=None if kind in seen else label)
            seen.add(kind)
            ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("decoding state per sequence (bytes)")
        ax.set_ylabel("MQAR accuracy")
        ax.set_title(f"L = {setting[0]}, {setting[1]} key-value pairs")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def rows_from_log(path):
    """Rows rebuilt from a saved run's RESULT lines (to redraw the table and PNG)."""
    rows = {}
    for line in pathlib.Path(path).read_text().splitlines():
        if line.startswith("RESULT mqar "):
            f = dict(kv.split("=") for kv in line.split()[2:])
            r = rows.setdefault(f["model"], {"name": f["model"], "acc": {}, "state": {}})
            key = (int(f["L"]), int(f["pairs"]))
            r["acc"][key], r["state"][key] = float(f["accuracy"]), int(f["state_bytes"])
    return list(rows.values())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--short-steps", type=int, default=300, help="first steps on L = 64 only (a curriculum)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (sequences = tokens // L)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=256, help="the paper uses 8192; smaller trains much faster on CPU")
    p.add_argument("--eval-examples", type=int, default=256)
    p.add_argument("--png", default=str(pathlib.Path(__file__).with_name("mqar.png")))
    p.add_argument("--from-log", help="no training: redraw the table and PNG from a saved run's output")
    args = p.parse_args()
    if args.from_log:
        rows = rows_from_log(args.from_log)
        print_table(rows)
        plot(rows, args.png)
        return
    print(machine())
    print(f"steps {args.steps} ({args.short_steps} on {SHORT_MIX}, then {TRAIN_MIX}) x {args.tokens} tokens, "
          f"lr {args.lr}, vocab {args.vocab}, eval {args.eval_examples} sequences per setting", flush=True)
    t_all = time.perf_counter()
    rows = []
    for name in args.models:
        t = time.perf_counter()
        r = train_and_eval(name, args)
        rows.append(r)
        accs = "  ".join(f"L{L}/D{D} {a:.3f}" for (L, D), a in r["acc"].items())
        print(f"{name:13s} (train {r['train_s']:4.0f} s, all {time.perf_counter() - t:4.0f} s, loss "
              f"{r['final_loss']:.3f}) {accs}", flush=True)
        for (L, D), a in r["acc"].items():
            print(f"RESULT mqar model={name} L={L} pairs={D} accuracy={a:.4f} state_bytes={r['state'][(L, D)]}")
    print_table(rows, time.perf_counter() - t_all)
    plot(rows, args.png)


if __name__ == "__main__":
    main()
