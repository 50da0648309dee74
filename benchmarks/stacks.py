"""The two supported stacks side by side: the bench-shape training throughput and one decode
figure, each run alternately on stack A and stack B (A B A B ...) so that drift of this
noisy machine hits both alike; prints every run, the medians and the B/A ratios.

    python benchmarks/stacks.py --a .venv311/bin/python --b .venv312/bin/python [--rounds 3]

Each run is a fresh process of benchmarks/train_throughput.py (float32, remat none, the
trainer's default) or benchmarks/decode.py (the same bench shape, batch 16),
started with that stack's interpreter (each venv has glocal installed).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess

HERE = pathlib.Path(__file__).parent
RUNS = {
    "train tokens/s (bench shape, f32, remat none)":
        (["train_throughput.py", "--steps", "6", "--remat", "none"], r"RESULT glocal_train .*tokens_per_s=([\d.]+)"),
    "decode tokens/s (batch 16, prompt 256, 64 new)":
        (["decode.py", "--prompt-len", "256", "--new", "64", "--batches", "16", "--iters", "2"],
         r"RESULT glocal_decode batch=16 decode_tokens_per_s=([\d.]+)"),
}


def run_once(python: str, args: list[str], pattern: str) -> tuple[float, str]:
    proc = subprocess.run([python, str(HERE / args[0]), *args[1:]], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=1200)
    found = re.search(pattern, proc.stdout)
    if proc.returncode or not found:
        raise SystemExit(f"{python} {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    version = subprocess.run([python, "-c", "import jax, sys; print(f'jax {jax.__version__}, Python {sys.version.split()[0]}')"],
                             capture_output=True, text=True).stdout.strip()
    return float(found.group(1)), version


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="stack A's python")
    p.add_argument("--b", required=True, help="stack B's python")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    for name, (cmd, pattern) in RUNS.items():
        got = {"a": [], "b": []}
        names = {}
        for r in range(args.rounds):
            for side in ("a", "b"):
                value, names[side] = run_once(getattr(args, side), cmd, pattern)
                got[side].append(value)
                print(f"{name} round {r + 1} {side} ({names[side]}): {value:,.1f}", flush=True)
        ratios = [b / a for a, b in zip(got["a"], got["b"])]
        print(f"RESULT {name}: A {names['a']} median {statistics.median(got['a']):,.1f}; "
              f"B {names['b']} median {statistics.median(got['b']):,.1f}; B/A per round "
              f"{', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f})", flush=True)


if __name__ == "__main__":
    main()
