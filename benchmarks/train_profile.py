"""Where a training step's time goes: glocal's trainer step (jax.profiler trace, per XLA
thunk, attributed to glocal's source) beside PyTorch's (torch.profiler, per aten op).

    python benchmarks/train_profile.py                       # bench shape, float32, 3 steps
    python benchmarks/train_profile.py --peer torch          # and the HF Llama step of the same shape
    python benchmarks/train_profile.py --set remat=all_dots --top 30

XLA:CPU runs a step as thunks (fusions, matmuls, loops) on a pool of threads, several at a
time when they are independent; the trace records each thunk's start and end on its thread.
Each instant of the step is divided among the thunks running then (two concurrent thunks get
half each), so a thunk's *wall share* says how much of the step it accounts for and the
shares add up to the time any thunk ran ("busy"; the rest of the wall time is dispatch and
host work). Loops (the layer scan's ``while``) only wait for their body's thunks and are not
counted themselves. Each thunk is charged to the innermost glocal / optax / flax source line
that produced it (from the compiled HLO's stack frames) and to a kind: ``matmul`` when its
computation contains a dot, ``copy`` for copies and transposes, ``other`` otherwise; ``bwd``
marks the backward pass (``transpose(...)`` in the op name).
"""

from __future__ import annotations

import argparse
import collections
import glob
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import jax
from jax.profiler import ProfileData

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_throughput as tt  # noqa: E402

HERE = pathlib.Path(__file__).parent
SOURCES = ("glocal/", "optax/", "flax/", "jax/_src/nn", "jax/_src/numpy")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--preset", default="bench")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=20, help="rows of each table")
    p.add_argument("--peer", choices=["none", "torch"], default="none")
    p.add_argument("--torch-python", default=sys.executable)
    args = p.parse_args()
    args.remat, args.no_scan = None, False
    return args


class Hlo:
    """Source and kind of each instruction of a compiled HLO module's text."""

    def __init__(self, text: str):
        table = lambda name: dict(re.findall(r"^(\d+) (.*)$", _section(text, name), re.M))
        files, funcs = table("FileNames"), table("FunctionNames")
        self.locs = {int(k): (files[f].strip('"'), funcs[g].strip('"'), int(line)) for k, f, g, line in
                     re.findall(r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", text, re.M)}
        self.frames = {int(k): (int(loc), int(parent)) for k, loc, parent in
                       re.findall(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", text, re.M)}
        self.comps = {}  # computation name -> its body text
        for m in re.finditer(r"^(?:ENTRY )?%(\S+) [^\n]*\{\n(.*?)^\}", text, re.M | re.S):
            self.comps[m.group(1)] = m.group(2)
        self.instr = {}  # instruction name -> its line
        for body in self.comps.values():
            for line in body.splitlines():
                m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
                if m:
                    self.instr[m.group(1)] = line

    def source(self, frame: int) -> str:
        """The innermost frame in glocal (else optax / flax / jax.nn), as ``file.py:function:line``."""
        seen = set()
        while frame and frame not in seen:
            seen.add(frame)
            loc, parent = self.frames.get(frame, (0, 0))
            file, func, line = self.locs.get(loc, ("?", "?", 0))
            if any(s in file for s in SOURCES):
                return f"{file.split('/')[-1]}:{func}:{line}"
            frame = parent
        return "?"

    def describe(self, name: str) -> tuple[str, str, str]:
        """``(kind, source, direction)`` of the thunk named ``name``."""
        line = self.instr.get(name, "")
        called = re.search(r"calls=%(\S+?)[,}\s]", line)
        body = self.comps.get(called.group(1), "") if called else ""
        op = re.search(r"=.*?\s([a-z][\w-]*)\((?:%|\))", line)  # the opcode: the first name called on operands
        op = op.group(1) if op else "?"
        if " dot(" in body or op in ("dot", "custom-call") and "dot" in name:
            kind = "matmul"
        elif op == "while":
            kind = "loop"
        elif op in ("copy", "transpose") or re.fullmatch(r"(copy|transpose)[\w.]*_fusion[\w.]*", name):
            kind = "copy"
        else:
            kind = "other"
        frame = re.search(r"stack_frame_id=(\d+)", line)
        source = self.source(int(frame.group(1))) if frame else "?"
        op_name = re.search(r'op_name="([^"]*)"', line)
        direction = "bwd" if op_name and "transpose(" in op_name.group(1) else "fwd"
        return kind, source, direction


def _section(text: str, name: str) -> str:
    m = re.search(rf"^{name}\n(.*?)(?=^[A-Z]\w+\n|^%|^ENTRY)", text, re.M | re.S)
    return m.group(1) if m else ""


def wall_shares(xplane: str, module: str) -> tuple[dict[str, float], dict[str, float], float]:
    """``(wall share, thread-time, busy wall)`` in nanoseconds over the profiled steps.

    Only leaf thunks count (a thunk with another nested inside it on its thread, a ``while``
    loop, is bookkeeping plus waiting). A thunk's *wall share* divides each instant among the
    thunks running then (two concurrent thunks get half each), so the shares add up to the
    busy wall time; its *thread-time* is its plain duration, which double-counts concurrency."""
    warnings.filterwarnings("ignore", message="builtin type event_stats", category=DeprecationWarning)
    leaves = []  # (start, end, name)
    for plane in ProfileData.from_file(xplane).planes:
        for line in plane.lines:
            events = sorted(((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                             if dict(e.stats).get("hlo_module") == module), key=lambda e: (e[0], -e[1]))
            for i, (start, end, name) in enumerate(events):
                nested = i + 1 < len(events) and events[i + 1][0] < end
                if not nested:
                    leaves.append((start, end, name))
    bounds = sorted({t for start, end, _ in leaves for t in (start, end)})
    opening = collections.defaultdict(list)
    for start, end, name in leaves:
        opening[start].append((end, name))
    share, thread = collections.Counter(), collections.Counter()
    for start, end, name in leaves:
        thread[name] += end - start
    running, busy = [], 0.0
    for t0, t1 in zip(bounds, bounds[1:]):
        running = [(end, name) for end, name in running if end > t0] + opening.get(t0, [])
        if running:
            busy += t1 - t0
            for _, name in running:
                share[name] += (t1 - t0) / len(running)
    return share, thread, busy


def profile_glocal(args):
    side = tt.GlocalSide(args)
    side.run(args.warmup)
    text = side.compiled_text()
    module = re.match(r"HloModule (\S+?),", text).group(1)
    folder = tempfile.mkdtemp(prefix="glocal_profile_")
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = 3  # per-thunk events
    jax.profiler.start_trace(folder, profiler_options=options)
    t0 = time.perf_counter()
    side.run(args.steps)
    wall = (time.perf_counter() - t0) / args.steps
    jax.profiler.stop_trace()
    share, thread, busy = wall_shares(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0], module)
    shutil.rmtree(folder, ignore_errors=True)
    hlo = Hlo(text)
    n = args.steps
    rows = [(share[name] / n / 1e6, thread[name] / n / 1e6, name, *hlo.describe(name)) for name in share]
    return wall, busy / n / 1e6, rows, side.info


def report(wall, busy, rows, info, top):
    thread = sum(r[1] for r in rows)
    print(f"PROFILE glocal wall {wall * 1e3:.1f} ms/step (profiler on); thunks busy {busy:.1f} ms/step of it, "
          f"{thread / max(busy, 1e-9):.2f} running at a time on average; {info['config']}")
    for title, key in (("kind", lambda r: (r[3], r[5])), ("source (kind, direction)", lambda r: (r[4], r[3], r[5]))):
        agg = collections.Counter()
        for r in rows:
            agg[key(r)] += r[0]
        print(f"\nby {title}: wall ms/step, % of busy")
        for k, ms in agg.most_common(top):
            print(f"  {ms:8.2f}  {100 * ms / busy:5.1f}%  {' '.join(k)}")
    print("\ntop thunks: wall ms/step, %, thread ms/step, name, kind, source, direction")
    for ms, th, name, kind, source, direction in sorted(rows, reverse=True)[:top]:
        print(f"  {ms:8.2f}  {100 * ms / busy:5.1f}%  {th:8.2f}  {name}  {kind}  {source}  {direction}")


def main():
    args = parse()
    print(tt.machine())
    report(*profile_glocal(args), args.top)
    if args.peer == "torch":
        mcfg = tt.gm.get_config("transformer", args.preset)
        shape = dict(d_model=mcfg.d_model, layers=mcfg.num_layers, heads=mcfg.num_heads, kv_heads=mcfg.num_kv_heads,
                     d_ff=mcfg.d_ff, vocab=mcfg.vocab_size, seq=args.seq, batch=args.batch)
        cmd = [args.torch_python, str(HERE / "hf_llama_baseline.py"), "--profile", str(args.steps), "--warmup",
               str(args.warmup), "--dtype", args.dtype, "--bf16-mode", "autocast", "--norm-eps", str(mcfg.norm_eps)]
        cmd += [a for k, v in shape.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        print()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
