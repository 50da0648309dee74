"""``glocal train``: one loop from a laptop CPU to a pod slice.

    data (grain, packed windows) -> jit(train_step) over a device mesh with named shardings
    -> metrics.jsonl / TensorBoard / progress bar -> async orbax checkpoints -> eval, sample

A workdir holds ``model.json`` (the model), ``runs.jsonl`` (the training config of every
invocation), ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``. Running the command
again on the same workdir resumes from the newest readable checkpoint: parameters,
optimizer state, step and data iterator, so the continued run is bitwise identical to an
uninterrupted one on the same mesh (the step has no other randomness). A larger ``steps=``
continues a finished run. Works for every registered model family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import glocal
import glocal.models as gm
from glocal import workdir as workdirs
from glocal import sharding as shd
from glocal.configs.base import ConfigError
from glocal.errors import UserError
from glocal.tokenizers import decode_continuation, get_tokenizer, same_tokenizer, stop_ids
from glocal.train import data, distributed
from glocal.train.checkpoints import CheckpointMismatch, TrainCheckpointer
from glocal.train.lock import WorkdirBusy, WorkdirLock
from glocal.train.config import TrainConfig, split_overrides
from glocal.models.base import active_param_count
from glocal.train.metrics import MetricsWriter, peak_flops
from glocal.train.optim import make_optimizer, schedule
from glocal.train.step import make_eval_step, make_train_step

RUNS_FILE = "runs.jsonl"
ONE_OFF_OPTIONS = ("dry_run", "reset_optimizer", "allow_data_change")
# Training options that shape the optimizer state (a resume with other values cannot reuse it).
OPTIMIZER_OPTIONS = ("grad_clip", "weight_decay", "no_decay", "b1", "b2", "eps", "lr_schedule", "warmup_steps",
                     "learning_rate", "min_lr_ratio", "grad_accum")


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or the weights became non-finite; no non-finite checkpoint was written (the
    CLI prints the message, which names the last finite checkpoint, and exits 2)."""


def previous_run_config(workdir: pathlib.Path) -> dict | None:
    path = workdir / RUNS_FILE
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["config"] if lines else None


def resolve_configs(config_name: str | None, workdir: pathlib.Path, overrides: dict[str, str]):
    """``(model_config, train_config)``. On an existing workdir the previous run's training
    config is the base, so ``glocal train ... steps=600`` only changes what it names."""
    model_kw, train_kw = split_overrides(overrides)
    previous = previous_run_config(workdir)
    base = TrainConfig.from_dict(previous) if previous else TrainConfig()
    # One-off options are never inherited from the previous run; nor is the tokenizer (a
    # workdir keeps the one its model.json records: see resolve_tokenizer).
    tcfg = base.replace(**{**{k: False for k in ONE_OFF_OPTIONS}, "tokenizer": "", **train_kw})
    if config_name is None:
        record = workdirs.read_model_file(workdir)
        mcfg = gm.config_class(record["model"]).from_dict(record["config"]).replace(**model_kw)
    else:
        name, preset = gm.split_config_name(config_name)
        mcfg = gm.get_config(name, preset, **model_kw)
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}; "
                          f"lower seq_len or raise max_seq_len.")
    return mcfg, tcfg


def resolve_tokenizer(workdir: pathlib.Path, spec: str, mcfg):
    """``(tokenizer, record)``: the run's tokenizer and the spec model.json records for it.

    A workdir keeps the tokenizer its model was trained with: where it has a model.json,
    ``spec`` may be empty or name the same tokenizer (same ids, e.g. the folder its copy was
    made from: running the first command again resumes); another one is a ConfigError. On a
    new workdir ``spec`` (default byte) is used; one made of files (with ``save``) is
    recorded as ``kind:tokenizer``, the copy ``_train_loop`` makes in ``workdir/tokenizer``.
    A tokenizer with more ids than the model's vocabulary is a ConfigError."""
    if (workdir / workdirs.MODEL_FILE).is_file():
        record = workdirs.read_model_file(workdir).get("tokenizer") or "byte"
        tokenizer = workdirs.load_tokenizer(workdir, record)
        if spec and spec != record and not same_tokenizer(get_tokenizer(spec), tokenizer):
            raise ConfigError(f"tokenizer={spec!r} differs from the tokenizer {workdir} was trained with "
                              f"({record!r} in its {workdirs.MODEL_FILE}); leave tokenizer= out to resume with "
                              f"that one, or train into a new --workdir.")
    else:
        spec = spec or "byte"
        tokenizer = get_tokenizer(spec)
        record = (f"{spec.partition(':')[0]}:{workdirs.TOKENIZER_DIR}" if hasattr(tokenizer, "save")
                  else tokenizer.name)
    vocab = getattr(mcfg, "vocab_size", None)
    # (The byte tokenizer is exempt: token-array runs carry it as a placeholder and size
    # their model to their own ids; text it encodes is checked against the vocabulary anyway.)
    if getattr(tokenizer, "name", None) != "byte" and vocab is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(f"tokenizer {record!r} has {tokenizer.vocab_size:,} ids but the model's vocab_size is "
                          f"{vocab:,}; set vocab_size>={tokenizer.vocab_size} (a vocabulary larger than the "
                          f"tokenizer's is fine).")
    return tokenizer, record


def _keep_tokenizer(workdir: pathlib.Path, tokenizer, record: str) -> None:
    """Copy a tokenizer made of files into a new workdir (``record`` names the copy), so the
    workdir does not depend on where the files came from."""
    if (workdir / workdirs.MODEL_FILE).exists() or not hasattr(tokenizer, "save"):
        return
    target = workdir / workdirs.TOKENIZER_DIR
    if target.exists() and any(target.iterdir()):
        try:  # left by a first run that stopped before writing model.json?
            same = same_tokenizer(workdirs.load_tokenizer(workdir, record), tokenizer)
        except UserError:
            same = False
        if not same:
            raise workdirs.WorkdirError(f"{target} already exists and holds another tokenizer; remove it or "
                                        f"train into a new --workdir.")
    tokenizer.save(target)


def bits_label(tokens_per_byte: float | None) -> str:
    """What ``evaluate``'s second number is."""
    return "bits-per-byte" if tokens_per_byte else "bits/token (bytes unknown: token-array validation data)"


@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built once: mesh, shardings, jitted functions, data."""

    mcfg: object
    tcfg: TrainConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    merge: Callable  # params -> model
    abstract_params: object
    param_sh: object
    opt_sh: object
    batch_sh: NamedSharding
    eval_batch_sh: NamedSharding
    init_params: Callable
    init_opt: Callable
    train_step: Callable
    eval_step: Callable
    flops_per_token: float
    n_params: int
    packed_documents: bool  # does the model keep packed documents apart (glocal.models.base)?


def _opt_shardings(abstract_opt, param_sh, mesh):
    """Optimizer state that mirrors the parameters (Adam's mu and nu: subtrees with exactly
    the params' tree structure) takes the parameter shardings; the rest (step counts) is
    replicated. Matched by structure, so no leaf can pick up another parameter's sharding."""
    params_def = jax.tree_util.tree_structure(param_sh)  # a sharding per parameter, same tree
    mirrors = lambda x: jax.tree_util.tree_structure(x) == params_def
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: param_sh if mirrors(x) else replicated, abstract_opt, is_leaf=mirrors)


def build_setup(mcfg, tcfg: TrainConfig, devices=None) -> Setup:
    mesh = shd.make_mesh(tcfg.mesh_sizes, devices)
    rules = shd.rule_table(tcfg.sharding)
    micro = tcfg.batch_size // tcfg.grad_accum
    if micro % shd.batch_divisor(mesh):
        raise ConfigError(
            f"the microbatch of {micro} sequences (batch_size / grad_accum) does not split over the "
            f"{shd.batch_divisor(mesh)} data-parallel devices of mesh {dict(mesh.shape)}; use a "
            f"batch_size that is a multiple of {shd.batch_divisor(mesh) * tcfg.grad_accum}.")
    seed = tcfg.seed
    abstract_model = nnx.eval_shape(lambda: gm.build_from_config(mcfg, seed=seed))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    # Non-parameter state (buffers, tables) is not trained: built once from the config and
    # closed over as constants (deterministic, so it needs no checkpoint).
    rest = (jax.jit(lambda: nnx.split(gm.build_from_config(mcfg, seed=seed), nnx.Param, ...)[2])()
            if jax.tree.leaves(abstract_rest) else None)
    merge = (lambda p: nnx.merge(graphdef, p)) if rest is None else (lambda p: nnx.merge(graphdef, p, rest))
    param_sh = shd.variable_shardings(abstract_params, mesh, rules)
    tx = make_optimizer(tcfg, abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = _opt_shardings(abstract_opt, param_sh, mesh)
    replicated = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, shd.batch_spec(3, leading=1))
    eval_batch_sh = NamedSharding(mesh, shd.batch_spec(2))

    init_params = jax.jit(lambda: nnx.state(gm.build_from_config(mcfg, seed=seed), nnx.Param),
                          out_shardings=param_sh)
    init_opt = jax.jit(tx.init, in_shardings=(param_sh,), out_shardings=opt_sh)
    train_step = jax.jit(make_train_step(merge, tx, tcfg.z_loss),
                         in_shardings=(param_sh, opt_sh, batch_sh),
                         out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(merge), in_shardings=(param_sh, eval_batch_sh),
                        out_shardings=(replicated, replicated))
    n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
    fpt = (abstract_model.flops_per_token(tcfg.seq_len) if hasattr(abstract_model, "flops_per_token")
           else 6.0 * n_params)
    return Setup(mcfg, tcfg, mesh, rules, merge, abstract_params, param_sh, opt_sh, batch_sh,
                 eval_batch_sh, init_params, init_opt, train_step, eval_step, fpt, n_params,
                 bool(getattr(abstract_model, "packed_documents", False)))


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _to_device(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(setup: Setup, params, batches, tokens_per_byte: float | None = 1.0) -> tuple[float, float]:
    """``(mean loss in nats/token, bits per byte)`` over fixed validation batches: bits/token
    times ``tokens_per_byte`` (``data.tokens_per_byte``: 1 for the byte tokenizer, whose
    tokens are bytes). With ``None`` (bytes unknown) the second number is bits/token."""
    total, count = 0.0, 0.0
    for b in batches:
        s, n = setup.eval_step(params, _to_device(b, setup.eval_batch_sh))
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return loss, loss / math.log(2) * (tokens_per_byte or 1.0)


def dry_run_report(setup: Setup) -> dict:
    """Compile one step and report sizes from the compiled executable."""
    tcfg = setup.tcfg
    A, b, T = tcfg.grad_accum, tcfg.batch_size // tcfg.grad_accum, tcfg.seq_len
    batch = {k: jax.ShapeDtypeStruct((A, b, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=setup.batch_sh)
             for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    abs_p = _with_shardings(setup.abstract_params, setup.param_sh)
    abs_o = jax.eval_shape(setup.init_opt, abs_p)
    abs_o = _with_shardings(abs_o, setup.opt_sh)
    t = time.perf_counter()
    compiled = setup.train_step.lower(abs_p, abs_o, batch).compile()
    compile_s = time.perf_counter() - t

    def per_device(tree):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree))

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return {
        "params": setup.n_params,
        "devices": int(setup.mesh.size), "mesh": dict(setup.mesh.shape),
        "param_bytes_per_device": per_device(abs_p),
        "opt_state_bytes_per_device": per_device(abs_o),
        "activation_temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
        "generated_code_bytes": getattr(mem, "generated_code_size_in_bytes", None),
        "model_flops_per_token": setup.flops_per_token,
        "xla_flops_per_token_per_device": (cost.get("flops", float("nan")) / (tcfg.tokens_per_step
                                           / setup.mesh.size)) if cost else None,
        "compile_s": compile_s,
    }


def _print_dry_run(report: dict, log) -> None:
    gib = lambda x: "n/a" if x is None else f"{x / 2**20:,.1f} MiB"
    log(f"dry run: compiled one step in {report['compile_s']:.1f} s on {report['devices']} device(s), "
        f"mesh {report['mesh']}")
    log(f"  parameters            {report['params']:,}")
    log(f"  params / device       {gib(report['param_bytes_per_device'])}")
    log(f"  optimizer / device    {gib(report['opt_state_bytes_per_device'])}")
    log(f"  activations+temp / device (compiled) {gib(report['activation_temp_bytes_per_device'])}")
    log(f"  model FLOPs / token   {report['model_flops_per_token']:,.0f} (6N + attention)")
    if report["xla_flops_per_token_per_device"] is not None:
        log(f"  XLA cost-analysis FLOPs / token / device {report['xla_flops_per_token_per_device']:,.0f} "
            f"(counts a scanned layer body once)")


def train(config_name: str | None, workdir, overrides: dict[str, str] | None = None, *,
          hooks: Iterable[Callable[[int], None]] = (), devices=None) -> dict:
    """Train (or resume) into ``workdir``; returns a summary dict.

    ``hooks`` are called with the step number after every step (tests use them to
    simulate preemption); ``devices`` restricts the mesh (default: all devices).
    """
    distributed.maybe_initialize()
    primary = jax.process_index() == 0
    log = print if primary else (lambda *a, **k: None)
    workdir = pathlib.Path(workdir)
    mcfg, tcfg = resolve_configs(config_name, workdir, overrides or {})
    tokenizer, record = resolve_tokenizer(workdir, tcfg.tokenizer, mcfg)
    setup = build_setup(mcfg, tcfg, devices)
    active = active_param_count(nnx.eval_shape(lambda: gm.build_from_config(mcfg)))
    routed = f" ({active / 1e6:.2f}M active per token)" if active < setup.n_params else ""
    log(f"model {gm.model_name(mcfg)}: {setup.n_params / 1e6:.2f}M parameters{routed}, "
        f"{setup.flops_per_token / 1e6:.1f} MFLOPs/token; mesh {dict(setup.mesh.shape)}, "
        f"rules {tcfg.sharding}")
    if getattr(tokenizer, "name", None) != "byte":
        sources = getattr(tokenizer, "sources", {})
        log(f"tokenizer {tokenizer.name}: {tokenizer.vocab_size:,} ids; "
            + ", ".join(f"{k.upper()} {v}" + (f" ({sources[k]})" if k in sources else "")
                        for k, v in (("bos", tokenizer.bos_id), ("eos", stop_ids(tokenizer)),
                                     ("pad", tokenizer.pad_id))))
    for line in shd.describe_dropped(setup.abstract_params, setup.mesh, setup.rules)[:5]:
        log(f"  note: {line} (dimension not divisible)")
    if tcfg.pack and not setup.packed_documents:
        log(f"  note: {gm.model_name(mcfg)} cannot keep packed documents apart: a document sees the earlier "
            f"documents of its window (cross-document targets are still left out of the loss).")
    with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules):
        if tcfg.dry_run:
            report = dry_run_report(setup)
            _print_dry_run(report, log)
            return report
        # Only the coordinator writes, so only its lock matters (other hosts write nothing).
        lock = WorkdirLock(workdir) if primary else contextlib.nullcontext()
        if primary:
            workdir.mkdir(parents=True, exist_ok=True)
        try:
            with lock:
                return _train_loop(setup, workdir, tokenizer, record, hooks, log, primary)
        except WorkdirBusy as e:
            raise workdirs.WorkdirError(str(e)) from None


def _train_loop(setup: Setup, workdir: pathlib.Path, tokenizer, record: str, hooks, log, primary) -> dict:
    mcfg, tcfg = setup.mcfg, setup.tcfg
    corpus = data.load_corpus(tcfg.data, tokenizer=tokenizer, vocab_size=mcfg.vocab_size,
                              val_spec=tcfg.val_data, val_fraction=tcfg.val_fraction,
                              data_dtype=tcfg.data_dtype, eos_id=tcfg.eos_id)
    log(f"data: {corpus.description}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens, "
        f"fingerprint {corpus.fingerprint}")
    train_windows = data.Windows(corpus.train, tcfg.seq_len, corpus.eos_id, tcfg.pack, "training split")
    val_windows = data.Windows(corpus.val, tcfg.seq_len, corpus.eos_id, tcfg.pack, "validation split")
    host, hosts = jax.process_index(), jax.process_count()
    data_iter = data.train_iterator(train_windows, batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum,
                                    seed=tcfg.seed, host=host, num_hosts=hosts, threads=tcfg.data_threads)
    val_batches = data.eval_batches(val_windows, batch_size=tcfg.batch_size // tcfg.grad_accum,
                                    num_batches=tcfg.eval_batches * tcfg.grad_accum, host=host,
                                    num_hosts=hosts)

    if primary:
        _keep_tokenizer(workdir, tokenizer, record)
        workdirs.write_model_file(workdir, mcfg, record)
    ckpt = TrainCheckpointer(workdir, keep_last=tcfg.keep_last, keep_every=tcfg.keep_every,
                             async_save=tcfg.async_checkpoint, log=log)
    try:
        return _run(setup, workdir, tokenizer, hooks, log, primary, corpus, data_iter, val_batches, ckpt)
    finally:
        ckpt.close()  # waits for pending async saves, whatever happened


def _restore(setup: Setup, workdir: pathlib.Path, ckpt: TrainCheckpointer, corpus, data_iter, log):
    """``(params, opt_state, meta)`` from the newest readable checkpoint, or a fresh start.
    Refuses (raising, moving nothing) a checkpoint trained on other data or whose trees do
    not fit this run, and says how to proceed."""
    tcfg = setup.tcfg
    data_changed = False

    def check(step, meta) -> bool:
        """Refuse other data unless allowed; with new data the saved data position is void."""
        nonlocal data_changed
        old = meta.get("data_fingerprint")
        if old is None or old == corpus.fingerprint:
            return True
        if not tcfg.allow_data_change:
            raise workdirs.WorkdirError(
                f"checkpoint step {step} was trained on other data (fingerprint {old}, data="
                f"{meta.get('data', '?')!r}); this run's data={tcfg.data!r} has fingerprint {corpus.fingerprint}. "
                f"Resume with the same data, or pass allow_data_change=true to continue on the new data.")
        data_changed = True
        return False

    abstract_opt = jax.eval_shape(setup.init_opt, setup.abstract_params)
    try:
        restored = ckpt.restore_latest(_with_shardings(setup.abstract_params, setup.param_sh),
                                       _with_shardings(abstract_opt, setup.opt_sh), data_iter, check=check,
                                       restore_opt=not tcfg.reset_optimizer)
    except CheckpointMismatch as e:
        raise workdirs.WorkdirError(_explain_mismatch(e, workdir, tcfg)) from None
    if restored is None:
        if workdirs.has_init_params(workdir):  # an imported checkpoint: fine-tune it
            params = workdirs.restore_init_params(workdir, _with_shardings(setup.abstract_params, setup.param_sh))
            log(f"starting from the imported weights in {workdir / workdirs.INIT_DIR}")
        elif (workdir / workdirs.HF_SOURCE_DIR).is_dir():  # never fine-tune random weights by mistake
            raise workdirs.WorkdirError(
                f"{workdir} was made by glocal convert but its imported weights ({workdir / workdirs.INIT_DIR}/params) "
                f"are missing; convert the checkpoint again into a new --workdir.")
        else:
            params = setup.init_params()
        return params, setup.init_opt(params), {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    params, opt_state, meta = restored
    log(f"resumed from checkpoint step {meta['step']} ({meta['tokens']:,} tokens)")
    if opt_state is None:
        log("  reset_optimizer=true: the weights are resumed, the optimizer state starts fresh.")
        opt_state = setup.init_opt(params)
    if data_changed:
        log(f"  allow_data_change=true: training continues on new data (fingerprint {meta.get('data_fingerprint')} "
            f"-> {corpus.fingerprint}); the data order starts over.")
    return params, opt_state, meta


def _explain_mismatch(e: CheckpointMismatch, workdir: pathlib.Path, tcfg: TrainConfig) -> str:
    where = f"checkpoint {workdir}/checkpoints/{e.step}"
    if e.item == "parameters":
        return (f"{where} is readable but its parameters do not fit this model ({e.detail}): it was written by "
                f"another version of glocal or another model config. Train into a new --workdir (every "
                f"checkpoint is left as it was).")
    old = e.meta.get("train_config") or previous_run_config(workdir) or {}
    changed = [k for k in OPTIMIZER_OPTIONS if k in old and old[k] != getattr(tcfg, k)]
    what = "; ".join(f"{k}={old[k]!r} then, {getattr(tcfg, k)!r} now" for k in changed) or "an optimizer option"
    fix = ", ".join(f"{k}={old[k]}" for k in changed)
    return (f"{where} is readable but its optimizer state does not fit this run ({what}). Resume with the "
            f"old value{'s (' + fix + ')' if fix else 's'}, train into a new --workdir, or pass "
            f"reset_optimizer=true to keep the weights and start a fresh optimizer state. Every checkpoint "
            f"is left as it was.")


def _run(setup: Setup, workdir, tokenizer, hooks, log, primary, corpus, data_iter, val_batches, ckpt) -> dict:
    mcfg, tcfg = setup.mcfg, setup.tcfg
    params, opt_state, meta = _restore(setup, workdir, ckpt, corpus, data_iter, log)
    start = int(meta["step"])
    if primary:
        with (workdir / RUNS_FILE).open("a") as f:
            f.write(json.dumps({"start_step": start, "time": time.time(), "devices": jax.device_count(),
                                "mesh": dict(setup.mesh.shape), "data_fingerprint": corpus.fingerprint,
                                "config": tcfg.to_dict()}) + "\n")
    if start >= tcfg.steps:
        log(f"{workdir} is already trained to step {start} (steps={tcfg.steps}); pass a larger "
            f"steps= to continue training.")
        return {"step": start, "params": setup.n_params, "resumed_from": start}

    writer = MetricsWriter(workdir, tensorboard=tcfg.tensorboard, enabled=primary)
    abandoned = writer.drop_after(start)  # steps logged after the checkpoint we resume from
    if abandoned:
        log(f"  {abandoned} metrics lines after step {start} (from a run that did not checkpoint them) moved to "
            f"{writer.abandoned_path.name}")
    lr_at = schedule(tcfg)
    peak = peak_flops(mcfg.dtype if hasattr(mcfg, "dtype") else "float32") if not tcfg.peak_flops else tcfg.peak_flops
    peak_total = peak * jax.device_count()
    tokens, elapsed0, run_t0 = int(meta["tokens"]), float(meta["elapsed_s"]), time.perf_counter()
    elapsed = lambda: elapsed0 + time.perf_counter() - run_t0  # wall-clock over all resumed runs
    history, last_eval = [], None
    # Lines printed while the progress bar is shown go above it, not onto it.
    say = (lambda msg: tqdm.write(msg)) if primary else (lambda msg: None)

    def meta_now(step):
        return {"step": step, "tokens": tokens, "elapsed_s": elapsed(), "seed": tcfg.seed,
                "data_fingerprint": corpus.fingerprint, "data": tcfg.data, "train_config": tcfg.to_dict()}

    def last_good() -> str:
        steps = ckpt.all_steps()
        return (f"the last checkpoint, step {steps[-1]}, has finite weights" if steps
                else "no checkpoint was written")

    def save(step):
        # Never checkpoint non-finite weights: a resume from them could never recover.
        if not bool(workdirs.all_finite(params)):
            ckpt.manager.wait_until_finished()
            raise TrainingDiverged(
                f"the weights became non-finite by step {step} (not saved; {last_good()}). Lower "
                f"learning_rate (now {tcfg.learning_rate}), raise warmup_steps or set grad_clip, then resume.")
        ckpt.save(step, params, opt_state, meta_now(step), data_iter)

    per_byte = data.tokens_per_byte(corpus, tokenizer, tcfg.pack)

    def run_eval(step, out=say):
        nonlocal last_eval
        loss, bpb = evaluate(setup, params, val_batches, per_byte)
        last_eval = {"step": step, "tokens": tokens, "elapsed_s": elapsed(), "eval_loss": loss, "eval_bpb": bpb}
        writer.write(last_eval)
        out(f"step {step}: validation loss {loss:.4f} nats/token = {bpb:.3f} {bits_label(per_byte)}")

    bar = tqdm(range(start + 1, tcfg.steps + 1), desc="train", unit="step", dynamic_ncols=True,
               disable=not primary, initial=start, total=tcfg.steps)
    t_last, tok_last, saved_at, step = time.perf_counter(), tokens, start, start
    with distributed.StopRequest() as stop:
        for step in bar:
            batch = _to_device(next(data_iter), setup.batch_sh)
            params, opt_state, metrics = setup.train_step(params, opt_state, batch)
            tokens += tcfg.tokens_per_step
            if step == start + 1:  # exclude compilation from the throughput figures
                jax.block_until_ready(metrics)
                t_last, tok_last = time.perf_counter(), tokens
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(m["loss"]):
                    ckpt.manager.wait_until_finished()
                    raise TrainingDiverged(
                        f"the loss became {m['loss']} at step {step} ({last_good()}). Lower learning_rate "
                        f"(now {tcfg.learning_rate}), raise warmup_steps or set grad_clip, then resume.")
                now = time.perf_counter()
                tps = (tokens - tok_last) / (now - t_last) if tokens > tok_last else float("nan")
                t_last, tok_last = now, tokens
                record = {"step": step, "tokens": tokens, "elapsed_s": elapsed(), **m,
                          "lr": float(lr_at(step - 1)), "tokens_per_s": tps,
                          "mfu": tps * setup.flops_per_token / peak_total}
                writer.write(record)
                history.append(record)
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.0%}")
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
                run_eval(step)
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                save(step)
                saved_at = step
            for hook in hooks:
                hook(step)
            if _stop_requested(stop):
                break
    bar.close()
    stopped = step < tcfg.steps
    if saved_at != step:
        save(step)
    if stopped:
        log(f"stopped by signal at step {step}; checkpoint saved. Run the same command to resume.")
        writer.close()
        return {"step": step, "stopped": True, "history": history, "params": setup.n_params}
    run_eval(step, out=log)
    writer.close()
    summary = {"step": step, "history": history, "params": setup.n_params, **(last_eval or {})}
    if tcfg.sample_tokens and jax.process_count() == 1 and primary:
        summary["sample"] = _sample(setup, params, tokenizer, log)
    return summary


def _stop_requested(stop: distributed.StopRequest) -> bool:
    if jax.process_count() == 1:
        return stop.requested
    from jax.experimental import multihost_utils  # every host must stop at the same step

    return bool(np.any(multihost_utils.process_allgather(np.array(stop.requested))))


def _sample(setup: Setup, params, tokenizer, log) -> str:
    tcfg = setup.tcfg
    model = setup.merge(jax.device_get(params))
    prompt = tokenizer.encode(tcfg.sample_prompt) or [tokenizer.bos_id]
    n = min(tcfg.sample_tokens, setup.mcfg.max_seq_len - len(prompt))
    new = glocal.generate(model, [prompt], n, temperature=0.8, top_k=40, seed=tcfg.seed,
                          stop_tokens=stop_ids(tokenizer))[0]
    text = tcfg.sample_prompt + decode_continuation(tokenizer, prompt, new)
    log("sample:\n" + text)
    return text
