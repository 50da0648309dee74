"""``glocal eval --workdir DIR``: validation loss and bits-per-byte of a saved checkpoint,
on the same validation split and batches the training run used."""

from __future__ import annotations

import pathlib

import jax

import glocal.models as gm
from glocal import workdir as workdirs
from glocal import sharding as shd
from glocal.tokenizers import get_tokenizer
from glocal.train import data
from glocal.train.trainer import build_setup, evaluate, resolve_configs


def evaluate_workdir(workdir, *, step: int | None = None, overrides: dict[str, str] | None = None,
                     log=print) -> dict:
    workdir = pathlib.Path(workdir)
    record = workdirs.read_model_file(workdir)
    mcfg, tcfg = resolve_configs(None, workdir, overrides or {})
    tokenizer = get_tokenizer(record.get("tokenizer"))
    model, step = workdirs.load_model(workdir, step)
    setup = build_setup(mcfg, tcfg)
    corpus = data.load_corpus(tcfg.data, tokenizer=tokenizer, vocab_size=mcfg.vocab_size,
                              val_spec=tcfg.val_data, val_fraction=tcfg.val_fraction,
                              data_dtype=tcfg.data_dtype, eos_id=tcfg.eos_id)
    windows = data.Windows(corpus.val, tcfg.seq_len, corpus.eos_id, tcfg.pack, "validation split")
    batches = data.eval_batches(windows, batch_size=tcfg.batch_size // tcfg.grad_accum,
                                num_batches=tcfg.eval_batches * tcfg.grad_accum,
                                host=jax.process_index(), num_hosts=jax.process_count())
    from flax import nnx

    params = jax.device_put(nnx.state(model, nnx.Param), setup.param_sh)
    with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules):
        loss, bpb = evaluate(setup, params, batches)
    log(f"{workdir} ({gm.model_name(mcfg)}) step {step}: validation loss {loss:.4f} nats/token = "
        f"{bpb:.3f} bits-per-byte over {len(batches) * batches[0]['inputs'].shape[0]} windows of "
        f"{tcfg.seq_len} tokens ({corpus.description})")
    return {"step": step, "eval_loss": loss, "eval_bpb": bpb}
