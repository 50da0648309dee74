"""Which settings make the training step fastest on this machine: several variants of the
trainer's step on the `bench` shape, each compiled once, timed interleaved in one process.

    python benchmarks/train_options.py                                   # the default candidates
    python benchmarks/train_options.py --variant base: --variant dots:remat=dots --rounds 5

A variant is ``name:key=value,key=value``: model fields (``remat``, ``attention_impl``,
``scan_layers``, ...) and ``span_chunk`` (the query rows per chunk of the dense causal path,
``glocal.kernels.api._SPAN_CHUNK``; 0 = one dense pass over all keys). The first variant is
the reference of the ratios. ``xla=FLAGS`` (last in a variant: it takes the rest of the string)
runs that variant in its own worker process with ``XLA_FLAGS=FLAGS`` (flags are read once per
process), e.g. ``sched:xla=--xla_cpu_enable_concurrency_optimized_scheduler=false``. Rounds run every variant once in a rotating order, so drift of
this shared machine hits all alike; each cell is the median step time of ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_throughput as tt  # noqa: E402


DEFAULT_VARIANTS = (
    "default:",
    "remat_dots:remat=dots",
    "remat_all_dots:remat=all_dots",
    "unrolled:scan_layers=false",
    "chunk128:span_chunk=128",
    "chunk_none:span_chunk=0",
    "dot_product:attention_impl=dot_product",
)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--preset", default="bench")
    return p.parse_args()


class Worker:
    """A variant in its own process (train_throughput.py --serve) under other XLA_FLAGS."""

    def __init__(self, args, sets: list[str], flags: str, chunk: int | None):
        cmd = [sys.executable, str(pathlib.Path(tt.__file__)), "--serve", "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype, "--preset", args.preset]
        cmd += [a for kv in sets for a in ("--set", kv)] + (["--span-chunk", str(chunk)] if chunk is not None else [])
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the worker for XLA_FLAGS={flags!r} did not start; run {' '.join(cmd)} to see why")
        self.info = json.loads(line)["ready"]
        self.info["config"] = {**self.info["config"], "XLA_FLAGS": flags,
                               **({"span_chunk": chunk} if chunk is not None else {})}

    def run(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]


def build(args, spec: str):
    name, _, settings = spec.partition(":")
    settings, _, flags = settings.partition("xla=")
    pairs = [kv.split("=", 1) for kv in settings.split(",") if kv]
    chunk = next((int(v) for k, v in pairs if k == "span_chunk"), None)
    if flags:
        side = Worker(args, [f"{k}={v}" for k, v in pairs if k != "span_chunk"], flags, chunk)
        print(f"built {name}: {side.info['config']}", flush=True)
        return name, side
    ns = argparse.Namespace(**{**vars(args), "set": [f"{k}={v}" for k, v in pairs if k != "span_chunk"],
                               "remat": None, "no_scan": False})
    side = tt.GlocalSide(ns)
    with tt.span_chunk(chunk):
        side.run(1 + args.warmup)  # the first call traces and compiles under the chunk setting
    print(f"built {name}: {side.info['config']}" + (f", span_chunk {chunk}" if chunk is not None else ""), flush=True)
    return name, side


def main():
    args = parse()
    print(tt.machine())
    sides = [build(args, spec) for spec in (args.variant or DEFAULT_VARIANTS)]
    tok = args.batch * args.seq
    rates = {name: [] for name, _ in sides}
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for name, side in order:
            rates[name].append(tok / statistics.median(side.run(args.steps)))
        print(f"round {r + 1}: " + "  ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()), flush=True)
    ref = sides[0][0]
    print(f"\n| variant | tokens/s per round | median | vs {ref} (median of per-round ratios) |\n|---|---|---|---|")
    for name, v in rates.items():
        ratio = statistics.median(a / b for a, b in zip(v, rates[ref]))
        print(f"| {name} | {', '.join(f'{x:,.0f}' for x in v)} | {statistics.median(v):,.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
