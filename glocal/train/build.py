"""What a run compiles, built once from its configs: the device mesh and sharding rules, the
model (one abstract build for shapes and counts, one jitted concrete build for the starting
parameters and any non-trained state), the optimizer, the jitted train and eval steps; and
what is read off them: validation loss (``evaluate``) and the dry-run report."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import glocal.models as gm
from glocal import sharding as shd
from glocal.configs.base import ConfigError
from glocal.models.base import active_param_count
from glocal.train.config import TrainConfig
from glocal.train.optim import make_optimizer
from glocal.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built once: mesh, shardings, model, jitted functions."""

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
    init_params: Callable  # () -> the starting parameters of a fresh run (seed tcfg.seed)
    init_opt: Callable
    train_step: Callable
    eval_step: Callable
    flops_per_token: float
    n_params: int
    n_active: float  # parameters one token uses (fewer than n_params in routed models)
    packed_documents: bool  # does the model keep packed documents apart (glocal.models.base)?
    rows: slice  # the rows of each microbatch this process's devices hold (and its data reads)


def _opt_shardings(abstract_opt, param_sh, mesh):
    """Optimizer state that mirrors the parameters (Adam's mu and nu: subtrees with exactly
    the params' tree structure) takes the parameter shardings; the rest (step counts) is
    replicated. Matched by structure, so no leaf can pick up another parameter's sharding."""
    params_def = jax.tree_util.tree_structure(param_sh)  # a sharding per parameter, same tree
    mirrors = lambda x: jax.tree_util.tree_structure(x) == params_def
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: param_sh if mirrors(x) else replicated, abstract_opt, is_leaf=mirrors)


def _check_batch(tcfg: TrainConfig, mesh) -> None:
    micro = tcfg.batch_size // tcfg.grad_accum
    if micro % shd.batch_divisor(mesh):
        raise ConfigError(
            f"the microbatch of {micro} sequences (batch_size / grad_accum) does not split over the "
            f"{shd.batch_divisor(mesh)} data-parallel devices of mesh {dict(mesh.shape)}; use a "
            f"batch_size that is a multiple of {shd.batch_divisor(mesh) * tcfg.grad_accum}.")


def build_setup(mcfg, tcfg: TrainConfig, devices=None) -> Setup:
    mesh = shd.make_mesh(tcfg.mesh_sizes, devices)
    rules = shd.rule_table(tcfg.sharding)
    _check_batch(tcfg, mesh)
    model = lambda: gm.build_from_config(mcfg, seed=tcfg.seed)  # the one way the model is made
    abstract_model = nnx.eval_shape(model)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    param_sh = shd.variable_shardings(abstract_params, mesh, rules)
    # The concrete build: the starting parameters (a fresh run's) and the non-parameter state
    # (buffers, tables), which is not trained: deterministic from the config, so it needs no
    # checkpoint and is closed over as constants.
    init_state = jax.jit(lambda: nnx.split(model(), nnx.Param, ...)[1:], out_shardings=(param_sh, None))
    rest = init_state()[1] if jax.tree.leaves(abstract_rest) else None
    merge = (lambda p: nnx.merge(graphdef, p)) if rest is None else (lambda p: nnx.merge(graphdef, p, rest))
    tx = make_optimizer(tcfg, abstract_params)
    opt_sh = _opt_shardings(jax.eval_shape(tx.init, abstract_params), param_sh, mesh)
    replicated = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, shd.batch_spec(3, leading=1))
    eval_batch_sh = NamedSharding(mesh, shd.batch_spec(2))
    init_opt = jax.jit(tx.init, in_shardings=(param_sh,), out_shardings=opt_sh)
    train_step = jax.jit(make_train_step(merge, tx, tcfg.z_loss),
                         in_shardings=(param_sh, opt_sh, batch_sh),
                         out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(merge), in_shardings=(param_sh, eval_batch_sh),
                        out_shardings=(replicated, replicated))
    n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
    fpt = (abstract_model.flops_per_token(tcfg.seq_len) if hasattr(abstract_model, "flops_per_token")
           else 6.0 * n_params)
    return Setup(mcfg, tcfg, mesh, rules, merge, abstract_params, param_sh, opt_sh, batch_sh, eval_batch_sh,
                 lambda: init_state()[0], init_opt, train_step, eval_step, fpt, n_params,
                 active_param_count(abstract_model), bool(getattr(abstract_model, "packed_documents", False)),
                 shd.process_rows(eval_batch_sh, tcfg.microbatch, ndim=2))


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _to_device(batch: dict, sharding, rows: int) -> dict:
    """This process's rows of a batch (``[..., b_local, T]``) as global arrays of ``rows``
    rows (the global shape is given so that a wrong local part is an error, not a guess)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (*v.shape[:-2], rows, v.shape[-1]))
            for k, v in batch.items()}


def bits_label(tokens_per_byte: float | None) -> str:
    """What ``evaluate``'s second number is."""
    return "bits-per-byte" if tokens_per_byte else "bits/token (bytes unknown: token-array validation data)"


def evaluate(setup: Setup, params, batches, tokens_per_byte: float | None = 1.0) -> tuple[float, float]:
    """``(mean loss in nats/token, bits per byte)`` over fixed validation batches: bits/token
    times ``tokens_per_byte`` (``data.tokens_per_byte``: 1 for the byte tokenizer, whose
    tokens are bytes). With ``None`` (bytes unknown) the second number is bits/token."""
    total, count = 0.0, 0.0
    for b in batches:
        s, n = setup.eval_step(params, _to_device(b, setup.eval_batch_sh, setup.tcfg.microbatch))
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


def print_dry_run(report: dict, log) -> None:
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
