"""The optimizer: AdamW with warmup + decay, global-norm clipping, masked weight decay."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from glocal.layers.params import Bias, Embedding, Scale, SelectionBias
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


# The optimizer's parameter groups, by variable type (glocal.layers.params): the names that
# TrainConfig.no_decay lists, and the selection biases that only their balancing rule moves.
KINDS = ((SelectionBias, "router_bias"), (Scale, "norm"), (Bias, "bias"), (Embedding, "embedding"))


def param_kind(variable: nnx.Variable) -> str:
    """``norm`` / ``bias`` / ``embedding`` / ``router_bias`` / ``weight``: the group of a
    parameter, from its type."""
    return next((name for cls, name in KINDS if isinstance(variable, cls)), "weight")


def _by_kind(params, fn):
    """``params`` with each variable's value replaced by ``fn(kind)``."""
    return jax.tree.map(lambda v: v.replace(fn(param_kind(v))), params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def decay_mask(params, no_decay: tuple[str, ...]):
    """True where weight decay applies (same tree structure as ``params``)."""
    return _by_kind(params, lambda kind: kind not in no_decay)


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """Clipped AdamW. MoE selection biases (``SelectionBias``) are not trained by it: their
    gradient is, by construction, the balancing step ``rate * sign(load - mean)`` (the
    ``moe_bias`` term of ``glocal.layers.moe``, the way a per-layer value inside scanned stacks
    reaches its own parameter), applied as is by plain SGD of rate 1, outside clipping, Adam and
    weight decay."""
    mask = decay_mask(params, cfg.no_decay_kinds)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=mask))
    main = optax.chain(*parts)
    labels = _by_kind(params, lambda kind: "router_bias" if kind == "router_bias" else "main")
    if "router_bias" not in [v.get_value() for v in jax.tree.leaves(labels, is_leaf=lambda x: isinstance(x, nnx.Variable))]:
        return main
    return optax.multi_transform({"main": main, "router_bias": optax.sgd(1.0)}, labels)
