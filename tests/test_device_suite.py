"""benchmarks/device_suite.py at --smoke sizes on CPU: the script that runs on GPU/TPU machines
must not rot between the rare runs there. Its correctness cells run our Pallas kernels in
interpret mode against the float32 oracles, so a kernel that goes wrong fails this test too."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def suite(*args, timeout=600):
    cache = os.path.abspath(os.environ.get("GLOCAL_JAX_CACHE", ROOT / ".jax_cache"))
    # A subprocess: hand it the test session's persistent compile cache (tests/conftest.py)
    # through JAX's environment variables.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_device_suite_smoke(tmp_path):
    # A generous budget: a slow CI machine must not skip cells (the timeout above bounds it).
    proc = suite("--smoke", "--out", str(tmp_path / "all"), "--budget-s", "1800")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    report = json.loads((tmp_path / "all" / "device_suite.json").read_text())
    assert (tmp_path / "all" / "device_suite.md").read_text().startswith("# glocal device suite: cpu")
    assert report["meta"]["platform"] == "cpu" and report["meta"]["smoke"]
    sections = report["sections"]
    assert sorted(sections) == ["a", "b", "c", "d", "e"]
    for key, section in sections.items():
        assert section["cells"], f"section {key} has no cells"
        assert not any(c["status"] == "skipped: budget" for c in section["cells"]), f"section {key} ran out of time"
    ran = [c for c in sections["a"]["cells"] if not c["status"].startswith("unavailable")]
    assert ran and all(c["status"] == "pass" for c in ran), [c for c in ran if c["status"] != "pass"]
    # Every implementation we ship ran (only the optional one, tokamax, may be unavailable).
    assert {c["impl"] for c in ran} >= {"pallas_tpu", "pallas_gpu", "chunked", "ragged_dot", "tiled"}
    for key in "bcde":
        bad = [c for c in sections[key]["cells"] if c["status"].startswith(("error", "oom"))]
        assert not bad, bad

    # A spent budget records the cells as skipped instead of running them.
    proc = suite("--smoke", "--out", str(tmp_path / "none"), "--sections", "b", "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "none" / "device_suite.json").read_text())
    assert list(report["sections"]) == ["b"]
    assert {c["status"] for c in report["sections"]["b"]["cells"]} == {"skipped: budget"}
