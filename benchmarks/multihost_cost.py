"""What running as several processes costs on this machine: the per-step stop agreement
(``glocal.train.distributed.agree``, one tiny all-gather) in microseconds, and training
throughput of 2 processes x 4 CPU devices against 1 process x 8 on the same mesh.

    python benchmarks/multihost_cost.py            # prints a table

Runs its own workers (the environment ``glocal launch`` gives); CPU only, 2 cores: the
throughput ratio measures gloo over loopback against in-process collectives, not a pod.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def worker() -> None:
    from glocal.train import distributed

    distributed.maybe_initialize()
    import jax

    distributed.agree(False)  # compile
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        distributed.agree(False)
    us = (time.perf_counter() - t) / n * 1e6
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"agree_us": us}))


def _agree_cost() -> float:
    from glocal.launch import free_port, process_env

    port, procs = free_port(), []
    for i in range(2):
        env = process_env({**os.environ, "JAX_PLATFORMS": "cpu"}, index=i, processes=2, port=port, devices=4,
                          heartbeat=30)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker"], env=env, stdout=subprocess.PIPE,
                                      text=True, cwd=ROOT))
    out = [p.communicate(timeout=300)[0] for p in procs][0]
    return json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][0][7:])["agree_us"]


def _throughput(processes: int, devices: int, workdir: pathlib.Path) -> float:
    args = ["--config", "transformer_tiny", "steps=60", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
            "sharding=fsdp_tp", "log_every=1", "checkpoint_every=0", "eval_every=0", "eval_batches=1",
            "sample_tokens=0", "tensorboard=false", "batch_size=16", "seq_len=128"]
    subprocess.run([sys.executable, "-m", "glocal.cli", "launch", "-n", str(processes), "--devices-per-process",
                    str(devices), "--", "train", "--workdir", str(workdir), *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m and m["step"] > 10]  # after compilation and warm-up
    return sum(m["tokens_per_s"] for m in steps) / len(steps)


def main() -> None:
    print(f"agreement all-gather, 2 processes x 4 CPU devices: {_agree_cost():.0f} us per step")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for rep in range(2):  # interleaved: this machine's speed drifts
            for procs, devs in ((1, 8), (2, 4)):
                rows.append((procs, devs, _throughput(procs, devs, pathlib.Path(tmp) / f"{procs}_{rep}")))
    print("| processes x devices | tokens/s (mean of steps 11-60), two interleaved runs |")
    print("|---|---|")
    for procs, devs in ((1, 8), (2, 4)):
        vals = [r[2] for r in rows if r[:2] == (procs, devs)]
        print(f"| {procs} x {devs} | {', '.join(f'{v:,.0f}' for v in vals)} |")
    one = sum(r[2] for r in rows if r[0] == 1) / 2
    two = sum(r[2] for r in rows if r[0] == 2) / 2
    print(f"2 x 4 / 1 x 8 throughput: {two / one:.2f}")


if __name__ == "__main__":
    worker() if "--worker" in sys.argv else main()
