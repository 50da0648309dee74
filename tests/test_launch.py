"""``glocal launch`` on its own (cheap commands; the training runs are in test_multihost.py)."""

import subprocess
import sys

import pytest

from glocal import launch
from glocal.train import distributed

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_process_env_is_the_contract_distributed_reads():
    base = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "XLA_FLAGS": "--xla_dump_to=/x --xla_force_host_platform_device_count=2",
            "PATH": "/bin"}
    env = launch.process_env(base, index=1, processes=3, port=1234, devices=4, heartbeat=7)
    assert distributed.wants_distributed(env)
    assert distributed.initialize_args(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 3,
                                                "process_id": 1, "heartbeat_timeout_seconds": 7,
                                                "initialization_timeout": distributed.INIT_TIMEOUT_S}
    assert "SLURM_NTASKS" not in env and "SLURM_PROCID" not in env  # an outer job's ids would mislead JAX
    assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
    assert "XLA_FLAGS" not in launch.process_env({}, index=0, processes=2, port=1, devices=None, heartbeat=1)
    assert not distributed.wants_distributed(launch.process_env({"SLURM_NTASKS": "2"}, index=0, processes=1, port=1,
                                                                devices=None, heartbeat=1))


def test_environment_errors_name_the_variable():
    from glocal.errors import UserError

    with pytest.raises(UserError, match="GLOCAL_HEARTBEAT_TIMEOUT='soon' is not a whole number"):
        distributed.initialize_args({"GLOCAL_HEARTBEAT_TIMEOUT": "soon"})


def test_exit_status_and_noise_filter():
    assert launch.exit_status(-9) == 137 and launch.exit_status(2) == 2 and launch.exit_status(0) == 0
    chatter = (b"train: 3%|[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
               b"[Gloo] Rank 1[Gloo] Rank 0 is connected to 1 is connected to  peer ranks.\nloss 3.2\n")
    shown = launch._strip_noise(chatter)
    assert shown.endswith(b"loss 3.2\n") and b"Gloo" not in shown and b"peer ranks" not in shown


def _launch(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "glocal.cli", "launch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_launch_runs_the_command_n_times_and_shows_process_0(tmp_path):
    r = _launch("-n", "2", "--log-dir", str(tmp_path), "--", "models")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("transformer: presets") == 1  # process 0's output only
    assert "transformer: presets" in (tmp_path / "process_1.log").read_text()


def test_launch_reports_the_worst_status_once(tmp_path):
    r = _launch("-n", "2", "--log-dir", str(tmp_path), "--", "generate", "--config", "transformer_nope")
    assert r.returncode == 2
    assert r.stderr.count("glocal: error:") == 1  # the same error from both: shown once
    assert "exit statuses [2, 2]" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["-n", "0", "--", "train"], "--processes must be at least 1"),
    (["-n", "2"], "name the glocal command to run after --"),
    (["-n", "2", "--", "launch", "-n", "2"], "not 'launch'"),
    (["-n", "2", "--devices-per-process", "0", "--", "models"], "--devices-per-process must be at least 1"),
])
def test_launch_argument_errors(args, words):
    r = _launch(*args, timeout=60)
    assert r.returncode == 2 and words in r.stderr


def test_other_commands_refuse_to_run_as_a_job(monkeypatch):
    from glocal.cli import _one_process
    from glocal.errors import UserError

    monkeypatch.setenv("GLOCAL_NUM_PROCESSES", "2")
    with pytest.raises(UserError, match="glocal eval runs as one process"):
        _one_process("eval")
