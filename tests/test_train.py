"""The training system on one CPU device: resume exactness, preemption, corrupt-checkpoint
fallback, gradient accumulation, losses, metrics/TensorBoard/plot/eval, dry run, errors."""

import json
import math
import shutil
import signal
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glocal.models as gm
from glocal.models import registry
from glocal import workdir as workdirs
from glocal.configs.base import ConfigError
from glocal.sharding import ShardingError
from glocal.train import data, optim
from glocal.train.build import build_setup
from glocal.train.config import TrainConfig
from glocal.train.step import loss_terms
from glocal.train.trainer import train
from tests.test_data import make_folder

MODEL = {"d_model": "32", "num_heads": "2", "num_kv_heads": "1"}
RUN = {"batch_size": "4", "seq_len": "32", "eval_batches": "2", "log_every": "1", "sample_tokens": "0",
       "warmup_steps": "2", "checkpoint_every": "3", **MODEL}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("corpus"))


def saved_steps(workdir) -> list[int]:
    """The checkpoint steps on disk (a step is a folder named by its number)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    wd = tmp_path_factory.mktemp("straight")
    out = train("transformer_tiny", wd, {**RUN, "steps": "8", "data": str(corpus)})
    return wd, out


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, corpus):
    wd = tmp_path_factory.mktemp("preempted")

    def preempt(step):
        if step == 5:
            signal.raise_signal(signal.SIGTERM)  # what a scheduler sends before preemption

    first = train("transformer_tiny", wd, {**RUN, "steps": "8", "data": str(corpus)}, hooks=[preempt])
    assert first["stopped"] and first["step"] == 5
    assert saved_steps(wd)[-1] == 5
    second = train(None, wd, {})  # resume: config from the workdir
    return wd, second


def params_of(workdir, step=None):
    model, _ = workdirs.load_model(workdir, step)
    from flax import nnx
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def test_resume_after_preemption_is_bitwise_identical(straight, preempted):
    (a, _), (b, second) = straight, preempted
    assert second["step"] == 8
    la, lb = losses(a), losses(b)
    assert list(la) == list(range(1, 9)) and list(lb) == list(range(1, 9))
    assert la == lb  # exact float equality, before and after the resume
    pa, pb = params_of(a), params_of(b)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    assert la[8] < la[1] - 0.5  # it did learn
    evals = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert len(evals) == 1 and evals[0]["step"] == 8
    runs = [json.loads(l) for l in (b / "runs.jsonl").read_text().splitlines()]
    assert [r["start_step"] for r in runs] == [0, 5]


def test_finished_run_continues_with_more_steps(straight, tmp_path, corpus, capsys):
    wd = tmp_path / "more"
    shutil.copytree(straight[0], wd)
    out = train(None, wd, {})
    assert "already trained to step 8" in capsys.readouterr().out and out["step"] == 8
    out = train("transformer_tiny", wd, {**MODEL, "steps": "10"})
    assert out["step"] == 10 and saved_steps(wd)[-1] == 10
    assert sorted(losses(wd)) == list(range(1, 11))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_and_is_kept(preempted, tmp_path, capsys):
    wd = tmp_path / "broken"
    shutil.copytree(preempted[0], wd)
    assert saved_steps(wd) == [5, 6, 8]  # keep_last=3 of 3, 5 (preemption), 6, 8
    for f in (wd / "checkpoints" / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"garbage")
    out = train(None, wd, {"steps": "9"})
    printed = capsys.readouterr().out
    assert "checkpoint step 8 could not be read" in printed
    assert "resumed from checkpoint step 6" in printed
    assert (wd / "corrupt_checkpoints" / "8" / "params").is_dir()  # moved, not deleted
    assert out["step"] == 9 and saved_steps(wd)[-1] == 9


def _setup(accum, **extra):
    mcfg = gm.get_config("transformer", "tiny", **MODEL)
    tcfg = TrainConfig().replace(batch_size=4, seq_len=16, grad_accum=accum, **extra)
    return build_setup(mcfg, tcfg, devices=jax.devices()[:1])


def test_gradient_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 250, 4000)
    tokens[rng.random(4000) < 0.03] = 258
    rows = data.Windows(tokens, 16, 258, True, "t").rows(np.arange(4))
    results = []
    for accum in (1, 2, 4):
        s = _setup(accum)
        params = s.init_params()
        opt = s.init_opt(params)
        batch = {k: jnp.asarray(v.reshape(accum, 4 // accum, 16)) for k, v in rows.items()}
        with jax.set_mesh(s.mesh):
            params, opt, m = s.train_step(params, opt, batch)
        results.append((jax.tree.map(np.asarray, params), {k: float(v) for k, v in m.items()}))
    for p, m in results[1:]:
        assert abs(m["loss"] - results[0][1]["loss"]) < 1e-5
        assert abs(m["grad_norm"] - results[0][1]["grad_norm"]) < 1e-4 * results[0][1]["grad_norm"]
        for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(results[0][0])):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_loss_terms_z_loss_and_aux_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    batch = {"inputs": jnp.zeros((2, 5), jnp.int32), "targets": jnp.asarray(targets),
             "positions": None, "segment_ids": None, "loss_mask": jnp.asarray(mask)}
    model = lambda x, **kw: (jnp.asarray(logits), {"balance": (jnp.float32(2.0), 0.25)})
    total, metrics = loss_terms(model, batch, mask.sum(), z_loss=1e-2)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    ce = (nll * mask).sum() / mask.sum()
    z = (lse**2 * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["z_loss"], z, rtol=1e-5)
    np.testing.assert_allclose(metrics["aux/balance"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(total, ce + 1e-2 * z + 0.25 * 2.0, rtol=1e-5)


def test_weight_decay_mask_and_schedule():
    from flax import nnx
    params = nnx.state(gm.build("transformer", "tiny"), nnx.Param)
    flat = lambda kinds: {jax.tree_util.keystr(p): bool(v.get_value()) for p, v in jax.tree_util.tree_flatten_with_path(
        optim.decay_mask(params, kinds), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
    m = flat(("norm", "bias"))
    assert not m["['final_norm']['scale']"] and not m["['decoder']['units']['layers'][0]['mixer_norm']['scale']"]
    assert m["['embed']['table_VD']"] and m["['decoder']['units']['layers'][0]['ffn']['wo_ID']"]
    assert not flat(("norm", "embedding"))["['embed']['table_VD']"]
    cfg = TrainConfig().replace(steps=110, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    sched = optim.schedule(cfg)
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6 and abs(float(sched(10)) - 1.0) < 1e-6
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert abs(float(sched(60)) - mid) < 1e-5 and abs(float(sched(110)) - 0.1) < 1e-6
    lin = optim.schedule(cfg.replace(lr_schedule="linear"))
    assert abs(float(lin(60)) - 0.55) < 1e-6


def _tfrecords(path):
    """Minimal TFRecord reader (length, crc, payload, crc) for TensorBoard event files."""
    raw, out, i = path.read_bytes(), [], 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i:i + 8])
        out.append(raw[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def test_metrics_tensorboard_plot_and_eval(straight, capsys):
    from tensorboardX.proto import event_pb2

    from glocal.cli import main
    wd, out = straight
    records = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    for key in ("step", "tokens", "elapsed_s", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert all(key in r for r in train_recs), key
    assert [r["tokens"] for r in train_recs] == [128 * s for s in range(1, 9)]
    assert all(r["mfu"] > 0 for r in train_recs[1:])
    tb = {}
    for f in (wd / "tensorboard").iterdir():
        for rec in _tfrecords(f):
            ev = event_pb2.Event.FromString(rec)
            for v in ev.summary.value:
                tb.setdefault(v.tag, {})[ev.step] = v.simple_value
    assert set(tb["loss"]) == set(range(1, 9))
    for r in train_recs:
        assert abs(tb["loss"][r["step"]] - r["loss"]) < 1e-6
    final = [r for r in records if "eval_loss" in r][-1]
    assert tb["eval_bpb"][8] == pytest.approx(final["eval_bpb"], rel=1e-6)
    assert main(["eval", "--workdir", str(wd)]) == 0
    said = capsys.readouterr().out
    assert f"{final['eval_bpb']:.3f} bits-per-byte" in said and "step 8" in said
    png = wd / "curves.png"
    assert main(["plot", str(wd), str(wd), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_dry_run_reports_memory_and_writes_nothing(tmp_path, capsys):
    wd = tmp_path / "dry"
    report = train("transformer_tiny", wd, {**RUN, "dry_run": "true"})
    n = report["params"]
    assert report["param_bytes_per_device"] == 4 * n
    assert 2 * 4 * n <= report["opt_state_bytes_per_device"] <= 2 * 4 * n + 64
    assert report["activation_temp_bytes_per_device"] > 0
    # 6 x non-embedding params + causal attention 12 * H * E * mean keys (T+1)/2 per layer
    assert report["model_flops_per_token"] == 6 * (n - 384 * 32) + 12 * 32 * (33 / 2) * 2
    assert "optimizer / device" in capsys.readouterr().out
    assert not wd.exists()


def test_bad_training_configs_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not divisible by grad_accum"):
        TrainConfig().replace(batch_size=6, grad_accum=4)
    with pytest.raises(ShardingError, match="has 3 devices but 1 are available"):
        train("transformer_tiny", tmp_path / "x", {"mesh.data": "3"})
    with pytest.raises(ConfigError, match="seq_len=512 exceeds the model's max_seq_len=256"):
        train("transformer_tiny", tmp_path / "x", {"seq_len": "512"})
    with pytest.raises(ConfigError, match="sharding='zero3' is not one of"):
        TrainConfig().replace(sharding="zero3")
    with pytest.raises(ConfigError, match="Did you mean learning_rate"):
        TrainConfig().replace(learnig_rate=1)
    assert not (tmp_path / "x").exists()


def test_packed_attention_stays_inside_documents():
    """Logits of a packed window equal those of each document run on its own."""
    model = gm.build("transformer", "tiny")
    rng = np.random.default_rng(2)
    d1, d2 = rng.integers(0, 250, 11), rng.integers(0, 250, 25)
    stream = np.concatenate([d1, [258], d2, [258]])
    rows = data.Windows(stream, 32, 258, True, "t").rows(np.array([0]))
    packed, _ = model(jnp.asarray(rows["inputs"]), positions_BT=jnp.asarray(rows["positions"]),
                   segment_ids_BT=jnp.asarray(rows["segment_ids"]))
    alone1, _ = model(jnp.asarray(np.concatenate([d1, [258]])[None]))
    alone2, _ = model(jnp.asarray(d2[None, :20]))
    np.testing.assert_allclose(packed[0, :12], alone1[0], atol=2e-5)
    np.testing.assert_allclose(packed[0, 12:32], alone2[0], atol=2e-5)
    assert rows["loss_mask"][0, 11] == 0 and rows["loss_mask"].sum() == 31


def test_bfloat16_compute_trains_without_loss_scaling(straight, tmp_path, corpus):
    """bf16 activations with float32 parameters: same first loss as float32 (same init and
    batch) to bf16 precision, finite and falling, parameters stay float32."""
    out = train("transformer_tiny", tmp_path / "bf16",
                {**RUN, "steps": "6", "data": str(corpus), "dtype": "bfloat16", "checkpoint_every": "0"})
    l16, l32 = losses(tmp_path / "bf16"), losses(straight[0])
    assert abs(l16[1] - l32[1]) < 0.05 * l32[1]
    assert all(math.isfinite(v) for v in l16.values()) and l16[6] < l16[1] - 0.3
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params_of(tmp_path / "bf16")))
    assert out["eval_loss"] < l16[1]


def test_keep_policy_last_n_plus_every_k(tmp_path, corpus):
    wd = tmp_path / "keep"
    train("transformer_tiny", wd, {**RUN, "steps": "9", "data": str(corpus), "checkpoint_every": "1",
                                   "keep_last": "2", "keep_every": "4", "eval_batches": "1"})
    kept = saved_steps(wd)
    assert kept == [4, 8, 9]  # last two (8, 9) plus every 4th (4, 8); nothing else


def test_models_with_untrained_state_train_and_evaluate():
    """Non-Param variables (buffers) are rebuilt from the config, not zeroed or trained."""
    import dataclasses

    from flax import nnx

    from glocal.configs.base import ModelConfig
    from glocal.layers import Embed, Unembed

    class Buffer(nnx.Variable):
        pass

    @dataclasses.dataclass(frozen=True)
    class ToyConfig(ModelConfig):
        vocab_size: int = 384
        max_seq_len: int = 64
        d_model: int = 8

    class Toy(nnx.Module):
        def __init__(self, cfg, *, rngs):
            self.config = cfg
            self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
            self.head = Unembed(cfg.d_model, cfg.vocab_size, rngs=rngs)
            self.prior_V = Buffer(jnp.linspace(-3.0, 3.0, cfg.vocab_size))  # fixed logit bias

        def __call__(self, tokens, positions_BT=None, segment_ids_BT=None):
            return self.head(self.embed(tokens)) + self.prior_V[...], {}

    with registry.registered("toy_buffer_test", ToyConfig, Toy):
        s = build_setup(ToyConfig(), TrainConfig().replace(batch_size=2, seq_len=8), devices=jax.devices()[:1])
        params = s.init_params()
        assert not any("prior_V" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
        rows = data.Windows(np.arange(100) % 300, 8, None, True, "t").rows(np.arange(2))
        with jax.set_mesh(s.mesh):
            total, count = s.eval_step(params, {k: jnp.asarray(v) for k, v in rows.items()})
        direct, _ = Toy(ToyConfig(), rngs=nnx.Rngs(0))(jnp.asarray(rows["inputs"]))
        lse = jax.nn.logsumexp(direct, -1)
        nll = lse - jnp.take_along_axis(direct, jnp.asarray(rows["targets"])[..., None], -1)[..., 0]
        np.testing.assert_allclose(float(total), float(nll.sum()), rtol=1e-5)
        assert float(count) == 16
