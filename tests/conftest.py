"""Test-session set-up: persistent compile cache (shared with CI) and float32 defaults, and the
8-fake-device subprocess shared by test_sharding.py and test_conformance.py."""

import fcntl
import json
import os
import pathlib
import subprocess
import sys

# The suite compiles hundreds of small programs whose run time is negligible next to their
# compile time, and most of that goes to LLVM optimising XLA:CPU's generated kernels: without it
# (level 0) the conformance suite's causality tests took 71 s instead of 187 s on a cold compile
# cache. It changes how fast the kernels run, at most the rounding of what they compute (every
# test compares within one setting or with a tolerance). A user's own setting wins;
# the tests' subprocesses inherit it. Set before JAX creates its CPU backend.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

_cache = os.environ.get("GLOCAL_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _run_sharded_check(tmp_path_factory) -> dict:
    from tests.test_data import make_folder

    corpus = make_folder(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "GLOCAL_JAX_CACHE": os.path.abspath(_cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_check.py"), str(corpus), str(out)],
                          capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """Result of tests/sharded_check.py: the same tiny runs on 1 and on 8 fake CPU devices
    (fake devices must exist before JAX starts, hence a subprocess). Run once per test
    session: under pytest-xdist the first worker to ask runs it and the others read its
    JSON (the workers' temp dirs share a parent that is unique to the session)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return _run_sharded_check(tmp_path_factory)
    shared = tmp_path_factory.getbasetemp().parent
    result = shared / "sharded_check.json"
    with open(shared / "sharded_check.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():  # (a failed run leaves none: the next worker retries)
            result.write_text(json.dumps(_run_sharded_check(tmp_path_factory)))
        return json.loads(result.read_text())
