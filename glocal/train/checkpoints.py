"""Training checkpoints: everything a run needs to continue bit for bit (loading only the
trained model for use is ``glocal.workdir.load_model``).

    DIR/checkpoints/<step>/params     model parameters (nnx.Param state; what `generate` loads)
    DIR/checkpoints/<step>/opt_state  optimizer state
    DIR/checkpoints/<step>/meta       {"step", "tokens", "elapsed_s", ...} as JSON
    DIR/checkpoints/<step>/data       the grain iterator state of each host

Saves are asynchronous (orbax copies device arrays to host, then writes in the
background). Old steps are deleted only by the keep policy: the last ``keep_last``
plus every ``keep_every``-th. A checkpoint that fails to restore is moved, never deleted,
to ``DIR/corrupt_checkpoints/<step>`` and the previous one is tried.
"""

from __future__ import annotations

import pathlib
import shutil

import grain
import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    def __init__(self, workdir: pathlib.Path, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, log=print):
        self.workdir = pathlib.Path(workdir)
        self.directory = (self.workdir / "checkpoints").absolute()
        self.log = log
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, data_iter) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta), data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

    def restore_latest(self, abstract_params, abstract_opt_state, data_iter):
        """``(params, opt_state, meta)`` of the newest readable step (arrays placed with the
        shardings of the abstract targets, so any mesh works), or None if there is none."""
        for step in reversed(self.all_steps()):
            try:
                r = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    meta=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(data_iter)))
            except Exception as e:  # orbax raises many kinds for truncated/corrupt/mismatched files
                moved = self._quarantine(step)
                self.log(f"WARNING: checkpoint step {step} could not be restored ({type(e).__name__}: "
                         f"{str(e)[:300]}). It was moved to {moved}; trying the previous checkpoint.")
                continue
            return r["params"], r["opt_state"], r["meta"]
        return None

    def _quarantine(self, step: int) -> pathlib.Path:
        target = self.workdir / "corrupt_checkpoints" / str(step)
        n = 1
        while target.exists():
            target = self.workdir / "corrupt_checkpoints" / f"{step}.{n}"
            n += 1
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"glocal_quarantine_{step}")
        self.manager.close()  # it caches the step list
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
