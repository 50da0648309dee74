"""Device meshes and logical-axis rule tables.

Parameters and key activations carry *logical* axis names (``"embed"``, ``"mlp"``,
``"batch"``...); a rule table maps each logical name to mesh axes. Swapping the table
switches the parallelism scheme without touching model code:

    dp       pure data parallel: the batch is split over every mesh axis, params replicated
    fsdp     + parameters (and optimizer state) sharded along ``embed`` over ``fsdp``
    fsdp_tp  + Megatron-style tensor parallelism: heads / MLP hidden / vocab over ``tensor``

Mesh axes, outermost first: ``data`` (replicas), ``fsdp`` (parameter shards), ``expert``
(MoE experts; dense models use it as more data parallelism), ``tensor`` (within a layer;
innermost so it lands on the fastest links).

Every table lists every logical name (``LOGICAL_NAMES``); a name a table does not list is a
``ShardingError``, never a silent fallback to replication. A logical name whose mesh axes
do not divide the dimension is left unsharded rather than failing (e.g. a 259-entry
vocabulary on tensor=2); ``describe_dropped`` lists such cases. ``expert`` (MoE expert
weights) maps to the ``expert`` mesh axis under fsdp and fsdp_tp.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from glocal.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")


class ShardingError(UserError, ValueError):
    """A mesh that does not fit the devices, an unknown rule table or logical axis name."""


# Every logical name the package uses, with its mesh axes under each table (None =
# replicated). A name missing here is an error (ShardingError), not silently replicated, so
# a typo or a new name cannot quietly turn sharding off: a new name needs a row.
# Activation names end in "_act" where they differ from the parameter name of the same
# dimension: FSDP shards the *parameter* embed dim but activations keep it whole.
# dp replicates every parameter, experts included (pure data parallel); the expert mesh
# axis then only splits the batch.
_TABLE_NAMES = ("dp", "fsdp", "fsdp_tp")
_RULE_ROWS: dict[str, tuple] = {
    # parameters            dp          fsdp        fsdp_tp
    "embed":               (None,       "fsdp",     "fsdp"),
    "heads":               (None,       None,       "tensor"),
    "kv_heads":            (None,       None,       "tensor"),
    "head_dim":            (None,       None,       None),
    "feature":             (None,       None,       None),  # linear-attention q/k features (F)
    "mlp":                 (None,       None,       "tensor"),
    "vocab":               (None,       None,       "tensor"),
    "layers":              (None,       None,       None),  # the scanned layer axis
    "expert":              (None,       "expert",   "expert"),  # MoE expert weights
    "norm":                (None,       None,       None),  # normalisation scales (small)
    # activations
    "batch":               (BATCH_AXES, BATCH_AXES, BATCH_AXES),
    "heads_act":           (None,       None,       "tensor"),
    "kv_heads_act":        (None,       None,       "tensor"),
    "mlp_act":             (None,       None,       "tensor"),
    "vocab_act":           (None,       None,       "tensor"),
}
LOGICAL_NAMES = tuple(_RULE_ROWS)
Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]
RULE_TABLES: dict[str, Rules] = {
    table: tuple((name, row[i]) for name, row in _RULE_ROWS.items()) for i, table in enumerate(_TABLE_NAMES)
}

_RULES: contextvars.ContextVar = contextvars.ContextVar("glocal_rules", default=None)


def mesh_shape(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Fill the one ``-1`` in ``sizes`` (keys from MESH_AXES) so the product is ``n_devices``."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    auto = [a for a, s in sizes.items() if s == -1]
    if len(auto) > 1:
        raise ShardingError(f"only one mesh axis may be -1 (auto), got {auto}.")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ShardingError(f"mesh sizes must be positive or -1, got {sizes}.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if n_devices % fixed:
            raise ShardingError(f"mesh {sizes} cannot fill {n_devices} devices: the fixed axes' product "
                                f"{fixed} does not divide {n_devices}.")
        sizes[auto[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ShardingError(f"mesh {sizes} has {fixed} devices but {n_devices} are available; set one "
                            f"axis to -1 (e.g. mesh.data=-1) to use them all.")
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with GSPMD-style (Auto) axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    try:  # topology-aware placement on TPU/GPU; falls back to the plain order on CPU
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh([shape[a] for a in MESH_AXES], devices=devices)
    except Exception:
        grid = np.array(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rule_table(name: str):
    if name not in RULE_TABLES:
        raise ShardingError(f"unknown sharding rule table {name!r}; choose one of {list(RULE_TABLES)}.")
    return RULE_TABLES[name]


def mesh_axes_of(name: str | None, rules) -> tuple[str, ...]:
    """The mesh axes logical ``name`` maps to under ``rules`` (``()``: replicated).

    ``None`` (a positional None in a parameter's names) means unsharded. A name the table
    does not list is an error: a silent fallback would replicate a tensor meant to be split.
    """
    if name is None:
        return ()
    table = dict(rules)
    if name not in table:
        which = next((f"{k!r}" for k, v in RULE_TABLES.items() if tuple(v) == tuple(rules)), "(custom)")
        raise ShardingError(f"logical axis name {name!r} is not in sharding rule table {which}, which knows "
                            f"{sorted(table)}; use one of those, or add a row for it to "
                            f"glocal.sharding._RULE_ROWS (None to replicate).")
    target = table[name]
    return (target,) if isinstance(target, str) else tuple(target or ())


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
    """The PartitionSpec for a tensor with logical axis ``names``.

    Mesh axes of size 1, axes already used by an earlier dimension, and axes that do not
    divide the dimension are dropped, so every spec is valid for every mesh.
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        kept = []
        for a in mesh_axes_of(name, rules):
            size = mesh.shape[a]
            if size == 1 or a in used or dim % (math.prod(mesh.shape[k] for k in kept) * size):
                continue
            kept.append(a)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def variable_shardings(tree, mesh: Mesh, rules):
    """For an (abstract) nnx State: the same tree with each Variable holding its NamedSharding."""
    from flax import nnx

    def one(v):
        names = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
        return v.replace(NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules)))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def describe_dropped(tree, mesh: Mesh, rules) -> list[str]:
    """Parameters whose logical names asked for a mesh axis that could not be used."""
    from flax import nnx

    out = []
    for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        names = v.get_metadata().get("out_sharding") or ()
        spec = logical_to_spec(names, v.shape, mesh, rules)
        wanted = {a for n in names for a in mesh_axes_of(n, rules) if mesh.shape[a] > 1}
        got = {a for s in spec if s for a in ((s,) if isinstance(s, str) else s)}
        if wanted - got:
            out.append(f"{jax.tree_util.keystr(path)} {tuple(v.shape)}: unsharded over {sorted(wanted - got)}")
    return out


@contextlib.contextmanager
def use_rules(rules):
    """Make ``rules`` the table that ``constrain`` resolves activation names with."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def active_rules():
    """The rule table ``use_rules`` made current (None outside one)."""
    return _RULES.get()


def constrain(x: jax.Array, names: Iterable[str | None]) -> jax.Array:
    """Pin activation ``x`` to the sharding its logical ``names`` map to.

    A no-op without an active mesh (``jax.set_mesh``) and rule table (``use_rules``), so
    layers stay usable on a laptop exactly as on a pod.
    """
    rules = _RULES.get()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(names), x.shape, mesh, rules))


def batch_spec(ndim: int, leading: int = 0) -> P:
    """Spec for a batch array with ``leading`` unsharded axes (e.g. microbatches) first."""
    return P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1)))


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_rows(sharding: NamedSharding, rows: int, ndim: int = 1, axis: int = 0) -> slice:
    """The rows (dimension ``axis`` of an ``ndim``-d array with ``rows`` of them) that this
    process's devices hold under ``sharding``: the part of a global batch this process
    supplies. All of them when the batch axes do not split across processes (e.g. a mesh
    that is all ``tensor``), so it must never be assumed to be ``1 / process_count``."""
    shape = tuple(rows if d == axis else 1 for d in range(ndim))
    spans = sorted({idx[axis].indices(rows)[:2] for idx in sharding.addressable_devices_indices_map(shape).values()})
    if any(a != b_prev for (_, b_prev), (a, _) in zip(spans, spans[1:])):
        raise ShardingError(f"this process's devices hold rows {spans} of the batch, not one block; order the "
                            f"mesh so each process's devices hold neighbouring rows (the default order does).")
    return slice(spans[0][0], spans[-1][1])


def per_shard(fn, args, arg_names, out_names):
    """``fn(*args)`` run per device with ``jax.shard_map`` when a mesh and a rule table are
    active (a plain call otherwise). Every array of ``args[i]`` (an array or a pytree) is split
    by the logical names ``arg_names[i]`` of its leading dimensions, resolved like
    ``constrain``. Each output is split by its ``out_names[j]`` over leading dimensions the
    same size as those of ``args[0]`` (e.g. batch rows and heads of the queries).

    For kernels XLA cannot partition by itself: a Mosaic (TPU) custom call under a sharded
    jit is an error, a Triton one is replicated onto every device. Callers name only the
    dimensions along which ``fn`` is independent (batch rows, heads)."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return fn(*args)
    spec = lambda names, shape: logical_to_spec(tuple(names), shape[:len(names)], mesh, rules)
    in_specs = tuple(jax.tree.map(lambda a, n=n: spec(n, a.shape), arg) for arg, n in zip(args, arg_names))
    lead = jax.tree.leaves(args[0])[0].shape
    out_specs = tuple(spec(n, lead) for n in out_names)  # a spec per output, a prefix of its tree
    # check_vma=False: pallas_call outputs carry no varying-axes type.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def same_split(name: str, *dims: int) -> bool:
    """Whether logical ``name`` splits each of ``dims`` over the same mesh axes under the
    active mesh and rules (e.g. query and kv heads, which must split alike for GQA)."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return True
    return len({logical_to_spec((name,), (d,), mesh, rules) for d in dims}) == 1
