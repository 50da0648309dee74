"""Training throughput and MFU of the trainer's step on the `bench` shape, optionally paired
with PyTorch (Hugging Face ``LlamaForCausalLM`` of the same shape) in one interleaved run.

    python benchmarks/train_throughput.py                         # glocal alone
    python benchmarks/train_throughput.py --peer torch --rounds 5 # glocal vs torch, interleaved
    python benchmarks/train_throughput.py --dtype bfloat16 --peer torch
    python benchmarks/train_throughput.py --set remat=all_dots --set attention_impl=xla

glocal's side is ``glocal.train.build``'s jitted step, the one ``glocal train`` runs: loss,
gradients, global-norm clipping, AdamW with its decay mask and schedule, donated buffers. The
model is the ``bench`` preset at its defaults unless ``--set`` overrides a field. The torch
side (benchmarks/hf_llama_baseline.py, started with ``--serve`` in its own process, from
``--torch-python``) clips and steps AdamW the same way. Each round times ``--steps`` steps of
one side then the other (the order alternates between rounds, so drift of this shared machine
hits both alike); the ratio is taken per round and its median reported.

Shape: d_model 512, 8 layers, 8 heads, ffn 1408 (SwiGLU), vocab 256, seq 512, batch 8.
FLOPs per token (training = 3x forward), the same formula on both sides:
    6 * N_matmul                 (all matmul parameters incl. the output head; the
                                  embedding lookup is not a matmul and is excluded)
  + 6 * n_layers * T * d_model   (attention scores + values, 12 L T d, HALF for the causal mask)
MFU = model FLOPs/s / the machine's dense matmul FLOP/s measured here (best of 3 shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine, matmul_peak_flops  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.kernels import api  # noqa: E402
from glocal.platform_defaults import resolve_remat  # noqa: E402
from glocal.train.build import build_setup  # noqa: E402
from glocal.train.config import TrainConfig  # noqa: E402

HERE = pathlib.Path(__file__).parent


@contextlib.contextmanager
def span_chunk(rows: int | None):
    """Trace with ``rows`` query rows per causal chunk (0: no chunking)."""
    saved = api._SPAN_CHUNK
    if rows is not None:
        api._SPAN_CHUNK = rows if rows > 0 else 1 << 30  # larger than any T: the path is skipped
    try:
        yield
    finally:
        api._SPAN_CHUNK = saved


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the first round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of both sides (glocal keeps float32 parameters; torch casts the model)")
    p.add_argument("--torch-bf16", choices=["pure", "autocast"], default="autocast",
                   help="torch's bf16: float32 weights with autocast (like glocal's; default) or the whole model cast")
    p.add_argument("--preset", default="bench")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model field for glocal's side, e.g. remat=all_dots, attention_impl=xla, scan_layers=false")
    p.add_argument("--remat", default=None, help="shorthand for --set remat=...")
    p.add_argument("--no-scan", action="store_true", help="shorthand for --set scan_layers=false")
    p.add_argument("--peer", choices=["none", "torch"], default="none")
    p.add_argument("--torch-python", default=sys.executable, help="the Python that has torch + transformers")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak (no MFU)")
    p.add_argument("--span-chunk", type=int, default=None,
                   help="query rows per chunk of the dense causal path (0: one pass over all keys)")
    p.add_argument("--serve", action="store_true",
                   help="be a worker: build glocal's side, print one JSON line, then time N steps per line of "
                        "stdin (benchmarks/train_options.py runs variants with other XLA_FLAGS this way)")
    return p.parse_args()


class GlocalSide:
    """glocal's trainer step on the benchmark batch: ``run(n)`` times n steps."""

    def __init__(self, args):
        overrides = dict(kv.split("=", 1) for kv in args.set)
        if args.remat:
            overrides["remat"] = args.remat
        if args.no_scan:
            overrides["scan_layers"] = "false"
        mcfg = gm.get_config("transformer", args.preset, dtype=args.dtype, max_seq_len=max(args.seq, 512))
        self.mcfg = mcfg = mcfg.replace(**overrides) if overrides else mcfg
        tcfg = TrainConfig(batch_size=args.batch, seq_len=args.seq, steps=10_000, learning_rate=3e-4,
                           warmup_steps=0, lr_schedule="constant")
        self.setup = setup = build_setup(mcfg, tcfg)
        params = setup.init_params()
        self.state = {"p": params, "o": setup.init_opt(params)}
        B, T = args.batch, args.seq
        tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, (1, B, T + 1)).astype(np.int32)
        ones = np.ones((1, B, T), np.int32)  # one document per row, every token counted
        batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "positions": np.cumsum(ones, -1) - 1,
                 "segment_ids": ones, "loss_mask": ones.astype(np.float32)}
        self.batch = jax.device_put(batch, setup.batch_sh)
        # Matmul parameters: everything but norm scales and the embedding table (a lookup).
        n_matmul = sum(v.size for path, v in nnx.to_flat_state(params)
                       if not any("norm" in str(k) for k in path) and "table_VD" not in path)
        self.info = {"params": setup.n_params,
                     "flops_per_token": 6 * n_matmul + 6 * mcfg.num_layers * T * mcfg.d_model,
                     "config": {k: getattr(mcfg, k) for k in ("dtype", "remat", "scan_layers", "attention_impl")}}
        if mcfg.remat == "auto":  # show what it resolved to on this platform
            self.info["config"]["remat"] = f"auto={resolve_remat('auto')}"
        self.shape = dict(d_model=mcfg.d_model, layers=mcfg.num_layers, heads=mcfg.num_heads,
                          kv_heads=mcfg.num_kv_heads, d_ff=mcfg.d_ff, vocab=mcfg.vocab_size, seq=T, batch=B)

    def step(self):
        s = self.state
        s["p"], s["o"], metrics = self.setup.train_step(s["p"], s["o"], self.batch)
        return float(metrics["loss"])  # waits for the step

    def run(self, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return times

    def compiled_text(self) -> str:
        """The optimised HLO of the step (the compile cache makes this a lookup after a run)."""
        s = self.state
        return self.setup.train_step.lower(s["p"], s["o"], self.batch).compile().as_text()


class TorchPeer:
    """The torch worker process (hf_llama_baseline.py --serve)."""

    def __init__(self, args, shape, mcfg, extra=()):
        cmd = [args.torch_python, str(HERE / "hf_llama_baseline.py"), "--serve", "--warmup", str(args.warmup),
               "--dtype", args.dtype, "--bf16-mode", args.torch_bf16,
               "--norm-eps", str(mcfg.norm_eps), "--rope-theta", str(mcfg.rope_theta)]
        cmd += [a for k, v in shape.items() for a in (f"--{k.replace('_', '-')}", str(v))] + list(extra)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the torch peer did not start ({' '.join(cmd)}); does {args.torch_python} have torch and "
                     f"transformers? Pass --torch-python.")
        self.info = json.loads(line)["ready"]

    def run(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve(args):
    side = GlocalSide(args)
    with span_chunk(args.span_chunk):  # the first call traces under it
        side.run(1 + args.warmup)
    print(json.dumps({"ready": side.info}, default=str), flush=True)
    for line in sys.stdin:
        print(json.dumps({"times": side.run(int(line))}), flush=True)


def main():
    args = parse()
    if args.serve:
        return serve(args)
    print(machine())
    peak = None
    if not args.no_peak:
        peaks = matmul_peak_flops()
        for shape, f in peaks.items():
            print(f"matmul {shape} float32: {f / 1e9:.1f} GFLOP/s")
        peak = max(peaks.values())
    side = GlocalSide(args)
    run_glocal, info = side.run, side.info
    print(f"glocal: params {info['params']:,}; FLOPs/token {info['flops_per_token']:,}; {info['config']}")
    t0 = time.perf_counter()
    with span_chunk(args.span_chunk):
        run_glocal(1)
    print(f"glocal: first step (compile) {time.perf_counter() - t0:.1f} s")
    run_glocal(max(args.warmup - 1, 0))
    sides = {"glocal": run_glocal}
    peer = None
    if args.peer == "torch":
        peer = TorchPeer(args, side.shape, side.mcfg)
        print(f"torch: {peer.info}")
        sides["torch"] = peer.run
    tok = args.batch * args.seq
    rates = {name: [] for name in sides}
    ratios = []
    for r in range(args.rounds):
        names = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in names:
            rates[name].append(tok / statistics.median(sides[name](args.steps)))
        line = "  ".join(f"{n} {rates[n][-1]:,.1f} tok/s" for n in sides)
        if peer:
            ratios.append(rates["glocal"][-1] / rates["torch"][-1])
            line += f"  ratio {ratios[-1]:.3f}"
        print(f"round {r + 1}: {line}", flush=True)
    if peer:
        peer.close()
    med = {n: statistics.median(v) for n, v in rates.items()}
    gflops = med["glocal"] * info["flops_per_token"] / 1e9
    mfu = f"; MFU {100 * gflops * 1e9 / peak:.1f}%" if peak else ""
    print(f"glocal: median {med['glocal']:,.1f} tokens/s; model {gflops:.1f} GFLOP/s{mfu}")
    if peer:
        print(f"torch:  median {med['torch']:,.1f} tokens/s; model "
              f"{med['torch'] * info['flops_per_token'] / 1e9:.1f} GFLOP/s")
        print(f"glocal / torch per round {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
    print(f"RESULT glocal_train dtype={args.dtype} remat={info['config']['remat']} tokens_per_s={med['glocal']:.1f}"
          + (f" mfu={gflops * 1e9 / peak:.3f}" if peak else "")
          + (f" torch_tokens_per_s={med['torch']:.1f} ratio={statistics.median(ratios):.3f}" if peer else ""))


if __name__ == "__main__":
    main()
