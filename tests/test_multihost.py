"""Multi-process training on one machine, as on a pod: ``glocal launch`` runs 2 processes of
4 fake CPU devices each (JAX's CPU collectives over gloo) and is compared with 1 process of
8 devices on the same mesh and global batch.

Covered: equal losses (dense data x fsdp x tensor, and an expert-parallel MoE mesh); only
process 0 writes the run's files; resume after SIGKILL of every process is bitwise; SIGKILL or
SIGSTOP (a hang) of one process ends the other with one clear line well within 60 s and the
last checkpoint resumes; SIGTERM reaching the processes at different moments stops both after one step with
one checkpoint; a second run on the busy workdir is refused; errors are printed once and every
process exits non-zero; a checkpoint written by 2 processes is resumed by 1 and read by eval,
generate and export; each process reads exactly the rows its devices hold.

The subprocesses share the persistent compile cache, so a configuration compiles once.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from glocal.launch import free_port, process_env
from tests.test_data import make_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to find the processes")

COMMON = ["log_every=1", "checkpoint_every=10", "lr_schedule=constant", "warmup_steps=3", "batch_size=8",
          "seq_len=64", "eval_every=0", "eval_batches=1", "sample_tokens=0", "tensorboard=false"]
DENSE = ["--config", "transformer_tiny", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding=fsdp_tp"]
MOE = ["--config", "moe_tiny", "mesh.data=2", "mesh.expert=4"]
LONG = 400  # steps of the runs a test interrupts (constant learning rate: the schedule ignores `steps`)


def _env() -> dict:
    cache = os.environ.get("GLOCAL_JAX_CACHE", str(ROOT / ".jax_cache"))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": os.path.abspath(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


class Launch:
    """``glocal launch -n N --devices-per-process M -- <command>`` in the background; output
    to files (a pipe nobody reads would block the run)."""

    def __init__(self, tmp: pathlib.Path, command: list[str], processes: int = 2, devices: int = 4):
        tmp.mkdir(parents=True, exist_ok=True)
        self.out, self.err = tmp / "launch.out", tmp / "launch.err"
        argv = [sys.executable, "-m", "glocal.cli", "launch", "-n", str(processes), "--devices-per-process",
                str(devices), "--heartbeat-timeout", "10", "--log-dir", str(tmp / "logs"), "--", *command]
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(argv, stdout=o, stderr=e, env=_env(), cwd=ROOT)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise

    def stderr(self) -> str:
        return self.err.read_text().replace("\r", "\n")

    def stdout(self) -> str:
        return self.out.read_text().replace("\r", "\n")

    def children(self) -> dict[int, int]:
        """``{process index: pid}`` of the launched glocal processes."""
        found = {}
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0") if ppid == self.proc.pid else []
            except (OSError, ValueError, IndexError):
                continue
            for var in env:
                if var.startswith(b"GLOCAL_PROCESS_ID="):
                    found[int(var.split(b"=", 1)[1])] = int(entry.name)
        return found

    def kill_all(self) -> None:
        for pid in self.children().values():
            _signal(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run(tmp: pathlib.Path, command: list[str], processes: int = 2, devices: int = 4, timeout: float = 300):
    """Launch and wait; ``(status, stdout, stderr)``."""
    la = Launch(tmp, command, processes, devices)
    status = la.wait(timeout)
    return status, la.stdout(), la.stderr()


def train(workdir, *args) -> list[str]:
    return ["train", "--workdir", str(workdir), *args]


def metrics(workdir) -> dict[int, dict]:
    lines = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}


def wait_for_checkpoint(la: Launch, workdir, step: int, timeout: float = 240) -> None:
    done = pathlib.Path(workdir) / "checkpoints" / str(step) / "commit_success.txt"
    t = time.monotonic()
    while not done.exists():
        assert la.proc.poll() is None, f"the run ended before checkpoint {step}:\n{la.stderr()[-3000:]}"
        assert time.monotonic() - t < timeout, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.05)


def checkpoints(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("mh_corpus"))


@pytest.fixture(scope="module")
def dense(tmp_path_factory, corpus):
    """The dense model for 20 steps: 1 process x 8 devices and 2 processes x 4 devices."""
    tmp = tmp_path_factory.mktemp("mh_dense")
    args = [*DENSE, "steps=20", f"data={corpus}", *COMMON]
    status1, _, err1 = run(tmp / "one", train(tmp / "one_wd", *args), processes=1, devices=8)
    status2, out2, err2 = run(tmp / "two", train(tmp / "two_wd", *args))
    assert status1 == 0, err1[-3000:]
    assert status2 == 0, err2[-3000:]
    return {"one": tmp / "one_wd", "two": tmp / "two_wd", "corpus": corpus, "tmp": tmp, "out": out2}


def assert_same_losses(a: dict, b: dict, rtol: float):
    assert sorted(a) == sorted(b) == list(range(1, 21))
    la, lb = np.array([a[s]["loss"] for s in a]), np.array([b[s]["loss"] for s in a])
    np.testing.assert_allclose(la, lb, rtol=rtol, atol=0)
    assert la[-1] < la[0] - 0.5  # it trained


def test_two_processes_train_like_one_dense(dense):
    assert_same_losses(metrics(dense["two"]), metrics(dense["one"]), rtol=1e-6)
    # Only process 0 wrote the run's files: one metrics line per step, one runs.jsonl line.
    lines = (dense["two"] / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"loss"' in x]) == 20
    assert len((dense["two"] / "runs.jsonl").read_text().splitlines()) == 1
    assert checkpoints(dense["two"]) == [10, 20]
    assert json.loads((dense["two"] / "checkpoints" / "20" / "meta" / "metadata").read_text())["step"] == 20
    assert sorted(p.name for p in (dense["two"] / "checkpoints" / "20" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_two_processes_train_like_one_expert_parallel_moe(tmp_path, corpus):
    args = [*MOE, "steps=20", f"data={corpus}", *COMMON, "checkpoint_every=0"]
    status1, _, err1 = run(tmp_path / "one", train(tmp_path / "one_wd", *args), processes=1, devices=8)
    status2, _, err2 = run(tmp_path / "two", train(tmp_path / "two_wd", *args))
    assert status1 == 0, err1[-3000:]
    assert status2 == 0, err2[-3000:]
    assert_same_losses(metrics(tmp_path / "two_wd"), metrics(tmp_path / "one_wd"), rtol=1e-6)


def _interrupted(tmp: pathlib.Path, dense: dict, name: str):
    """A 2-process run of the dense config, left running past its checkpoint at step 10."""
    wd = tmp / f"{name}_wd"
    la = Launch(tmp / name, train(wd, *DENSE, f"steps={LONG}", f"data={dense['corpus']}", *COMMON))
    wait_for_checkpoint(la, wd, 10)
    return la, wd


def _resume_to_20_matches(tmp: pathlib.Path, wd: pathlib.Path, dense: dict, name: str) -> int:
    """Resume ``wd`` with the launcher to step 20: the steps after its checkpoint equal the
    uninterrupted 2-process run bitwise. Returns the step it resumed from."""
    start = checkpoints(wd)[-1]
    status, out, err = run(tmp / name, train(wd, "steps=20"))
    assert status == 0, err[-3000:]
    assert f"resumed from checkpoint step {start}" in out
    got, want = metrics(wd), metrics(dense["two"])
    for step in range(start + 1, 21):
        assert (got[step]["loss"], got[step]["grad_norm"]) == (want[step]["loss"], want[step]["grad_norm"]), step
    return start


def test_kill_every_process_then_resume_is_bitwise(tmp_path, dense):
    la, wd = _interrupted(tmp_path, dense, "killed")
    la.kill_all()  # SIGKILL to both processes (and the launcher): no chance to clean up
    for step in checkpoints(wd):
        if step > 10:  # (a fast machine may have written step 20 before the kill)
            shutil.rmtree(wd / "checkpoints" / str(step))
    assert _resume_to_20_matches(tmp_path, wd, dense, "resume") == 10


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_process_ends_the_other_with_one_clear_line(tmp_path, dense, how):
    """SIGKILL of process 1 (process 0 notices at its next collective, or by the watchdog), or
    SIGSTOP (it hangs: the watchdog notices after the heartbeat timeout, 10 s here)."""
    la, wd = _interrupted(tmp_path, dense, how)
    pids = la.children()
    t = time.monotonic()
    _signal(pids[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    while pathlib.Path(f"/proc/{pids[0]}").exists() and _state(pids[0]) != "Z" and time.monotonic() - t < 60:
        time.sleep(0.05)
    took = time.monotonic() - t
    _signal(pids[1], signal.SIGKILL)
    status = la.wait(timeout=60)
    err = la.stderr()
    assert took < 60, err[-3000:]
    assert status == 128 + signal.SIGKILL  # the worst status: process 1's death
    lines = [x for x in err.splitlines() if x.startswith("glocal: error:")]
    assert len(lines) == 1 and lines[0].startswith("glocal: error: process 0 of 2 "), err[-3000:]
    assert ("lost contact with another process" in lines[0] or "process 1 has not been heard from" in lines[0])
    assert "Traceback" not in err and "Check failure" not in err and "exit statuses [3, 137]" in err
    print(f"process 0 ended {took:.1f} s after process 1 was {how}")
    if checkpoints(wd)[-1] < 20:  # the last complete checkpoint resumes (and continues exactly)
        _resume_to_20_matches(tmp_path, wd, dense, "resume")


def _state(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_staggered_sigterm_stops_every_process_after_one_step(tmp_path, dense):
    la, wd = _interrupted(tmp_path, dense, "preempted")
    # The workdir is busy: a second run is refused (only process 0 holds the lock).
    status, _, err = run(tmp_path / "second", train(wd, "steps=30"), processes=1, devices=8)
    assert status == 2 and "is in use by another glocal run" in err, err[-2000:]
    pids = la.children()
    _signal(pids[0], signal.SIGTERM)
    seen = max(metrics(wd))
    t = time.monotonic()
    while max(metrics(wd)) < seen + 2 and la.proc.poll() is None and time.monotonic() - t < 5:
        time.sleep(0.02)  # process 1 hears of it 1-2 steps later (if it still runs)
    _signal(pids[1], signal.SIGTERM)
    assert la.wait(timeout=120) == 143, la.stderr()[-3000:]
    last = max(metrics(wd))
    assert checkpoints(wd)[-1] == last  # one checkpoint, at the step both stopped after
    meta = json.loads((wd / "checkpoints" / str(last) / "meta" / "metadata").read_text())
    assert meta["step"] == last
    assert f"stopped by signal at step {last}" in la.stdout()
    # The same command resumes; SIGTERM to the launcher reaches both processes, which stop together.
    la = Launch(tmp_path / "resume", train(wd))
    t = time.monotonic()
    while max(metrics(wd)) <= last and la.proc.poll() is None and time.monotonic() - t < 240:
        time.sleep(0.05)
    la.proc.send_signal(signal.SIGTERM)
    assert la.wait(timeout=120) == 143, la.stderr()[-3000:]
    assert f"resumed from checkpoint step {last}" in la.stdout()
    assert checkpoints(wd)[-1] == max(metrics(wd)) > last


def _one_error(status: int, err: str, words: str, code: int = 2) -> None:
    lines = [x for x in err.splitlines() if x.startswith("glocal: error:")]
    assert status == code and len(lines) == 1 and words in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_errors_are_printed_once_and_every_process_fails(tmp_path, dense):
    wd = tmp_path / "wd"
    shutil.copytree(dense["two"], wd)
    other = make_folder(tmp_path / "other", seed=5)
    status, _, err = run(tmp_path / "data", train(wd, "steps=30", f"data={other}"))
    _one_error(status, err, "was trained on other data")
    status, _, err = run(tmp_path / "opt", train(wd, "steps=30", "grad_clip=0"))
    _one_error(status, err, "optimizer state does not fit this run")
    status, _, err = run(tmp_path / "nan", train(tmp_path / "nan_wd", *DENSE, "steps=20", f"data={dense['corpus']}",
                                                 *COMMON, "learning_rate=1e30", "grad_clip=0"))
    _one_error(status, err, "became")
    status, _, err = run(tmp_path / "bad", train(tmp_path / "bad_wd", "--config", "transformer_huge"))
    _one_error(status, err, "unknown preset 'huge'")
    status, _, err = run(tmp_path / "eval", ["eval", "--workdir", str(wd)])
    _one_error(status, err, "glocal eval runs as one process")


def test_one_process_reads_a_two_process_workdir(tmp_path, dense):
    """Resume on another process count, and eval / generate / export (one process)."""
    import glocal
    from glocal import workdir as workdirs
    from glocal.hf import export
    from glocal.train.evaluate import evaluate_workdir

    wd = tmp_path / "wd"
    shutil.copytree(dense["two"], wd)
    shutil.rmtree(wd / "checkpoints" / "20")
    status, out, err = run(tmp_path / "one", train(wd, "steps=20"), processes=1, devices=8)
    assert status == 0 and "resumed from checkpoint step 10" in out, err[-3000:]
    got, want = metrics(wd), metrics(dense["two"])
    np.testing.assert_allclose([got[s]["loss"] for s in range(11, 21)], [want[s]["loss"] for s in range(11, 21)],
                               rtol=1e-6)

    result = evaluate_workdir(dense["two"], log=lambda *a: None)
    final = [json.loads(x) for x in (dense["two"] / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    np.testing.assert_allclose(result["eval_loss"], final[-1]["eval_loss"], rtol=1e-5)
    model, step = workdirs.load_model(dense["two"])
    assert step == 20
    assert len(glocal.generate(model, [[1, 2, 3]], 5)[0]) == 5
    export(dense["two"], tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


def _slurm_env(index: int) -> dict:
    """A SLURM step's environment for task ``index`` of 2 on this machine (no launcher: JAX's own
    cluster detection finds the coordinator and the process ids)."""
    env = {k: v for k, v in _env().items() if not k.startswith(("GLOCAL_", "JAX_COORDINATOR"))}
    env.update(SLURM_JOB_ID=str(1000 + free_port() % 3000), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_PROCID=str(index), SLURM_LOCALID=str(index), SLURM_NODEID="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return env


@pytest.mark.parametrize("how", ["launcher", "slurm"])
def test_each_process_reads_the_rows_its_devices_hold(how):
    port, procs = free_port(), []
    slurm = [_slurm_env(0)]
    slurm.append({**slurm[0], **{k: v for k, v in _slurm_env(1).items() if k in ("SLURM_PROCID", "SLURM_LOCALID")}})
    for i in range(2):
        env = (process_env(_env(), index=i, processes=2, port=port, devices=4, heartbeat=10) if how == "launcher"
               else slurm[i])
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_rows.py")], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert p.returncode == 0 and line, err[-3000:]
        results.append(json.loads(line[0][len("RESULT "):]))
    assert [(r["process"], r["processes"]) for r in results] == [(0, 2), (1, 2)]
    for mesh, expect in {"data2_fsdp2_tensor2": [[0, 4], [4, 8]], "tensor8": [[0, 8], [0, 8]],
                         "fsdp8": [[0, 4], [4, 8]], "data2_expert4": [[0, 4], [4, 8]]}.items():
        assert [r[mesh]["rows"] for r in results] == expect, mesh
        # The windows each process read: exactly its rows of the global batch, no more.
        from glocal.train import data

        windows = data.Windows(np.arange(50_000), 32, None, pack=False, what="t")
        whole = next(data.train_iterator(windows, batch_size=16, grad_accum=2, seed=3, threads=1))["inputs"][:, :, 0]
        for r, (a, b) in zip(results, expect):
            assert np.array_equal(np.array(r[mesh]["first_tokens"]), whole[:, a:b]), mesh
