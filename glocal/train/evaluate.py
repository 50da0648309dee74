"""``glocal eval --workdir DIR``: validation loss and bits-per-byte of a saved checkpoint,
on the same validation split and batches the training run used, tokenised with the
workdir's tokenizer."""

from __future__ import annotations

import dataclasses
import pathlib

import jax

import glocal.models as gm
from glocal import workdir as workdirs
from glocal import sharding as shd
from glocal.train import data
from glocal.train.trainer import bits_label, build_setup, evaluate, resolve_configs, resolve_tokenizer


def evaluate_workdir(workdir, *, step: int | None = None, overrides: dict[str, str] | None = None,
                     log=print) -> dict:
    workdir = pathlib.Path(workdir)
    mcfg, tcfg = resolve_configs(None, workdir, overrides or {})
    tokenizer, _ = resolve_tokenizer(workdir, tcfg.tokenizer, mcfg)
    model, step = workdirs.load_model(workdir, step)
    setup = build_setup(mcfg, tcfg)
    corpus = data.load_corpus(tcfg.data, tokenizer=tokenizer, vocab_size=mcfg.vocab_size,
                              val_spec=tcfg.val_data, val_fraction=tcfg.val_fraction,
                              data_dtype=tcfg.data_dtype, eos_id=tcfg.eos_id)
    per_byte = data.tokens_per_byte(corpus, tokenizer, tcfg.pack)
    windows = data.Windows(corpus.val, tcfg.seq_len, corpus.eos_id, tcfg.pack, "validation split")
    batches = data.eval_batches(windows, batch_size=tcfg.batch_size // tcfg.grad_accum,
                                num_batches=tcfg.eval_batches * tcfg.grad_accum,
                                host=jax.process_index(), num_hosts=jax.process_count())
    from flax import nnx

    params = jax.device_put(nnx.state(model, nnx.Param), setup.param_sh)
    where = (f"over {len(batches) * batches[0]['inputs'].shape[0]} windows of {tcfg.seq_len} tokens "
             f"({corpus.description})")
    modes = mcfg.routing_modes() if hasattr(mcfg, "routing_modes") else ()
    if not modes:
        with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules):
            loss, bpb = evaluate(setup, params, batches, per_byte)
        log(f"{workdir} ({gm.model_name(mcfg)}) step {step}: validation loss {loss:.4f} nats/token = "
            f"{bpb:.3f} {bits_label(per_byte)} {where}")
        return {"step": step, "eval_loss": loss, "eval_bpb": bpb}
    # A non-causal router (top-k over the sequence) and its causal stand-in share the weights:
    # report both, and how often the causal rule makes the training-time choice.
    out = {"step": step}
    for mode in modes:
        setup_m = build_setup(dataclasses.replace(mcfg, routing_mode=mode), tcfg)
        with jax.set_mesh(setup_m.mesh), shd.use_rules(setup_m.rules):
            loss, bpb = evaluate(setup_m, params, batches, per_byte)
        note = "causal" if mode == "threshold" else "non-causal: sees later tokens"
        log(f"{workdir} ({gm.model_name(mcfg)}) step {step}, routing_mode={mode} ({note}): validation loss "
            f"{loss:.4f} nats/token = {bpb:.3f} {bits_label(per_byte)} {where}")
        out[f"eval_loss_{mode}"], out[f"eval_bpb_{mode}"] = loss, bpb
    out["routing_agreement"] = _agreement(dataclasses.replace(mcfg, routing_mode="topk"), setup, params, batches)
    log(f"  routing agreement (causal rule == top-k choice, per token and expert/step): "
        f"{out['routing_agreement']:.4f}")
    return out


def _agreement(cfg, setup, params, batches) -> float:
    """Mean of the models' ``*_agreement`` statistics over the validation batches."""
    from flax import nnx

    graphdef = nnx.split(gm.build_from_config(cfg), nnx.Param)[0]  # (one host copy: small models)

    @jax.jit
    def stats(p, inputs):
        out = nnx.merge(graphdef, p)(inputs)
        aux = out[1] if isinstance(out, tuple) else {}
        return [jax.numpy.mean(v) for k, (v, w) in sorted(aux.items()) if k.endswith("_agreement")]

    values = []
    with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules):
        for batch in batches:
            values += [float(v) for v in stats(params, batch["inputs"])]
    return sum(values) / max(len(values), 1)
