"""The optimizer: AdamW with warmup + decay, global-norm clipping, masked weight decay."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from glocal.train.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine/linear decay to ``min_lr_ratio`` of it
    at ``steps`` (or constant)."""
    peak, final = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    decay_steps = max(cfg.steps - warmup, 1)
    if cfg.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.lr_schedule == "linear":
        after = optax.linear_schedule(peak, final, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def param_kind(path) -> str:
    """``norm`` / ``bias`` / ``embedding`` / ``router_bias`` / ``weight`` from a parameter's tree path.

    Conventions of glocal.layers: norm gains are called ``scale``, biases ``bias``, the
    input embedding table ``table_VD``, and MoE selection biases ``select_bias_X``.
    """
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    if name.startswith("select_bias"):
        return "router_bias"
    if name == "scale":
        return "norm"
    if name == "bias" or name.startswith("bias_") or name.startswith("b_"):
        return "bias"
    if name.startswith("table"):
        return "embedding"
    return "weight"


def decay_mask(params, no_decay: tuple[str, ...]):
    """True where weight decay applies (same tree structure as ``params``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(param_kind(path) not in no_decay), params,
        is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """Clipped AdamW. MoE selection biases (``router_bias``) are not trained: their
    "gradient" is the balancing step ``rate * sign(load - mean)`` (glocal.layers.moe), applied
    as is by plain SGD of rate 1, outside clipping, Adam and weight decay."""
    mask = decay_mask(params, cfg.no_decay_kinds)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=mask))
    main = optax.chain(*parts)
    kinds = jax.tree_util.tree_map_with_path(lambda path, v: param_kind(path), params,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    if "router_bias" not in jax.tree.leaves(kinds):
        return main
    labels = jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace("router_bias" if param_kind(path) == "router_bias" else "main"), params,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return optax.multi_transform({"main": main, "router_bias": optax.sgd(1.0)}, labels)
