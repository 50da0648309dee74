"""End to end through the ``glocal`` command: train a tiny model, generate from it."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import glocal.models as gm
from glocal import workdir as workdirs
from glocal.cli import main
from tests.test_train import saved_steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    rc = main(["train", "--config", "transformer_tiny", "--workdir", str(workdir), "steps=4",
               "batch_size=2", "seq_len=32", "eval_batches=1", "log_every=2", "sample_tokens=8",
               "d_model=32", "num_heads=2", "num_kv_heads=1"])
    assert rc == 0
    return workdir


def test_train_writes_metrics_config_and_checkpoint(trained):
    lines = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [2, 4]
    assert all(np.isfinite(l["loss"]) and l["tokens_per_s"] > 0 for l in lines if "loss" in l)
    evals = [l for l in lines if "eval_bpb" in l]
    assert len(evals) == 1 and abs(evals[0]["eval_bpb"] - evals[0]["eval_loss"] / np.log(2)) < 1e-9
    record = json.loads((trained / "model.json").read_text())
    assert record["model"] == "transformer" and record["config"]["d_model"] == 32
    assert saved_steps(trained)[-1] == 4


def test_loaded_model_equals_trained_and_differs_from_init(trained):
    model, step = workdirs.load_model(trained)
    assert step == 4
    fresh = gm.build("transformer", "tiny", d_model=32, num_heads=2, num_kv_heads=1)
    x = jnp.arange(16)[None]
    assert np.abs(np.asarray(model(x)[0] - fresh(x)[0])).max() > 1e-3  # training changed the weights


def test_generate_from_workdir_and_untrained_preset(trained, capsys):
    assert main(["generate", "--workdir", str(trained), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ")
    assert main(["generate", "--config", "transformer_tiny", "--prompt", "x", "--max-new-tokens", "4",
                 "--temperature", "0.8", "--top-p", "0.9"]) == 0


def test_workdir_errors_are_clear(trained, tmp_path, capsys):
    # A used workdir is resumed, never overwritten: another model is refused...
    assert main(["train", "--config", "transformer_tiny", "--workdir", str(trained), "steps=5"]) == 2
    assert "describes a different model" in capsys.readouterr().err
    # ...and the same one at the same step count has nothing left to do.
    assert main(["train", "--workdir", str(trained)]) == 0
    assert "already trained to step 4" in capsys.readouterr().out
    assert main(["train", "--workdir", str(tmp_path / "new")]) == 2
    assert "not a glocal workdir" in capsys.readouterr().err
    assert main(["generate", "--workdir", str(tmp_path), "--prompt", "a"]) == 2
    assert "not a glocal workdir" in capsys.readouterr().err
    assert main(["train", "--config", "transformer_huge", "--workdir", str(tmp_path)]) == 2
    assert "unknown preset 'huge' for model 'transformer'" in capsys.readouterr().err
    assert main(["train", "--config", "transformer_tiny", "--workdir", str(tmp_path), "d_model"]) == 2
    assert "not of the form key=value" in capsys.readouterr().err


# orbax's failed async read leaves an "event loop is closed" callback behind; harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_gives_clear_error(trained, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    for f in (broken / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"garbage")
    with pytest.raises(workdirs.WorkdirError, match="could not be read.*partial or corrupt"):
        workdirs.load_model(broken)
    (broken / "model.json").write_text("{not json")
    with pytest.raises(workdirs.WorkdirError, match="model.json is corrupt"):
        workdirs.load_model(broken)
