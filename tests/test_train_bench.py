"""The training-speed benchmarks at toy sizes: benchmarks/train_throughput.py with its torch
peer (the peer must build the same model: its parameter count is checked against glocal's),
and benchmarks/train_profile.py (its trace parsing and HLO attribution depend on JAX
internals that move between versions, so they must not rot between runs)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOY = ["--preset", "tiny", "--batch", "2", "--seq", "64", "--warmup", "1"]


def script(name, *args, timeout=600):
    cache = os.path.abspath(os.environ.get("GLOCAL_JAX_CACHE", ROOT / ".jax_cache"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_paired_throughput_runs_both_sides_on_the_same_model():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = script("train_throughput.py", *TOY, "--steps", "1", "--rounds", "2", "--no-peak", "--peer", "torch")
    glocal_params = int(re.search(r"glocal: params ([\d,]+)", out).group(1).replace(",", ""))
    torch_params = int(re.search(r"'params': (\d+)", out).group(1))
    assert torch_params == glocal_params, out
    assert len(re.findall(r"^round \d: glocal [\d,.]+ tok/s  torch [\d,.]+ tok/s  ratio [\d.]+$", out, re.M)) == 2, out
    result = re.search(r"RESULT glocal_train .*tokens_per_s=([\d.]+) torch_tokens_per_s=([\d.]+) ratio=([\d.]+)", out)
    assert result and all(float(x) > 0 for x in result.groups()), out


@pytest.mark.slow
def test_profile_attributes_thunks_to_glocal_source():
    out = script("train_profile.py", *TOY, "--steps", "1", "--top", "50")
    wall, busy = map(float, re.search(r"wall ([\d.]+) ms/step .*?busy ([\d.]+) ms/step", out).groups())
    assert 0 < busy <= wall, out
    kinds = {m.group(2): float(m.group(1)) for m in re.finditer(r"^\s+([\d.]+)\s+[\d.]+%\s+(\w+ \w+)$", out, re.M)}
    # The forward and backward matmuls are found, and the kinds' wall shares add up to the busy time.
    assert kinds.get("matmul fwd", 0) > 0 and kinds.get("matmul bwd", 0) > 0, out
    assert sum(kinds.values()) == pytest.approx(busy, rel=0.02, abs=0.05), out
    sources = re.findall(r"^\s+[\d.]+\s+[\d.]+%\s+(\S+\.py):\S+ \w+ \w+$", out, re.M)
    for expected in ("mlp.py", "attention.py", "step.py"):
        assert expected in sources, out


@pytest.mark.slow
def test_options_table_times_every_variant():
    out = script("train_options.py", "--preset", "tiny", "--batch", "2", "--seq", "128", "--steps", "1",
                 "--rounds", "2", "--variant", "base:", "--variant", "chunk0:span_chunk=0",
                 "--variant", "dots:remat=dots",
                 "--variant", "sched:remat=dots,span_chunk=0,xla=--xla_cpu_enable_concurrency_optimized_scheduler=false")
    rows = dict(re.findall(r"^\| (\w+) \| [\d,. ]+ \| [\d,]+ \| ([\d.]+) \|$", out, re.M))
    assert set(rows) == {"base", "chunk0", "dots", "sched"} and rows["base"] == "1.000", out
    assert "'remat': 'dots'" in out, out
    # The xla= variant ran in its own worker with the model field, the flag and the chunking applied.
    assert re.search(r"built sched: .*'remat': 'dots'.*'XLA_FLAGS': '--xla_cpu_enable_concurrency.*'span_chunk': 0", out), out
