"""tokamax's kernels behind glocal's entry points: ``attention(..., impl="tokamax")`` and
``grouped_matmul(..., impl="tokamax")`` (the optional ``tokamax`` extra: Python >= 3.12,
jax >= 0.11.1).

tokamax picks its kernel when a call is *traced*, from the device it targets: the abstract
device of ``jax.sharding.use_abstract_mesh`` if one is set, else the default backend. We pass
one explicit implementation per target (never a fallback chain, which would silently lower
plain XLA for an accelerator):

  op              cpu    tpu                                   gpu
  ragged_dot      xla    mosaic_tpu                            mosaic_gpu (sm80 / sm90 / sm100)
  attention       xla    mosaic_tpu (mask as a boolean array:  triton
                         its window argument is unsupported)

Rows past the groups are zeroed after the call (expert parallelism pads with them).
Cross-compiling (tracing on a CPU host for a TPU/GPU target inside an abstract mesh) turns on
tokamax's ``cross_compile`` so its device check does not look at the host. tokamax's GPU
grouped matmul reads the physical GPU's compute capability, so it can only be traced on a
GPU machine.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from glocal.kernels import masks as masks_lib
from glocal.kernels.dense import allowed_pairs

_RAGGED_DOT = {"cpu": "xla", "tpu": "mosaic_tpu", "gpu": "mosaic_gpu"}
_ATTENTION = {"cpu": "xla", "tpu": "mosaic_tpu", "gpu": "triton"}


def _tokamax():
    try:
        import tokamax
    except ImportError as e:
        raise ImportError("impl='tokamax' needs the tokamax package (Python >= 3.12): "
                          "pip install 'glocal[tokamax]'.") from e
    return tokamax


def target_platform() -> str:
    """``cpu``, ``tpu`` or ``gpu``: the abstract mesh's device if one is set, else the backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _cross_compiling(tokamax, platform: str):
    if platform == jax.default_backend():
        return contextlib.nullcontext()
    return tokamax.config.cross_compile(True)


def ragged_dot(x_OD, w_XDI, sizes_X):
    """``[O, D] x [X, D, I] -> [O, I]`` (float32 accumulation, x's dtype out), rows sorted by
    group; rows past ``sum(sizes_X)`` come out zero."""
    tokamax = _tokamax()
    platform = target_platform()
    with _cross_compiling(tokamax, platform):
        out = tokamax.ragged_dot(x_OD, w_XDI, sizes_X, preferred_element_type=jnp.float32,
                                 implementation=_RAGGED_DOT[platform])
    # Rows past the groups (expert-parallel padding) must be zero; a Mosaic kernel may leave
    # them unwritten, and the TPU v1 kernel has no zero_initialize.
    in_groups_O = jnp.arange(x_OD.shape[0]) < jnp.sum(sizes_X)
    return jnp.where(in_groups_O[:, None], out, 0).astype(x_OD.dtype)


def attention(q, k, v, *, mask, segment_ids, q_positions, kv_positions, scale, softcap):
    """``glocal.kernels.attention``'s contract through ``tokamax.dot_product_attention``:
    q ``[B,T,H,E]``, k/v ``[B,S,K,E]``; fully masked rows are 0."""
    tokamax = _tokamax()
    platform = target_platform()
    impl = _ATTENTION[platform]
    plain = segment_ids is None and q_positions is None and kv_positions is None and q.shape[1] == k.shape[1]
    kwargs = dict(scale=scale, logits_soft_cap=softcap, implementation=impl)
    allowed_B1TS = None
    if plain and mask == masks_lib.Causal():
        kwargs["is_causal"] = True
    elif plain and isinstance(mask, masks_lib.SlidingWindow) and mask.causal and platform != "tpu":
        kwargs.update(is_causal=True, local_window_size=(mask.size - 1, 0))
    elif not (plain and isinstance(mask, masks_lib.Full)):
        allowed_BTS = allowed_pairs(mask, q.shape[1], k.shape[1], segment_ids=segment_ids,
                                    q_positions=q_positions, kv_positions=kv_positions)
        allowed_B1TS = jnp.broadcast_to(allowed_BTS, (q.shape[0],) + allowed_BTS.shape[1:])[:, None]
        kwargs["mask"] = allowed_B1TS
    with _cross_compiling(tokamax, platform):
        out = tokamax.dot_product_attention(q, k, v, **kwargs)
    if allowed_B1TS is not None:  # our convention: a row that sees no key gives 0
        out = jnp.where(jnp.any(allowed_B1TS[:, 0], axis=-1)[:, :, None, None], out, 0)
    return out.astype(q.dtype)
