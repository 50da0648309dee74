"""Training checkpoints: everything a run needs to continue bit for bit (loading only the
trained model for use is ``glocal.workdir.load_model``).

    DIR/checkpoints/<step>/params     model parameters (nnx.Param state; what `generate` loads)
    DIR/checkpoints/<step>/opt_state  optimizer state
    DIR/checkpoints/<step>/meta       {"step", "tokens", "elapsed_s", ...} as JSON
    DIR/checkpoints/<step>/data       the grain iterator state of each process (all equal:
                                      the count of global batches taken)

Saves are asynchronous (orbax copies device arrays to host, then writes in the
background). Old steps are deleted only by the keep policy: the last ``keep_last``
plus every ``keep_every``-th.

Restoring tells two failures apart. A checkpoint whose files cannot be read (truncated,
garbled, half written) is *corrupt*: it is moved, never deleted, to
``DIR/corrupt_checkpoints/<step>`` and the previous one is tried. A readable checkpoint
that does not fit this run (its parameter or optimizer-state tree differs from what this
run builds, e.g. after changing ``grad_clip``) is a ``CheckpointMismatch``: nothing is
moved, and the caller explains what differs and how to proceed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import grain
import jax
import orbax.checkpoint as ocp

from glocal.pytree import path_name
from glocal.workdir import WorkdirError


class CheckpointMismatch(WorkdirError):
    """A readable checkpoint whose trees do not fit this run (nothing was moved)."""

    def __init__(self, step: int, item: str, detail: str, meta: dict):
        self.step, self.item, self.detail, self.meta = step, item, detail, meta
        super().__init__(f"checkpoint step {step}: its {item} do not fit this run ({detail}).")


class TrainCheckpointer:
    def __init__(self, workdir: pathlib.Path, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, log=print):
        self.workdir = pathlib.Path(workdir)
        self.directory = (self.workdir / "checkpoints").absolute()
        self.log = log
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save)
        self.manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        # Named handlers let a fresh manager read each item's metadata before restoring.
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(), "data": DataHandler()}
        return ocp.CheckpointManager(self.directory, options=self.options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, data_iter) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta), data=DataSave(data_iter)), force=True)

    def restore_latest(self, abstract_params, abstract_opt_state, data_iter, *, check=None,
                       restore_opt: bool = True):
        """``(params, opt_state, meta)`` of the newest readable step (arrays placed with the
        shardings of the abstract targets, so any mesh works), or None if there is none.

        ``check(step, meta)`` sees each candidate's metadata first: it may raise to refuse
        it (nothing is moved) or return False to leave the data iterator as it is. A
        candidate whose trees differ from the targets raises ``CheckpointMismatch``.
        ``restore_opt=False`` leaves the optimizer state out (returned as None)."""
        for step in reversed(self.all_steps()):
            try:
                trees = self.manager.item_metadata(step)
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                saved = {name: trees[name].tree for name in ("params", "opt_state")}  # None: unreadable
            except Exception as e:  # unreadable metadata: a corrupt or half-written step
                self._warn_and_quarantine(step, e)
                continue
            restore_data = check is None or check(step, meta) is not False
            targets = {"params": abstract_params, "opt_state": abstract_opt_state if restore_opt else None}
            for item, target in targets.items():
                detail = None if target is None else tree_difference(saved[item], target)
                if detail:
                    raise CheckpointMismatch(step, "parameters" if item == "params" else "optimizer state",
                                             detail, meta)
            items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
            if restore_opt:
                items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
            if restore_data:
                items["data"] = DataRestore(data_iter)
            try:
                r = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # the trees fit, so the data itself is unreadable
                self._warn_and_quarantine(step, e)
                continue
            return r["params"], r.get("opt_state"), r["meta"]
        return None

    def _warn_and_quarantine(self, step: int, error: Exception) -> None:
        moved = self._quarantine(step)
        self.log(f"WARNING: checkpoint step {step} could not be read ({type(error).__name__}: "
                 f"{str(error)[:300]}). It was moved to {moved}; trying the previous checkpoint.")

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
        self.manager = self._new_manager()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator checkpoint, readable by another number of processes. grain writes
    one file per process and reads back only the file of the same index and count; our
    iterators' states are the same in every process (every process walks the same global
    batches), so a run on N processes may resume one written by M: from any file, once all
    files are checked to agree."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item)
        files = sorted(directory.glob("process_*-of-*.json"))
        states = {f.read_text() for f in files}
        if len(states) != 1:
            raise ValueError(f"the data iterator states in {directory} differ between processes or are missing "
                             f"({len(files)} files), so they cannot be shared out over {jax.process_count()} "
                             f"processes")
        item.set_state(json.loads(states.pop()))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: object  # a grain iterator


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: object  # the grain iterator whose state is set


def tree_difference(saved, target) -> str | None:
    """None if two trees have the same leaves (paths and shapes), else a short description.
    Paths are compared by their key names, so a checkpoint's metadata tree (dicts and lists)
    matches the live tree (named tuples, dataclasses) it was saved from."""
    def leaves(tree):
        return {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    have, want = leaves(saved), leaves(target)
    if have == want:
        return None
    only_saved = sorted(set(have) - set(want))
    only_here = sorted(set(want) - set(have))
    shapes = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    parts = []
    if only_saved:
        parts.append(f"{len(only_saved)} entries only in the checkpoint, e.g. {only_saved[0]}")
    if only_here:
        parts.append(f"{len(only_here)} only in this run, e.g. {only_here[0]}")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes, e.g. {shapes[0]} {have[shapes[0]]} vs {want[shapes[0]]}")
    return "; ".join(parts)


