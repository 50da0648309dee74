"""One attention entry point, many implementations.

``attention(q, k, v, mask=...)`` is what every glocal layer calls; ``impl`` picks how:

* ``"xla"``        dense einsum in the compute dtype (float32 logits/softmax); any mask
  (``glocal.kernels.dense``).
* ``"dot_product"`` ``jax.nn.dot_product_attention`` (XLA, or cuDNN on GPU for the masks it
  understands natively: causal and causal sliding windows without positions).
* ``"reference"``  dense float32 at HIGHEST precision: the oracle for tests
  (``glocal.kernels.reference``).
* ``"blockwise"``  pure JAX over the mask's block schedule: only visited tiles are computed,
  memory linear in T, its own FlashAttention-style gradient (``glocal.kernels.blockwise``).
* ``"pallas_tpu"`` our Pallas TPU (Mosaic) kernels on the same schedule, forward, dQ and
  dK/dV (``glocal.kernels.pallas_tpu``); interpret mode off-TPU (tests on CPU).
* ``"pallas_gpu"`` our Pallas Triton kernels on the same schedule (``glocal.kernels.pallas_gpu``);
  interpret mode off-GPU.
* ``"tokamax"``    ``tokamax.dot_product_attention`` (optional extra, Python >= 3.12): its Mosaic
  TPU / Triton GPU kernels, XLA on CPU; any mask (causal and windows natively, the rest as a
  boolean mask), no log-sum-exp (``glocal.kernels.tokamax_ops``).
* ``"auto"``       per platform and call (``auto_impl``): on CPU ``"blockwise"`` from 2k x 2k
  when the mask lets it skip tiles (measured faster at model level), else ``"xla"``; on
  GPU/TPU ``"xla"`` until our Pallas kernels have been run on hardware.

Learned per-head sinks (``sinks=``, GPT-OSS) run in every implementation but ``dot_product``
and ``tokamax`` (their kernels take no sink; they refuse).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glocal.kernels import masks as masks_lib
from glocal.kernels.dense import allowed_pairs, dense_attention, fold_sinks, split_segments
from glocal.kernels.reference import attention_reference

IMPLEMENTATIONS = ("auto", "xla", "dot_product", "reference", "blockwise", "pallas_tpu", "pallas_gpu", "tokamax")
_BLOCK_SPARSE = ("blockwise", "pallas_tpu", "pallas_gpu")


def attention(
    q,
    k,
    v,
    *,
    mask: masks_lib.Mask,
    segment_ids=None,
    q_positions=None,
    kv_positions=None,
    scale: float | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    block_sizes: tuple[int, int] | None = None,
    sinks=None,
):
    """Masked multi-head attention with grouped kv heads.

    Args:
      q: ``[B, T, H, E]`` queries.
      k, v: ``[B, S, K, E]`` keys and values, ``H % K == 0``.
      mask: a ``glocal.kernels.masks.Mask``; evaluated on indices 0..T-1 / 0..S-1, or on
        ``q_positions [B, T]`` / ``kv_positions [B, S]`` when given (negative kv positions
        mark empty cache slots and are never attended).
      segment_ids: ``[B, T]`` (self-attention) or a ``(q_ids [B, T], kv_ids [B, S])`` pair:
        queries only see keys of the same segment (packed documents).
      scale: logit scale, default ``E ** -0.5``.
      softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before masking.
      impl: one of ``IMPLEMENTATIONS``.
      return_lse: also return the log-sum-exp ``[B, T, H]`` (float32).
      block_sizes: ``(block_q, block_kv)`` tiles for the block-sparse implementations.
      sinks: learned sink logits ``[H]``, one per query head (GPT-OSS; used as float32):
        a key every query sees with this logit (not scaled, capped or masked) and value 0,
        which only adds ``exp(sink)`` to the softmax denominator; differentiable. The lse
        then includes it (``logaddexp(lse, sink)``: finite, ``sink`` on a row that sees no
        key). Not the ``masks.Sinks`` mask (StreamingLLM's kept first tokens). Not for
        ``dot_product`` or ``tokamax``.

    Returns:
      ``[B, T, H, E]`` in q's dtype (and the lse if asked). Fully masked rows are 0.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}.")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q [B,T,H,E] and k/v [B,S,K,E]; got {q.shape}, {k.shape}, {v.shape}."
        )
    H, K = q.shape[2], k.shape[2]
    if H % K:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({K}).")
    if sinks is not None and jnp.shape(sinks) != (H,):
        raise ValueError(f"sinks must be [H] = [{H}] (one logit per query head); got shape {jnp.shape(sinks)}.")
    if impl == "auto":
        impl = auto_impl(mask, q.shape[1], k.shape[1], positions=q_positions is not None or kv_positions is not None)
    if impl == "reference":
        return attention_reference(
            q, k, v, mask=mask, segment_ids=segment_ids, q_positions=q_positions,
            kv_positions=kv_positions, scale=scale, softcap=softcap, return_lse=return_lse, sinks=sinks,
        )
    if sinks is not None and (impl == "tokamax" or (impl == "dot_product" and not return_lse)):
        raise ValueError(f"impl={impl!r} has no attention sinks; use impl='xla' or 'blockwise' with sinks.")
    if impl in _BLOCK_SPARSE:
        if q_positions is not None or kv_positions is not None:
            raise ValueError(f"impl={impl!r} follows a static block schedule; positions (cached "
                             f"decoding) need impl='xla' or 'auto'.")
        if impl == "blockwise":
            from glocal.kernels.blockwise import attention_blockwise as kernel
        elif impl == "pallas_tpu":
            from glocal.kernels.pallas_tpu import attention_pallas_tpu as kernel
        else:
            from glocal.kernels.pallas_gpu import attention_pallas_gpu as kernel
        default_blocks = (64, 64) if impl == "pallas_gpu" else (128, 128)
        return kernel(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale, softcap=softcap,
                      block_sizes=block_sizes or default_blocks, return_lse=return_lse, sinks=sinks)
    if impl == "tokamax":
        if return_lse:
            raise ValueError("impl='tokamax' does not return the log-sum-exp; use impl='xla' or 'blockwise'.")
        from glocal.kernels.tokamax_ops import attention as tokamax_attention

        return tokamax_attention(q, k, v, mask=mask, segment_ids=segment_ids, q_positions=q_positions,
                                 kv_positions=kv_positions, scale=scale, softcap=softcap)
    if impl == "dot_product" and not return_lse:
        if softcap is not None:
            raise ValueError(
                "impl='dot_product' (jax.nn.dot_product_attention) has no logit soft-cap; "
                "use impl='xla' with softcap."
            )
        return _dot_product(q, k, v, mask, segment_ids, q_positions, kv_positions, scale)
    if q_positions is None and kv_positions is None:
        spans = _causal_key_spans(mask, q.shape[1], k.shape[1])
        if spans is not None:
            return _dense_over_spans(q, k, v, mask, spans, segment_ids, scale, softcap, return_lse, sinks)
    allowed = allowed_pairs(
        mask, q.shape[1], k.shape[1], segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions,
    )
    return dense_attention(q, k, v, allowed, scale=scale, softcap=softcap, return_lse=return_lse, sinks_H=sinks)


# CPU threshold for auto, from a baseline training step (benchmarks/attention_auto.py,
# RESULTS.md "auto on CPU"): below 2k tokens the dense path, which already skips causal key
# spans, is faster (blockwise 0.56-0.91x); from 2k on blockwise was 0.98-1.34x at 2k and
# 1.09-2.07x at 4k over two runs, with ~40% less memory, whenever it can skip tiles.
_AUTO_MIN_PAIRS = 2048 * 2048
_AUTO_MAX_DENSITY = 0.9


def auto_impl(mask: masks_lib.Mask, T: int, S: int, *, positions: bool = False, platform: str | None = None) -> str:
    """The implementation ``impl="auto"`` runs for this call."""
    platform = jax.default_backend() if platform is None else platform
    if positions or platform != "cpu" or T * S < _AUTO_MIN_PAIRS:
        return "xla"
    from glocal.kernels.schedule import build_schedule

    density = build_schedule(mask, T, S, 128, 128).stats["density"]
    return "blockwise" if density < _AUTO_MAX_DENSITY else "xla"


# Query rows per chunk when a causal mask lets the dense path skip key ranges.
_SPAN_CHUNK = 64


def _causal_key_spans(mask, T: int, S: int):
    """For causal and causal sliding-window self-attention, the key range ``[lo, hi)`` each
    chunk of ``_SPAN_CHUNK`` queries can see, or None when chunking would not save work."""
    if T != S or T < 2 * _SPAN_CHUNK or T % _SPAN_CHUNK:
        return None
    if mask == masks_lib.Causal():
        window = None
    elif isinstance(mask, masks_lib.SlidingWindow) and mask.causal:
        window = mask.size
    else:
        return None
    spans = []
    for start in range(0, T, _SPAN_CHUNK):
        stop = start + _SPAN_CHUNK
        lo = 0 if window is None else max(0, start - window + 1)
        spans.append((start, stop, lo, stop))
    return spans


def _dense_over_spans(q, k, v, mask, spans, segment_ids, scale, softcap, return_lse, sinks=None):
    """Dense attention per query chunk over only the keys its mask can reach: for a causal
    mask this skips the upper triangle's key blocks (about half the work at long T).
    Learned sinks are folded in once, over all chunks (``fold_sinks``): per chunk, every
    extra op costs more than its arithmetic on CPU at these sizes."""
    with_sinks = sinks is not None
    # Keys and values heads-major once: sliced per chunk, they would be transposed again for
    # every chunk that reads them (each key by T / _SPAN_CHUNK chunks at most).
    k_BKSE, v_BKSE = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    # In bf16/f16 the chunks are sliced from float32 copies: the backward then sums the chunks'
    # key/value gradients in float32 and rounds once (sliced in bf16, every partial sum is
    # rounded, and XLA:CPU's element-wise bf16 conversions made that sum cost as much as the
    # attention matmuls).
    narrow = k.dtype.itemsize < 4
    if narrow:
        k_BKSE, v_BKSE = k_BKSE.astype(jnp.float32), v_BKSE.astype(jnp.float32)
    outs, lses = [], []
    for start, stop, lo, hi in spans:
        seg = None
        if segment_ids is not None:
            q_seg, kv_seg = split_segments(segment_ids)
            seg = (q_seg[:, start:stop], kv_seg[:, lo:hi])
        allowed = allowed_pairs(mask, stop - start, hi - lo, segment_ids=seg,
                                q_positions=jnp.arange(start, stop, dtype=jnp.int32)[None],
                                kv_positions=jnp.arange(lo, hi, dtype=jnp.int32)[None])
        # Causal self-attention: every query sees itself (a token is always in its own
        # segment), so no row is ever fully masked.
        k_i, v_i = k_BKSE[:, :, lo:hi], v_BKSE[:, :, lo:hi]
        if narrow:
            k_i, v_i = k_i.astype(k.dtype), v_i.astype(v.dtype)
        res = dense_attention(q[:, start:stop], k_i, v_i, allowed, scale=scale,
                              softcap=softcap, return_lse=return_lse or with_sinks, rows_nonempty=True,
                              lse_grad=with_sinks, kv_heads_major=True)
        outs.append(res[0] if return_lse or with_sinks else res)
        if return_lse or with_sinks:
            lses.append(res[1])
    out = jnp.concatenate(outs, axis=1)
    if not (return_lse or with_sinks):
        return out
    lse = jnp.concatenate(lses, axis=1)
    if with_sinks:
        out, lse = fold_sinks(out, lse, sinks)
        out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def _dot_product(q, k, v, mask, segment_ids, q_positions, kv_positions, scale):
    structural = q_positions is None and kv_positions is None and segment_ids is None
    if structural and q.shape[1] == k.shape[1]:
        # Pass the masks jax.nn understands natively so cuDNN/flash paths can skip work.
        if mask == masks_lib.Causal():
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
        if isinstance(mask, masks_lib.SlidingWindow) and mask.causal:
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, local_window_size=(mask.size - 1, 0)
            )
        if isinstance(mask, masks_lib.Full):
            return jax.nn.dot_product_attention(q, k, v, scale=scale)
    allowed_BTS = allowed_pairs(
        mask, q.shape[1], k.shape[1], segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions,
    )
    B = q.shape[0]
    allowed_B1TS = jnp.broadcast_to(allowed_BTS, (B,) + allowed_BTS.shape[1:])[:, None]
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=allowed_B1TS)
    # jax.nn averages the values of a fully masked row; our convention is 0.
    any_BT = jnp.any(allowed_B1TS[:, 0], axis=-1)
    return jnp.where(any_BT[:, :, None, None], out, 0).astype(q.dtype)
