"""Mixture-of-experts: dispatch implementations, MoE vs the dense model with the same active
parameters, and expert parallelism on 8 fake CPU devices.

    python benchmarks/moe.py                              # both sections, `small` presets
    python benchmarks/moe.py --sections dispatch --batch 8 --seq 256
    python benchmarks/moe.py --sections parallel          # spawns an 8-device process

Sections:
  dispatch  a training step's forward + backward (token loss + router losses, batch --batch x
            --seq, float32) of ``moe_small`` (8 experts, top-2) with ``moe_impl`` = dense /
            capacity (factor 1.25) / dropless, and of ``transformer_small`` (the same active
            parameters): median seconds, tokens/s, compiled temp memory (XLA memory analysis);
            also dropless with ``moe_gmm_impl=ragged_dot`` (XLA's own grouped matmul)
  parallel  the same step (dropless) on 8 fake CPU devices, mesh data 2 x expert 4 (experts
            split by shard_map + all_to_all), vs one device, same global batch

Lines starting with RESULT are machine-readable.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

if "--child-parallel" in sys.argv:  # the 8-device process: set before JAX starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine, median, time_fn  # noqa: E402

import glocal.models as gm  # noqa: E402


def step_fn(model):
    """jit(value_and_grad) of the mean token loss plus the weighted router losses."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, x):
        out = nnx.merge(graphdef, p)(x[:, :-1])
        logits, aux = out
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1).mean()
        return ce + sum(v * w for v, w in aux.values() if w is not None)

    return jax.jit(jax.value_and_grad(loss)), params


def measure(model, x, iters):
    step, params = step_fn(model)
    compiled = step.lower(params, x).compile()
    mem = compiled.memory_analysis().temp_size_in_bytes
    t = median(time_fn(lambda: jax.block_until_ready(compiled(params, x)), warmup=1, iters=iters))
    return t, mem


def section_dispatch(args):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, args.seq + 1)), jnp.int32)
    tokens = args.batch * args.seq
    print(f"\n## training step (forward + backward), batch {args.batch} x {args.seq} tokens, float32")
    runs = [("transformer_small (dense FFN 768)", "transformer", {}),
            ("moe dense dispatch", "moe", dict(moe_impl="dense")),
            ("moe capacity 1.25", "moe", dict(moe_impl="capacity", capacity_factor=1.25)),
            ("moe dropless (tiled gmm)", "moe", dict(moe_impl="dropless", moe_gmm_impl="tiled")),
            ("moe dropless (ragged_dot)", "moe", dict(moe_impl="dropless", moe_gmm_impl="ragged_dot"))]
    times = {}
    for label, family, kw in runs:
        model = gm.build(family, args.preset, max_seq_len=max(512, args.seq + 1), **kw)
        t, mem = measure(model, x, args.iters)
        times[label] = t
        print(f"{label:34s} {t * 1e3:8.1f} ms  {tokens / t:9,.0f} tok/s  temp {mem / 2**20:7.0f} MiB", flush=True)
        print(f"RESULT moe_dispatch run={label.replace(' ', '_')} seconds={t:.5f} tokens_per_s={tokens / t:.1f} "
              f"temp_bytes={mem}")
    drop = times["moe dropless (tiled gmm)"]
    print(f"dropless / dense model with the same active parameters: {drop / times['transformer_small (dense FFN 768)']:.2f}x"
          f" the step time")
    print(f"dense dispatch / dropless: {times['moe dense dispatch'] / drop:.2f}x")


def section_parallel(args):
    out = subprocess.run([sys.executable, __file__, "--child-parallel", "--batch", str(args.batch), "--seq",
                          str(args.seq), "--iters", str(args.iters), "--preset", args.preset],
                         capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(out.returncode)


def child_parallel(args):
    from jax.sharding import NamedSharding

    from glocal import sharding as shd

    print(machine())
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, args.seq + 1)), jnp.int32)
    tokens = args.batch * args.seq
    model = gm.build("moe", args.preset, max_seq_len=max(512, args.seq + 1), moe_impl="dropless")
    print(f"\n## expert parallelism: moe_{args.preset} dropless step, global batch {args.batch} x {args.seq}")
    one = jax.devices()[:1]
    with jax.set_mesh(shd.make_mesh(shd.mesh_shape({"data": 1}, 1), one)):
        t1, _ = measure(model, x, args.iters)
    print(f"1 device                 {t1 * 1e3:8.1f} ms  {tokens / t1:9,.0f} tok/s", flush=True)
    rules = shd.rule_table("fsdp")
    mesh = shd.make_mesh(shd.mesh_shape({"data": 2, "expert": 4}, 8))
    with jax.set_mesh(mesh), shd.use_rules(rules):
        step, params = step_fn(model)
        params = jax.device_put(params, shd.variable_shardings(params, mesh, rules))
        xs = jax.device_put(x, NamedSharding(mesh, shd.batch_spec(2)))
        compiled = step.lower(params, xs).compile()
        assert "all-to-all" in compiled.as_text()  # the expert-parallel dispatch, not a fallback
        t8 = median(time_fn(lambda: jax.block_until_ready(compiled(params, xs)), warmup=1, iters=args.iters))
    print(f"8 devices (data 2 x expert 4) {t8 * 1e3:8.1f} ms  {tokens / t8:9,.0f} tok/s  ({t8 / t1:.2f}x one device)")
    print(f"RESULT moe_parallel one_s={t1:.5f} eight_s={t8:.5f} ratio={t8 / t1:.3f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", default=["dispatch", "parallel"], choices=["dispatch", "parallel"])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--child-parallel", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_parallel:
        return child_parallel(args)
    print(machine())
    for s in args.sections:
        globals()[f"section_{s}"](args)


if __name__ == "__main__":
    main()
