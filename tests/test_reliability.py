"""Training runs under faults and mistakes: a valid checkpoint is never set aside, non-finite
weights are never saved, the workdir is locked, other data is not resumed silently, and a
resumed run's metrics never double back. Each test reproduces a failure seen on the code
before these fixes."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from glocal import workdir as workdirs
from glocal.cli import main as cli
from glocal.train.lock import WorkdirLock
from glocal.train.trainer import TrainingDiverged, train
from tests.test_data import make_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"batch_size": "4", "seq_len": "32", "eval_batches": "1", "log_every": "1", "sample_tokens": "0",
        "warmup_steps": "1", "tensorboard": "false", "eval_every": "0"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("corpus"))


def run(wd, corpus, **kw):
    return train("transformer_tiny" if not (wd / "model.json").exists() else None, wd,
                 {**TINY, "data": str(corpus), **{k: str(v) for k, v in kw.items()}})


def steps_on_disk(wd):
    return sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())


def test_changed_optimizer_option_stops_with_a_message_and_keeps_every_checkpoint(corpus, tmp_path):
    wd = tmp_path / "wd"
    run(wd, corpus, steps=4, checkpoint_every=2)  # grad_clip=1.0 (default)
    with pytest.raises(workdirs.WorkdirError, match=r"grad_clip=1\.0 then, 0\.0 now.*reset_optimizer=true"):
        run(wd, corpus, steps=6, grad_clip=0)
    assert steps_on_disk(wd) == [2, 4] and not (wd / "corrupt_checkpoints").exists()
    # The explicit way forward: the weights resume, the optimizer state starts fresh.
    out = run(wd, corpus, steps=6, grad_clip=0, reset_optimizer="true")
    assert out["step"] == 6 and [h["step"] for h in out["history"]] == [5, 6]
    # reset_optimizer is one-off: the next resume does not inherit it.
    assert json.loads((wd / "runs.jsonl").read_text().splitlines()[-1])["config"]["reset_optimizer"] is True
    out = run(wd, corpus, steps=7)
    assert out["step"] == 7


def test_diverging_run_never_saves_non_finite_weights(corpus, tmp_path):
    wd = tmp_path / "wd"
    with pytest.raises(TrainingDiverged, match="non-finite|loss became") as err:
        run(wd, corpus, steps=12, learning_rate=1e6, grad_clip=0, checkpoint_every=1, log_every=10)
    saved = steps_on_disk(wd)
    assert f"step {saved[-1]}, has finite weights" in str(err.value) if saved else "no checkpoint" in str(err.value)
    for step in saved:  # every checkpoint left is finite and loads
        model, _ = workdirs.load_model(wd, step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_generate_refuses_non_finite_weights(corpus, tmp_path, capsys):
    wd = tmp_path / "wd"
    run(wd, corpus, steps=2, checkpoint_every=0)
    model, _ = workdirs.load_model(wd)
    bad = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), nnx.state(model, nnx.Param))
    # A checkpoint with NaN weights, as older versions could write.
    with ocp.CheckpointManager((wd / "checkpoints").absolute()) as mngr:
        mngr.save(9, args=ocp.args.Composite(params=ocp.args.StandardSave(bad)))
    with pytest.raises(workdirs.WorkdirError, match=r"non-finite weights.*earlier --step \(available: \[2\]\)"):
        workdirs.load_model(wd)
    assert cli(["generate", "--workdir", str(wd), "--prompt", "x", "--max-new-tokens", "3"]) == 2
    assert "non-finite weights" in capsys.readouterr().err


def test_second_run_on_a_locked_workdir_fails_at_once(corpus, tmp_path, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    # A real concurrent run in another process; wait until it holds the lock.
    proc = subprocess.Popen([sys.executable, "-m", "glocal.cli", "train", "--config", "transformer_tiny",
                             "--workdir", str(wd), "steps=3", "data=" + str(corpus),
                             *[f"{k}={v}" for k, v in TINY.items()]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            lock = wd / ".lock"
            if lock.exists() and lock.read_text().startswith("{") and json.loads(lock.read_text())["pid"] == proc.pid:
                break
            time.sleep(0.2)
        t0 = time.time()
        assert cli(["train", "--workdir", str(wd), "steps=3", "data=" + str(corpus)]) == 2
        assert time.time() - t0 < 60  # at once, not after a timeout
        err = capsys.readouterr().err
        assert f"in use by another glocal run (pid {proc.pid}" in err and "Traceback" not in err
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert steps_on_disk(wd) == [3]
    lines = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]  # written once


def test_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    code = ("import sys, time; from glocal.train.lock import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match=f"pid {proc.pid}"):
        WorkdirLock(tmp_path).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with WorkdirLock(tmp_path):  # the kernel released it with the process
        pass


def test_resume_on_other_data_is_refused_unless_allowed(corpus, tmp_path):
    wd = tmp_path / "wd"
    run(wd, corpus, steps=2)
    other = make_folder(tmp_path / "other", seed=1)
    with pytest.raises(workdirs.WorkdirError, match="trained on other data.*allow_data_change=true"):
        run(wd, other, steps=3)
    out = run(wd, other, steps=3, allow_data_change="true")
    assert out["step"] == 3


def test_resume_from_an_earlier_checkpoint_does_not_double_back_the_metrics(corpus, tmp_path):
    wd = tmp_path / "wd"

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt("simulated crash after logging step 3")

    with pytest.raises(KeyboardInterrupt):
        train("transformer_tiny", wd, {**TINY, "data": str(corpus), "steps": "4", "checkpoint_every": "2"},
              hooks=[crash])
    run(wd, corpus, steps=4)
    steps = [r["step"] for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # step 3 of the crashed run moved aside, logged again by the resume
    abandoned = [json.loads(line)["step"] for line in (wd / "metrics.abandoned.jsonl").read_text().splitlines()]
    assert abandoned == [3]
