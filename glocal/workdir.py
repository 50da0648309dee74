"""Workdirs: the model record (which model a workdir holds) and loading a trained model.
Saving and restoring the full training state is ``glocal.train.checkpoints``.

    DIR/model.json                  {"model": family, "config": {...}, "tokenizer": "byte"}
    DIR/checkpoints/<step>/params   orbax checkpoint of the model's nnx.Param state
                                    (written by glocal.train.checkpoints with the optimizer
                                    state, data iterator and run metadata beside it)

``write_model_file`` never replaces a workdir's model.json with a different model:
nothing saved is lost silently. ``load_model`` reads a trained model back.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

import glocal.models as gm

MODEL_FILE = "model.json"


class WorkdirError(RuntimeError):
    """The workdir is missing, holds something else, or its checkpoint is unreadable."""


def _manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    )


def write_model_file(workdir, config, tokenizer: str = "byte") -> None:
    """Record the model (its config, or a model with ``.config``) in ``workdir/model.json``."""
    config = getattr(config, "config", config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"model": gm.model_name(config), "config": config.to_dict(), "tokenizer": tokenizer}
    path = workdir / MODEL_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != record:
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
                           f"or pass --config to use an untrained preset.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is corrupt ({e}); restore it from a backup.") from None


def load_model(workdir, step: int | None = None) -> tuple[nnx.Module, int]:
    """The workdir's model with the parameters of ``step`` (default: the latest)."""
    workdir = pathlib.Path(workdir)
    record = read_model_file(workdir)
    config = gm.config_class(record["model"]).from_dict(record["config"])
    abstract = nnx.eval_shape(lambda: gm.build_from_config(config))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    with _manager(workdir) as mngr:
        steps = mngr.all_steps()
        if not steps:
            raise WorkdirError(f"{workdir} has no checkpoints yet; train first.")
        step = max(steps) if step is None else step
        if step not in steps:
            raise WorkdirError(f"{workdir} has no checkpoint at step {step}; available: {sorted(steps)}.")
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as e:  # orbax raises many types for truncated/corrupt files
            raise WorkdirError(
                f"checkpoint {workdir}/checkpoints/{step} could not be read ({type(e).__name__}: "
                f"{str(e)[:200]}); it may be partial or corrupt. Try an earlier step."
            ) from e
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored["params"])):
        earlier = [s for s in sorted(steps) if s < step]
        raise WorkdirError(
            f"checkpoint {workdir}/checkpoints/{step} holds non-finite weights (its run diverged); "
            + (f"use an earlier --step (available: {earlier})" if earlier else "retrain with a lower learning_rate")
            + ".")
    if jax.tree.leaves(rest):  # non-trained state (buffers) is rebuilt from the config
        rest = jax.jit(lambda: nnx.split(gm.build_from_config(config), nnx.Param, ...)[2])()
    return nnx.merge(graphdef, restored["params"], rest), step
