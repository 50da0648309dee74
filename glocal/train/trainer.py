"""A first, single-device trainer: AdamW on random windows of the default corpus.

This is what the README's train command runs until the full training system (grain data,
sharding, resumable checkpoints) lands; it already trains, evaluates bits-per-byte, saves
the parameters and ends with a generated sample.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import glocal
import glocal.models as gm
from glocal import checkpoint
from glocal.configs.base import ConfigError, ModelConfig
from glocal.tokenizers import ByteTokenizer
from glocal.train import data


@dataclasses.dataclass(frozen=True)
class TrainConfig(ModelConfig):
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_batches: int = 8
    log_every: int = 10
    sample_tokens: int = 200
    sample_prompt: str = "def "

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")


def split_overrides(overrides: dict[str, str]):
    """Training fields go to TrainConfig; everything else is a model override."""
    train_fields = TrainConfig.field_names()
    model_kw = {k: v for k, v in overrides.items() if k not in train_fields}
    train_kw = {k: v for k, v in overrides.items() if k in train_fields}
    return model_kw, train_kw


def next_token_loss(model, tokens_BT):
    logits_BTV = model(tokens_BT[:, :-1]).astype(jnp.float32)
    # -log p(target) = logsumexp(logits) - logit[target], without materialising log_softmax.
    target_BT = jnp.take_along_axis(logits_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT)


def train(config_name: str, workdir: str, overrides: dict[str, str]) -> dict:
    name, preset = gm.split_config_name(config_name)
    model_kw, train_kw = split_overrides(overrides)
    tcfg = TrainConfig().replace(**train_kw)
    mcfg = gm.get_config(name, preset, **model_kw)
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}.")
    workdir = pathlib.Path(workdir)
    if checkpoint.latest_step(workdir) is not None:
        raise checkpoint.WorkdirError(
            f"{workdir} already holds a trained model (step {checkpoint.latest_step(workdir)}); "
            f"this trainer does not resume yet. Use a new --workdir; nothing was changed."
        )
    train_tokens, val_tokens, fingerprint = data.load_default_corpus()
    print(f"default corpus: {len(train_tokens):,} train / {len(val_tokens):,} val byte tokens, "
          f"fingerprint {fingerprint}")
    model = gm.build_from_config(mcfg, seed=tcfg.seed)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model {config_name}: {n_params / 1e6:.2f}M parameters")
    checkpoint.write_model_file(workdir, model)

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.learning_rate, min(tcfg.warmup_steps, tcfg.steps - 1), tcfg.steps, tcfg.learning_rate * 0.1)
    # Decay matrices only: norms' scales (1-D) keep their value.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                     optax.adamw(schedule, b2=0.95, weight_decay=tcfg.weight_decay, mask=decay_mask))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))  # params/opt state updated in place
    eval_loss = jax.jit(lambda p, b: next_token_loss(nnx.merge(graphdef, p), b))

    rng = np.random.default_rng(tcfg.seed)
    metrics_path = workdir / "metrics.jsonl"
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    bar = tqdm(range(1, tcfg.steps + 1), desc="train", unit="step", dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    with metrics_path.open("a") as log:
        for step in bar:
            batch = data.random_windows(train_tokens, tcfg.batch_size, tcfg.seq_len + 1, rng)
            params, opt_state, loss = train_step(params, opt_state, jnp.asarray(batch))
            seen += tokens_per_step
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                loss = float(loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower learning_rate.")
                tps = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                log.write(json.dumps({"step": step, "loss": loss, "tokens_per_s": tps,
                                      "lr": float(schedule(step))}) + "\n")
        val_rng = np.random.default_rng(1234)  # the same validation windows every run
        losses = [float(eval_loss(params, jnp.asarray(
            data.random_windows(val_tokens, tcfg.batch_size, tcfg.seq_len + 1, val_rng))))
            for _ in range(tcfg.eval_batches)]
        val_loss = float(np.mean(losses))
        bpb = val_loss / math.log(2)  # byte-level tokens: one token is one byte
        log.write(json.dumps({"step": tcfg.steps, "eval_loss": val_loss, "eval_bpb": bpb}) + "\n")
    print(f"validation loss {val_loss:.4f} nats/byte = {bpb:.3f} bits-per-byte")
    model = nnx.merge(graphdef, params)
    path = checkpoint.save_model(workdir, model, tcfg.steps)
    print(f"saved {path}")
    tok = ByteTokenizer()
    prompt = tok.encode(tcfg.sample_prompt)
    n = min(tcfg.sample_tokens, mcfg.max_seq_len - len(prompt))
    sample = glocal.generate(model, [prompt], n, temperature=0.8, top_k=40, seed=tcfg.seed,
                             stop_tokens=[tok.eos_id])[0]
    print("sample:\n" + tcfg.sample_prompt + tok.decode(sample))
    return {"eval_loss": val_loss, "eval_bpb": bpb, "params": n_params}
