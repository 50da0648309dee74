"""``glocal eval --workdir DIR``: validation loss and bits-per-byte of a saved checkpoint,
on the same validation split and batches the training run used, tokenised with the
workdir's tokenizer."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

import glocal.models as gm
from glocal import sharding as shd
from glocal import workdir as workdirs
from glocal.train import data
from glocal.train.build import bits_label, build_setup, evaluate
from glocal.train.step import model_outputs


def evaluate_workdir(workdir, *, step: int | None = None, overrides: dict[str, str] | None = None,
                     log=print) -> dict:
    workdir = pathlib.Path(workdir)
    mcfg, tcfg = workdirs.resolve_configs(None, workdir, overrides or {})
    if not _fits(tcfg) and not any(k.startswith("mesh") for k in overrides or {}):
        # The training mesh needs other devices than this machine has (e.g. a pod's checkpoint read
        # on a workstation): evaluate data-parallel over the devices here.
        tcfg = tcfg.replace(mesh_data=-1, mesh_fsdp=1, mesh_expert=1, mesh_tensor=1)
    tokenizer, _ = workdirs.resolve_tokenizer(workdir, tcfg.tokenizer, mcfg)
    model, step = workdirs.load_model(workdir, step)
    setup = build_setup(mcfg, tcfg)
    rd = data.run_data(tcfg, tokenizer, mcfg.vocab_size, rows=setup.rows, train=False)
    batches, per_byte = rd.val_batches, rd.tokens_per_byte
    params = jax.device_put(nnx.state(model, nnx.Param), setup.param_sh)
    where = (f"over {len(batches) * batches[0]['inputs'].shape[0]} windows of {tcfg.seq_len} tokens "
             f"({rd.corpus.description})")
    modes = mcfg.routing_modes() if hasattr(mcfg, "routing_modes") else ()  # (a plain ModelConfig has none)
    if not modes:
        with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules):
            loss, bpb = evaluate(setup, params, batches, per_byte)
        log(f"{workdir} ({gm.model_name(mcfg)}) step {step}: validation loss {loss:.4f} nats/token = "
            f"{bpb:.3f} {bits_label(per_byte)} {where}")
        return {"step": step, "eval_loss": loss, "eval_bpb": bpb}
    # A non-causal router (top-k over the sequence) and its causal stand-in share the weights:
    # report both, and how often the causal rule makes the training-time choice.
    out = {"step": step}
    setups = {mode: build_setup(mcfg.with_routing_mode(mode), tcfg) for mode in (*modes, "topk")}
    for mode in modes:
        with jax.set_mesh(setups[mode].mesh), shd.use_rules(setups[mode].rules):
            loss, bpb = evaluate(setups[mode], params, batches, per_byte)
        note = "causal" if mode == "threshold" else "non-causal: sees later tokens"
        log(f"{workdir} ({gm.model_name(mcfg)}) step {step}, routing_mode={mode} ({note}): validation loss "
            f"{loss:.4f} nats/token = {bpb:.3f} {bits_label(per_byte)} {where}")
        out[f"eval_loss_{mode}"], out[f"eval_bpb_{mode}"] = loss, bpb
    out["routing_agreement"] = _agreement(setups["topk"], params, batches)
    log(f"  routing agreement (causal rule == top-k choice, per token and expert/step): "
        f"{out['routing_agreement']:.4f}")
    return out


def _fits(tcfg) -> bool:
    """Whether the run's mesh can be laid over this machine's devices."""
    try:
        shd.mesh_shape(tcfg.mesh_sizes, jax.device_count())
    except shd.ShardingError:
        return False
    return True


def _agreement_stats(logits, aux) -> list:
    """The batch means of a model output's ``*_agreement`` statistics."""
    return [jnp.mean(v) for k, (v, w) in sorted(aux.items()) if k.endswith("_agreement")]


def _agreement(setup, params, batches) -> float:
    """Mean of the model's ``*_agreement`` statistics over the validation batches."""
    stats = jax.jit(lambda p, batch: _agreement_stats(*model_outputs(setup.merge(p), batch)))
    values = []
    with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules):
        for batch in batches:
            values += [float(v) for v in stats(params, batch)]
    return sum(values) / max(len(values), 1)
