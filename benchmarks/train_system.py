"""Training-system overheads: (1) the sharded step on 8 fake CPU devices vs one device for
the same global batch, (2) step time with async checkpoints every N steps vs none.

    python benchmarks/train_system.py sharded [--config transformer_small --batch 16 --seq 256] [--no-scan]
    python benchmarks/train_system.py checkpoint [--config transformer_small --steps 100 --every 25]

Fake devices share the machine's cores, so (1) measures partitioning overhead (collectives,
resharding, smaller per-device matmuls), not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if len(sys.argv) > 1 and sys.argv[1] == "sharded":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import machine, median  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.train.build import build_setup  # noqa: E402
from glocal.train.config import TrainConfig  # noqa: E402
from glocal.train.trainer import train  # noqa: E402

MESHES = {"1 device": ({"data": 1}, "fsdp", 1), "8 dev dp": ({"data": 8}, "dp", 8),
          "8 dev fsdp": ({"data": 2, "fsdp": 4}, "fsdp", 8),
          "8 dev fsdp_tp": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", 8)}


def step_time(mcfg, batch, seq, mesh_sizes, table, n_dev, iters=8) -> float:
    tcfg = TrainConfig().replace(batch_size=batch, seq_len=seq, sharding=table,
                                 **{f"mesh_{k}": v for k, v in {"data": 1, **mesh_sizes}.items()})
    s = build_setup(mcfg, tcfg, devices=jax.devices()[:n_dev])
    rng = np.random.default_rng(0)
    arrays = {"inputs": rng.integers(0, 256, (1, batch, seq)), "targets": rng.integers(0, 256, (1, batch, seq)),
              "positions": np.broadcast_to(np.arange(seq), (1, batch, seq)),
              "segment_ids": np.ones((1, batch, seq)), "loss_mask": np.ones((1, batch, seq))}
    b = {k: jax.device_put(jnp.asarray(v, jnp.float32 if k == "loss_mask" else jnp.int32), s.batch_sh)
         for k, v in arrays.items()}
    with jax.set_mesh(s.mesh):
        p = s.init_params()
        o = s.init_opt(p)
        times = []
        for i in range(iters + 2):
            t = time.perf_counter()
            p, o, m = s.train_step(p, o, b)
            jax.block_until_ready(m)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return median(times)


def sharded(args) -> None:
    print(f"# {machine()}; {args.config} batch {args.batch} x seq {args.seq}, "
          f"{'unrolled' if args.no_scan else 'scanned'} layers")
    name, preset = gm.split_config_name(args.config)
    mcfg = gm.get_config(name, preset, scan_layers=not args.no_scan)
    base = None
    for label, (sizes, table, n) in MESHES.items():
        t = step_time(mcfg, args.batch, args.seq, sizes, table, n)
        base = base or t
        print(f"{label:14s} {1000 * t:8.1f} ms/step   ratio to 1 device {t / base:.2f}")


def checkpoint(args) -> None:
    print(f"# {machine()}; {args.config}, {args.steps} steps, batch {args.batch} x seq {args.seq}")
    results = {}
    for every in (0, args.every, 0, args.every):  # interleaved pairs
        with tempfile.TemporaryDirectory() as wd:
            out = train(args.config, wd, {"steps": str(args.steps), "batch_size": str(args.batch),
                                          "seq_len": str(args.seq), "checkpoint_every": str(every),
                                          "log_every": "5", "sample_tokens": "0", "eval_batches": "1",
                                          "tensorboard": "false"})
        # tokens/s over the run after the first logged interval (compile excluded)
        tps = [h["tokens_per_s"] for h in out["history"][1:]]
        results.setdefault(every, []).append(float(np.mean(tps)))
        print(f"checkpoint_every={every:3d}: {np.mean(tps):,.0f} tokens/s")
    none, some = np.mean(results[0]), np.mean(results[args.every])
    print(f"async saves every {args.every} steps: step time {none / some:.3f}x of no saves")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["sharded", "checkpoint"])
    ap.add_argument("--config", default="transformer_small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--no-scan", action="store_true", help="unroll the layers (scan_layers=false)")
    a = ap.parse_args()
    {"sharded": sharded, "checkpoint": checkpoint}[a.what](a)
