"""Bit-for-bit snapshot of every family's outputs, for checking that a refactor changes
structure and not numbers.

    python benchmarks/snapshot.py --save before.npz      # on the old code
    python benchmarks/snapshot.py --compare before.npz   # on the new code: exit 1 on any difference

For each case (every family's tiny preset plus variants that reach the optional paths:
window layers, expert choice in both routing modes, capacity dispatch with a selection bias,
Based's kernels) it records the forward logits and aux values, prefill + two decode steps,
and the parameters, optimizer state norms and metrics after one train step of the trainer's
own step function. Arrays are compared with ``np.array_equal`` (bit-identical).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import glocal.models as gm
from glocal.train import optim, step as steplib
from glocal.train.config import TrainConfig

CASES = {
    "transformer": ("transformer", {}),
    "transformer_sg": ("transformer", dict(layer_pattern="sg", sliding_window=8)),
    "fit": ("fit", {}),
    "block": ("block", {}),
    "based": ("based", {}),
    "based_quadratic": ("based", dict(linear_impl="quadratic", feature_map="elu")),
    "moe": ("moe", {}),
    "moe_ec_topk": ("moe", dict(router="expert_choice")),
    "moe_ec_threshold": ("moe", dict(router="expert_choice", routing_mode="threshold")),
    "moe_capacity_bias": ("moe", dict(moe_impl="capacity", router_bias_rate=0.01, shared_experts=1)),
    "moe_mixtral": ("moe", {"preset": "mixtral_tiny"}),
    "mor": ("mor", {}),
    "mor_tc": ("mor", dict(recursion_router="token_choice")),
    "mor_threshold": ("mor", dict(routing_mode="threshold")),
}


def snapshot(name: str, family: str, overrides: dict) -> dict[str, np.ndarray]:
    overrides = dict(overrides)
    preset = overrides.pop("preset", "tiny")
    model = gm.build(family, preset, seed=0, **overrides)
    cfg = model.config
    T = min(cfg.max_seq_len, 32)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    out = {}
    logits, aux = model(tokens)
    out["logits"] = np.asarray(logits)
    for k, (v, w) in sorted(aux.items()):
        out[f"aux/{k}"] = np.asarray(v)
    cache = model.init_cache(2, T + 4)
    lengths = jnp.array([T, T // 2], jnp.int32)
    l0, cache = model.prefill(tokens, lengths, cache)
    out["prefill"] = np.asarray(l0)
    for i in range(2):
        li, cache = model.decode(tokens[:, i], cache)
        out[f"decode{i}"] = np.asarray(li)
    out["cache_nbytes"] = np.asarray(model.cache_nbytes(2, T))
    out["flops"] = np.asarray(model.flops_per_token(T))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tcfg = TrainConfig(steps=10, warmup_steps=2)
    tx = optim.make_optimizer(tcfg, params)
    opt_state = tx.init(params)
    merge = lambda p: nnx.merge(graphdef, p, rest)
    step = jax.jit(steplib.make_train_step(merge, tx, z_loss=1e-4))
    batch = {"inputs": tokens[None], "targets": jnp.roll(tokens, -1, axis=1)[None],
             "positions": jnp.broadcast_to(jnp.arange(T), (1, 2, T)),
             "segment_ids": jnp.ones((1, 2, T), jnp.int32), "loss_mask": jnp.ones((1, 2, T), jnp.float32)}
    params, opt_state, metrics = step(params, opt_state, batch)
    for k, v in sorted(metrics.items()):
        out[f"metric/{k}"] = np.asarray(v)
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params) if hasattr(nnx, "to_pure_dict") else params)[0]:
        out["param/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    out["opt_state_sq"] = np.asarray(sum(float(jnp.sum(jnp.square(x.astype(jnp.float32))))
                                         for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")))
    return {f"{name}|{k}": v for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--save")
    ap.add_argument("--compare")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    arrays = {}
    for name in args.cases:
        family, overrides = CASES[name]
        arrays.update(snapshot(name, family, overrides))
        print(f"{name}: {sum(k.startswith(name + '|') for k in arrays)} arrays", flush=True)
    if args.save:
        np.savez(args.save, **arrays)
    if args.compare:
        want = dict(np.load(args.compare))
        want = {k: v for k, v in want.items() if k.split("|")[0] in args.cases}
        missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        diff = [k for k in sorted(set(want) & set(arrays)) if not np.array_equal(want[k], arrays[k])]
        for k in missing[:20]:
            print("missing:", k)
        for k in extra[:20]:
            print("extra:", k)
        for k in diff[:40]:
            print("differs:", k, float(np.max(np.abs(want[k].astype(np.float64) - arrays[k].astype(np.float64)))))
        print(f"compared {len(want)} arrays: {len(diff)} differ, {len(missing)} missing, {len(extra)} extra")
        return 1 if (diff or missing or extra) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
