"""One process of a multi-process job (started by tests/test_multihost.py with the
environment ``glocal launch`` gives): for several meshes, which rows of each microbatch this
process's devices hold, and the window indices its first training batch reads. Prints
``RESULT <json>``."""

import json
import sys

from glocal.train import distributed

distributed.maybe_initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.train import data  # noqa: E402
from glocal.train.build import build_setup  # noqa: E402
from glocal.train.config import TrainConfig  # noqa: E402

MESHES = {"data2_fsdp2_tensor2": dict(mesh_data=2, mesh_fsdp=2, mesh_tensor=2),
          "tensor8": dict(mesh_data=1, mesh_tensor=8), "fsdp8": dict(mesh_data=1, mesh_fsdp=8),
          "data2_expert4": dict(mesh_data=2, mesh_expert=4)}

out = {"process": jax.process_index(), "processes": jax.process_count()}
tokens = np.arange(50_000)  # a window's first token is 32 * its index
windows = data.Windows(tokens, 32, None, pack=False, what="t")
for name, mesh in MESHES.items():
    tcfg = TrainConfig(batch_size=16, grad_accum=2, seq_len=32, **mesh)
    setup = build_setup(gm.get_config("transformer", "tiny"), tcfg)
    it = data.train_iterator(windows, batch_size=16, grad_accum=2, seed=3, rows=setup.rows, threads=1)
    first = next(it)["inputs"]  # [A, b_local, T]
    out[name] = {"rows": [setup.rows.start, setup.rows.stop], "first_tokens": first[:, :, 0].tolist()}
print("RESULT " + json.dumps(out))
sys.stdout.flush()
