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
from tqdm import tqdm

import glocal
import glocal.models as gm
from glocal import sharding as shd
from glocal import workdir as workdirs
from glocal.errors import UserError
from glocal.tokenizers import decode_continuation, stop_ids
from glocal.train import data, distributed
from glocal.train.build import (Setup, _to_device, _with_shardings, bits_label, build_setup, dry_run_report,
                                evaluate, print_dry_run)
from glocal.train.build import _opt_shardings  # noqa: F401 (tests/test_sharding.py imports it from here)
from glocal.train.checkpoints import CheckpointMismatch, TrainCheckpointer
from glocal.train.config import TrainConfig
from glocal.train.lock import WorkdirBusy, WorkdirLock
from glocal.train.metrics import MetricsWriter, peak_flops
from glocal.train.optim import schedule

# Training options that shape the optimizer state (a resume with other values cannot reuse it).
OPTIMIZER_OPTIONS = ("grad_clip", "weight_decay", "no_decay", "b1", "b2", "eps", "lr_schedule", "warmup_steps",
                     "learning_rate", "min_lr_ratio", "grad_accum")


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or the weights became non-finite; no non-finite checkpoint was written (the
    CLI prints the message, which names the last finite checkpoint, and exits 2)."""


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
    mcfg, tcfg = workdirs.resolve_configs(config_name, workdir, overrides or {})
    tokenizer, record = workdirs.resolve_tokenizer(workdir, tcfg.tokenizer, mcfg)
    setup = build_setup(mcfg, tcfg, devices)
    _describe(setup, tokenizer, log)
    with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules):
        if tcfg.dry_run:
            report = dry_run_report(setup)
            print_dry_run(report, log)
            return report
        # Only the coordinator writes, so only its lock matters (other hosts write nothing).
        lock = WorkdirLock(workdir) if primary else contextlib.nullcontext()
        if primary:
            workdir.mkdir(parents=True, exist_ok=True)
        try:
            with lock:
                return _train_in(workdir, setup, tokenizer, record, hooks, log, primary)
        except WorkdirBusy as e:
            raise workdirs.WorkdirError(str(e)) from None


def _describe(setup: Setup, tokenizer, log) -> None:
    """The run's first lines: model size and mesh, tokenizer, sharding and packing notes."""
    mcfg, tcfg = setup.mcfg, setup.tcfg
    routed = f" ({setup.n_active / 1e6:.2f}M active per token)" if setup.n_active < setup.n_params else ""
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


@dataclasses.dataclass
class _Run:
    """One invocation's training state, which the loop's steps below read and update."""

    setup: Setup
    tokenizer: object
    primary: bool  # process 0: the one that writes and prints
    log: Callable[[str], None]
    data: data.RunData
    data_iter: object  # grain iterator of this host's training batches (checkpointed)
    ckpt: TrainCheckpointer
    writer: MetricsWriter
    params: object
    opt_state: object
    step: int  # the last step taken
    tokens: int
    elapsed0: float  # wall-clock seconds of the earlier runs this one resumes
    lr_at: Callable[[int], float]
    peak_total: float  # FLOP/s of all devices, for MFU
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    t_last: float = 0.0  # throughput is measured from (t_last, tok_last) to the next log line
    tok_last: int = 0
    history: list = dataclasses.field(default_factory=list)
    last_eval: dict | None = None

    def elapsed(self) -> float:
        """Wall-clock seconds over all resumed runs."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        """A line printed while the progress bar is shown: above it, not onto it."""
        if self.primary:
            tqdm.write(msg)


def _train_in(workdir: pathlib.Path, setup: Setup, tokenizer, record: str, hooks, log, primary) -> dict:
    """Load the data, record the model, resume or start, and train to ``steps``."""
    mcfg, tcfg = setup.mcfg, setup.tcfg
    rd = data.run_data(tcfg, tokenizer, mcfg.vocab_size, rows=setup.rows, log=log)
    data_iter = data.train_iterator(rd.train_windows, batch_size=tcfg.batch_size, grad_accum=tcfg.grad_accum,
                                    seed=tcfg.seed, rows=setup.rows, threads=tcfg.data_threads)
    if primary:
        workdirs.keep_tokenizer(workdir, tokenizer, record)
        workdirs.write_model_file(workdir, mcfg, record)
    ckpt = TrainCheckpointer(workdir, keep_last=tcfg.keep_last, keep_every=tcfg.keep_every,
                             async_save=tcfg.async_checkpoint, log=log)
    abandon = False
    try:
        params, opt_state, meta = _restore(setup, workdir, ckpt, rd.corpus, data_iter, log)
        start = int(meta["step"])
        if primary:
            with (workdir / workdirs.RUNS_FILE).open("a") as f:
                f.write(json.dumps({"start_step": start, "time": time.time(), "devices": jax.device_count(),
                                    "mesh": dict(setup.mesh.shape), "data_fingerprint": rd.corpus.fingerprint,
                                    "config": tcfg.to_dict()}) + "\n")
        if start >= tcfg.steps:
            log(f"{workdir} is already trained to step {start} (steps={tcfg.steps}); pass a larger "
                f"steps= to continue training.")
            return {"step": start, "params": setup.n_params, "resumed_from": start}
        writer = MetricsWriter(workdir, tensorboard=tcfg.tensorboard, enabled=primary)
        abandoned = writer.drop_after(start)  # steps logged after the checkpoint we resume from
        if abandoned:
            log(f"  {abandoned} metrics lines after step {start} (from a run that did not checkpoint them) moved "
                f"to {writer.abandoned_path.name}")
        peak = tcfg.peak_flops or peak_flops(mcfg.dtype if hasattr(mcfg, "dtype") else "float32")
        run = _Run(setup, tokenizer, primary, log, rd, data_iter, ckpt, writer, params, opt_state,
                   step=start, tokens=int(meta["tokens"]), elapsed0=float(meta["elapsed_s"]),
                   lr_at=schedule(tcfg), peak_total=peak * jax.device_count())
        return _loop(run, hooks)
    except BaseException as e:
        # A pending save needs every process; after a lost one it would wait for ever: abandon it.
        abandon = distributed.in_job() and distributed.is_peer_loss(e)
        raise
    finally:
        if not abandon:
            ckpt.close()  # waits for pending async saves


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
    old = e.meta.get("train_config") or workdirs.previous_run_config(workdir) or {}
    changed = [k for k in OPTIMIZER_OPTIONS if k in old and old[k] != getattr(tcfg, k)]
    what = "; ".join(f"{k}={old[k]!r} then, {getattr(tcfg, k)!r} now" for k in changed) or "an optimizer option"
    fix = ", ".join(f"{k}={old[k]}" for k in changed)
    return (f"{where} is readable but its optimizer state does not fit this run ({what}). Resume with the "
            f"old value{'s (' + fix + ')' if fix else 's'}, train into a new --workdir, or pass "
            f"reset_optimizer=true to keep the weights and start a fresh optimizer state. Every checkpoint "
            f"is left as it was.")


def _loop(run: _Run, hooks) -> dict:
    """Steps ``start + 1 .. steps``: train, log, evaluate and checkpoint on their cadences,
    until the end or a stop request (SIGTERM/SIGINT); then ``_finish``."""
    tcfg = run.setup.tcfg
    start = saved_at = run.step
    bar = tqdm(range(start + 1, tcfg.steps + 1), desc="train", unit="step", dynamic_ncols=True,
               disable=not run.primary, initial=start, total=tcfg.steps)
    run.t_last, run.tok_last = time.perf_counter(), run.tokens
    with distributed.StopRequest() as stop:
        for step in bar:
            metrics = _take_step(run, step)
            if step == start + 1:  # exclude compilation from the throughput figures
                jax.block_until_ready(metrics)
                run.t_last, run.tok_last = time.perf_counter(), run.tokens
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                _record(run, metrics, bar)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
                _validate(run, run.say)
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                _save(run)
                saved_at = step
            for hook in hooks:
                hook(step)
            if stop.agreed():  # every process stops after the same step
                break
    bar.close()
    return _finish(run, saved_at)


def _take_step(run: _Run, step: int):
    """One optimizer step on the next batch; its metrics (on device)."""
    batch = _to_device(next(run.data_iter), run.setup.batch_sh, run.setup.tcfg.microbatch)
    run.params, run.opt_state, metrics = run.setup.train_step(run.params, run.opt_state, batch)
    run.step, run.tokens = step, run.tokens + run.setup.tcfg.tokens_per_step
    return metrics


def _record(run: _Run, metrics, bar) -> None:
    """Write the step's metrics line; a non-finite loss stops the run (TrainingDiverged)."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
        run.ckpt.manager.wait_until_finished()
        raise TrainingDiverged(
            f"the loss became {m['loss']} at step {run.step} ({_last_good(run.ckpt)}). Lower learning_rate "
            f"(now {run.setup.tcfg.learning_rate}), raise warmup_steps or set grad_clip, then resume.")
    now = time.perf_counter()
    tps = (run.tokens - run.tok_last) / (now - run.t_last) if run.tokens > run.tok_last else float("nan")
    run.t_last, run.tok_last = now, run.tokens
    record = {"step": run.step, "tokens": run.tokens, "elapsed_s": run.elapsed(), **m,
              "lr": float(run.lr_at(run.step - 1)), "tokens_per_s": tps,
              "mfu": tps * run.setup.flops_per_token / run.peak_total}
    run.writer.write(record)
    run.history.append(record)
    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.0%}")


def _validate(run: _Run, out) -> None:
    """Validation loss and bits per byte now: a metrics line, and a line to ``out``."""
    per_byte = run.data.tokens_per_byte
    loss, bpb = evaluate(run.setup, run.params, run.data.val_batches, per_byte)
    run.last_eval = {"step": run.step, "tokens": run.tokens, "elapsed_s": run.elapsed(), "eval_loss": loss,
                     "eval_bpb": bpb}
    run.writer.write(run.last_eval)
    out(f"step {run.step}: validation loss {loss:.4f} nats/token = {bpb:.3f} {bits_label(per_byte)}")


def _save(run: _Run) -> None:
    """Checkpoint the step; never non-finite weights (a resume from them could never
    recover): those stop the run (TrainingDiverged)."""
    tcfg = run.setup.tcfg
    if not bool(workdirs.all_finite(run.params)):
        run.ckpt.manager.wait_until_finished()
        raise TrainingDiverged(
            f"the weights became non-finite by step {run.step} (not saved; {_last_good(run.ckpt)}). Lower "
            f"learning_rate (now {tcfg.learning_rate}), raise warmup_steps or set grad_clip, then resume.")
    meta = {"step": run.step, "tokens": run.tokens, "elapsed_s": run.elapsed(), "seed": tcfg.seed,
            "data_fingerprint": run.data.corpus.fingerprint, "data": tcfg.data, "train_config": tcfg.to_dict()}
    run.ckpt.save(run.step, run.params, run.opt_state, meta, run.data_iter)


def _last_good(ckpt: TrainCheckpointer) -> str:
    steps = ckpt.all_steps()
    return f"the last checkpoint, step {steps[-1]}, has finite weights" if steps else "no checkpoint was written"


def _finish(run: _Run, saved_at: int) -> dict:
    """Save the last step (unless just saved); after a stop request, that is all. Otherwise
    a final evaluation and (single process) a sample; the run's summary."""
    setup, step = run.setup, run.step
    if saved_at != step:
        _save(run)
    if step < setup.tcfg.steps:
        run.log(f"stopped by signal at step {step}; checkpoint saved. Run the same command to resume.")
        run.writer.close()
        return {"step": step, "stopped": True, "history": run.history, "params": setup.n_params}
    _validate(run, run.log)
    run.writer.close()
    summary = {"step": step, "history": run.history, "params": setup.n_params, **(run.last_eval or {})}
    if setup.tcfg.sample_tokens and jax.process_count() == 1 and run.primary:
        summary["sample"] = _sample(setup, run.params, run.tokenizer, run.log)
    return summary


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
