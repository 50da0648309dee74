"""Workdirs: the model record (which model a workdir holds) and loading a trained model.
Saving and restoring the full training state is ``glocal.train.checkpoints``.

    DIR/model.json                  {"model": family, "config": {...}, "tokenizer": "byte"}
    DIR/runs.jsonl                  the training config of every ``glocal train`` invocation
    DIR/tokenizer/                  the workdir's copy of a tokenizer made of files; model.json
                                    names it relative to DIR ("tokenizer": "hf:tokenizer")
    DIR/checkpoints/<step>/params   orbax checkpoint of the model's nnx.Param state
                                    (written by glocal.train.checkpoints with the optimizer
                                    state, data iterator and run metadata beside it)
    DIR/init/params                 optional starting weights (an imported checkpoint,
                                    ``glocal convert``): the step-0 model, which training
                                    starts from instead of a random initialisation

``write_model_file`` never replaces a workdir's model.json with a different model:
nothing saved is lost silently. ``load_model`` reads a trained model back.
``resolve_configs`` and ``resolve_tokenizer`` say what a run on a workdir uses (its last
run's training config and its model.json, plus the command's overrides).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

import glocal.models as gm
from glocal.configs.base import ConfigError
from glocal.errors import UserError
from glocal.tokenizers import get_tokenizer, same_tokenizer
from glocal.train.config import TrainConfig, split_overrides

MODEL_FILE = "model.json"
INIT_DIR = "init"
TOKENIZER_DIR = "tokenizer"
HF_SOURCE_DIR = "hf_source"  # an imported workdir's original config files (glocal convert)
RUNS_FILE = "runs.jsonl"
ONE_OFF_OPTIONS = ("dry_run", "reset_optimizer", "allow_data_change")  # never inherited by a resume


class WorkdirError(UserError, RuntimeError):
    """The workdir is missing, holds something else, cannot be written, or its checkpoint
    is unreadable."""


def _is_remote(path) -> bool:
    return "://" in str(path)  # gs://... and the like: not checkable with the os module


def check_workdir(path, writable: bool = True) -> pathlib.Path:
    """Fail early, with a WorkdirError that says how to fix it, when ``path`` cannot serve
    as a workdir: it is a file (or below one), or (``writable``) neither it nor the folder
    it would be created in can be written. A missing ``path`` is fine when ``writable``
    (training creates it); readers report a missing workdir themselves. Creates nothing
    (a probe file is written and removed again to catch read-only mounts)."""
    path = pathlib.Path(path).expanduser()
    if _is_remote(path):
        return path
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {path} is a file, not a folder; pass a new folder or an "
                           f"existing glocal workdir.")
    if not writable:
        if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            raise WorkdirError(f"workdir {path} cannot be read (permission denied); fix its "
                               f"permissions or run as its owner.")
        return path
    existing = path
    while not existing.exists():  # the folder the missing part would be created in
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise WorkdirError(f"workdir {path} cannot be created: {existing} is a file, not a folder.")
    what = "is read-only" if existing == path else f"cannot be created: {existing} is read-only"
    fix = ("pass a folder you can write to, or fix its permissions (e.g. chmod u+w " f"{existing}).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path} {what}; {fix}")
    try:  # permissions can say yes on a read-only file system
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".glocal-write-probe-"):
            pass
    except OSError as e:
        raise WorkdirError(f"workdir {path} {what} ({e.strerror}); {fix}") from None
    return path


def _from_orbax(exc) -> bool:
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _read_straggler(unraisable) -> bool:
    """An abandoned orbax read coroutine, or a tensorstore callback into its closed loop."""
    exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    return ((isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")
            or (code is not None and "orbax" in code.co_filename) or _from_orbax(exc))


class _DropOrbaxErrors(logging.Filter):
    """Drops records of ERROR and above that carry an exception raised inside orbax (and,
    with ``bare=True``, those that carry no exception at all)."""

    def __init__(self, bare: bool = False):
        super().__init__()
        self.bare = bare

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.levelno >= logging.ERROR and (_from_orbax(exc) if exc else self.bare))


_stragglers_dropped = False  # a failed read left its hook and filter in place


@contextlib.contextmanager
def _quiet_failed_read():
    """A failed orbax read is reported by the WorkdirError raised instead, but orbax also
    logs it (absl), and its abandoned coroutines and tensorstore's callbacks into its closed
    event loop report it again, from other threads and at interpreter exit ("Exception
    ignored in: <coroutine ...>", "RuntimeError: Event loop is closed", asyncio's "Task
    exception was never retrieved"): 20-60 lines of tracebacks. Those reports, and only
    those, are dropped during the read and, if it fails, for the rest of the process.
    Warnings pass."""
    global _stragglers_dropped
    absl_drop = _DropOrbaxErrors(bare=True)
    logging.getLogger("absl").addFilter(absl_drop)
    if _stragglers_dropped:  # (after an earlier failure: nothing more to add)
        try:
            yield
        finally:
            logging.getLogger("absl").removeFilter(absl_drop)
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _read_straggler(unraisable):
            previous(unraisable)

    asyncio_drop = _DropOrbaxErrors()
    logging.getLogger("asyncio").addFilter(asyncio_drop)
    sys.unraisablehook = hook
    try:
        yield
    except Exception:
        _stragglers_dropped = True  # its stragglers keep coming: the hook and filter stay
        raise
    else:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        logging.getLogger("asyncio").removeFilter(asyncio_drop)
    finally:
        logging.getLogger("absl").removeFilter(absl_drop)


def _reason(e: BaseException, limit: int = 200) -> str:
    """One line naming the innermost cause of ``e`` (orbax wraps tensorstore's message)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split())
    if len(text) > limit:  # the start says what was read, the end what went wrong
        text = text[:limit // 2 - 2] + " ... " + text[-(limit // 2 - 3):]
    return f"{type(e).__name__}: {text}"


def _manager(workdir: pathlib.Path, create: bool = False) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False),
    )


def _same_model(old: dict, record: dict, config) -> bool:
    """``old`` (a ``model.json`` record, possibly in an older layout such as the flat kind
    options of earlier versions) describes the same model as ``record``. The file itself is
    left as it was: it is the user's, and every version reads it."""
    if {k: v for k, v in old.items() if k != "config"} != {k: v for k, v in record.items() if k != "config"}:
        return False
    try:
        return type(config).from_dict(old.get("config", {})) == config
    except UserError:
        return False


def write_model_file(workdir, config, tokenizer: str = "byte") -> None:
    """Record the model (its config, or a model with ``.config``) in ``workdir/model.json``."""
    config = getattr(config, "config", config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"model": gm.model_name(config), "config": config.to_dict(), "tokenizer": tokenizer}
    path = workdir / MODEL_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != record and not _same_model(old, record, config):
            raise WorkdirError(
                f"{path} describes a different model ({old.get('model')} with another config); "
                f"use a new --workdir instead of overwriting it."
            )
        return
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_model_file(workdir) -> dict:
    path = pathlib.Path(workdir) / MODEL_FILE
    if not path.exists():
        raise WorkdirError(f"{workdir} is not a glocal workdir (no {MODEL_FILE}); train into it first "
                           f"(glocal train --config <model>_<preset> --workdir {workdir}), or generate "
                           f"with --config <model>_<preset> from an untrained preset.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is corrupt ({e}); restore it from a backup.") from None


def load_tokenizer(workdir, spec: str | None = None):
    """The tokenizer of the workdir's model: ``spec`` (default: the one model.json records,
    byte for a record without one), a relative path in it taken inside the workdir."""
    if spec is None:
        spec = read_model_file(workdir).get("tokenizer")
    return get_tokenizer(spec or "byte", base=workdir)


def previous_run_config(workdir: pathlib.Path) -> dict | None:
    """The training config of the workdir's last ``glocal train`` (None before the first)."""
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
    if previous:
        base = TrainConfig.from_dict(previous)
    elif config_name is not None:  # a new run starts from its preset's training defaults, if any
        try:
            base = TrainConfig().replace(**gm.preset_train_defaults(*gm.split_config_name(config_name)))
        except ConfigError as e:
            raise ConfigError(f"the TRAIN defaults of preset {config_name!r}: {e}") from None
    else:
        base = TrainConfig()
    # One-off options are never inherited from the previous run; nor is the tokenizer (a
    # workdir keeps the one its model.json records: see resolve_tokenizer).
    tcfg = base.replace(**{**{k: False for k in ONE_OFF_OPTIONS}, "tokenizer": "", **train_kw})
    if config_name is None:
        record = read_model_file(workdir)
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
    recorded as ``kind:tokenizer``, the copy ``keep_tokenizer`` makes in ``workdir/tokenizer``.
    A tokenizer with more ids than the model's vocabulary is a ConfigError."""
    if (workdir / MODEL_FILE).is_file():
        record = read_model_file(workdir).get("tokenizer") or "byte"
        tokenizer = load_tokenizer(workdir, record)
        if spec and spec != record and not same_tokenizer(get_tokenizer(spec), tokenizer):
            raise ConfigError(f"tokenizer={spec!r} differs from the tokenizer {workdir} was trained with "
                              f"({record!r} in its {MODEL_FILE}); leave tokenizer= out to resume with "
                              f"that one, or train into a new --workdir.")
    else:
        spec = spec or "byte"
        tokenizer = get_tokenizer(spec)
        record = f"{spec.partition(':')[0]}:{TOKENIZER_DIR}" if hasattr(tokenizer, "save") else tokenizer.name
    vocab = getattr(mcfg, "vocab_size", None)
    # (The byte tokenizer is exempt: token-array runs carry it as a placeholder and size
    # their model to their own ids; text it encodes is checked against the vocabulary anyway.)
    if getattr(tokenizer, "name", None) != "byte" and vocab is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(f"tokenizer {record!r} has {tokenizer.vocab_size:,} ids but the model's vocab_size is "
                          f"{vocab:,}; set vocab_size>={tokenizer.vocab_size} (a vocabulary larger than the "
                          f"tokenizer's is fine).")
    return tokenizer, record


def keep_tokenizer(workdir: pathlib.Path, tokenizer, record: str) -> None:
    """Copy a tokenizer made of files into a new workdir (``record`` names the copy), so the
    workdir does not depend on where the files came from."""
    if (workdir / MODEL_FILE).exists() or not hasattr(tokenizer, "save"):
        return
    target = workdir / TOKENIZER_DIR
    if target.exists() and any(target.iterdir()):
        try:  # left by a first run that stopped before writing model.json?
            same = same_tokenizer(load_tokenizer(workdir, record), tokenizer)
        except UserError:
            same = False
        if not same:
            raise WorkdirError(f"{target} already exists and holds another tokenizer; remove it or "
                               f"train into a new --workdir.")
    tokenizer.save(target)


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every element of every array in ``tree`` is finite: one reduction on device
    (checked before every training save and on every load)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def has_init_params(workdir) -> bool:
    return (pathlib.Path(workdir) / INIT_DIR / "params").is_dir()


def save_init_params(workdir, params) -> None:
    """Record ``params`` (an nnx.Param state) as the workdir's starting weights."""
    path = (pathlib.Path(workdir) / INIT_DIR / "params").absolute()
    if path.exists():
        raise WorkdirError(f"{path} already exists; starting weights are never replaced.")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)


def restore_init_params(workdir, abstract_params):
    """The starting weights, placed like ``abstract_params`` (ShapeDtypeStructs, with
    shardings where the caller wants them)."""
    path = (pathlib.Path(workdir) / INIT_DIR / "params").absolute()
    one = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is not None else
                          jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_params)
    try:
        with _quiet_failed_read(), ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path, target)
    except Exception as e:
        raise WorkdirError(f"the starting weights {path} could not be read ({_reason(e)}); they may be partial or "
                           f"corrupt: import them again (glocal convert) into a new workdir.") from e
    if not bool(all_finite(params)):
        raise WorkdirError(f"the starting weights {path} hold non-finite values; import them again.")
    return params


def load_model(workdir, step: int | None = None) -> tuple[nnx.Module, int]:
    """The workdir's model with the parameters of ``step`` (default: the latest; step 0 or
    no checkpoint yet: the starting weights of an imported workdir)."""
    workdir = pathlib.Path(workdir)
    record = read_model_file(workdir)
    config = gm.config_class(record["model"]).from_dict(record["config"])
    abstract = nnx.eval_shape(lambda: gm.build_from_config(config))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):  # non-trained state (buffers) is rebuilt from the config
        rest = jax.jit(lambda: nnx.split(gm.build_from_config(config), nnx.Param, ...)[2])()
    init = not _is_remote(workdir) and has_init_params(workdir)
    ckpt_dir = workdir / "checkpoints"
    if init and step == 0:
        return nnx.merge(graphdef, restore_init_params(workdir, abstract_params), rest), 0
    if not _is_remote(workdir) and not ckpt_dir.is_dir():  # reading creates nothing
        if init:  # an imported workdir before any training
            return nnx.merge(graphdef, restore_init_params(workdir, abstract_params), rest), 0
        raise WorkdirError(f"{workdir} has no checkpoints yet; train first (glocal train --workdir {workdir}).")
    with _manager(workdir) as mngr:
        steps = mngr.all_steps()
        if not steps and init and step is None:  # (e.g. only a crashed first save's temporary folder)
            return nnx.merge(graphdef, restore_init_params(workdir, abstract_params), rest), 0
        if not steps:
            raise WorkdirError(f"{workdir} has no checkpoints yet; train first (glocal train --workdir {workdir}).")
        step = max(steps) if step is None else step
        if step not in steps:
            raise WorkdirError(f"{workdir} has no checkpoint at step {step}; available: {sorted(steps)}.")
        earlier = sorted(s for s in steps if s < step)
        # Placed on one local device: a checkpoint written over a mesh of other devices (a pod,
        # several processes) is read on this machine (without a sharding orbax wants the saved devices).
        one = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_params)
        try:
            with _quiet_failed_read():
                restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as e:  # orbax raises many types for truncated/corrupt files
            fix = (f"read an earlier one with --step {earlier[-1]} (available: {sorted(steps)})" if earlier
                   else f"there is no earlier one: train again (glocal train --workdir {workdir})")
            raise WorkdirError(
                f"checkpoint {workdir}/checkpoints/{step} could not be read ({_reason(e)}); "
                f"it may be partial or corrupt: {fix}."
            ) from e
    if not bool(all_finite(restored["params"])):
        raise WorkdirError(
            f"checkpoint {workdir}/checkpoints/{step} holds non-finite weights (its run diverged); "
            + (f"use an earlier --step (available: {earlier})" if earlier else "retrain with a lower learning_rate")
            + ".")
    return nnx.merge(graphdef, restored["params"], rest), step
