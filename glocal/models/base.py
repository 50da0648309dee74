"""The model contract: what every language model in the zoo does, and the plumbing they share.

Read this file to know what a new family must provide (``docs/adding-a-model.md`` walks
through adding one). A family is a config dataclass deriving from ``DecoderConfig`` and a
model class deriving from ``ModelBase`` that satisfies ``LanguageModel``:

``model(tokens_BT, *, positions_BT=None, segment_ids_BT=None)``
    Always ``(logits, aux)``: logits ``[B, T, V]`` (float32) for every position, any
    ``T <= config.max_seq_len``, and ``aux = {name: (loss, weight)}``, the auxiliary losses
    (routers) that the trainer adds as ``weight * loss`` (empty for most models). Position
    ``t`` sees tokens ``<= t`` only.

Packed documents (``packed_documents``: derived from the layers where a family is a stack
of decoder layers; a class attribute where the architecture decides)
    True: ``segment_ids_BT`` keeps attention inside each document of a packed window and
    ``positions_BT`` restarts at each document, so a packed row gives the same logits as
    each document run alone. False: the architecture cannot isolate documents (e.g. FIT's
    and the Block Transformer's global paths summarise whole groups); passing either
    argument raises a ``ValueError`` (never silently ignored), and the trainer feeds such a
    model plain windows, in which a document sees the earlier documents of its window, and
    says so at start-up (the loss mask still skips cross-document targets).

``init_cache(batch_size, max_len=None)``
    An empty decoding cache (an explicit pytree with ``length_B``: tokens consumed per row)
    for sequences up to ``max_len <= max_seq_len`` tokens. A family implements
    ``_empty_cache(batch_size, length)``; ``ModelBase`` checks the length.

``prefill(tokens_BT, lengths_B, cache)``
    Takes a *fresh* cache from ``init_cache`` (every family; a concrete cache that already
    holds tokens is rejected with the same error; inside ``jit`` it cannot be checked) and
    right-padded prompts of ``lengths_B`` real tokens. Returns the next-token logits
    ``[B, V]`` at each prompt's last token and the filled cache.

``decode(tokens_B, cache)``
    One token per row -> next-token logits ``[B, V]`` and the updated cache. Prefill then
    decode reproduce the teacher-forced logits at every position (the conformance suite,
    ``tests/test_conformance.py``, checks this and the rest of this contract).

``cache_nbytes(batch_size, length)``
    The cache's size in bytes, from the shapes of ``_empty_cache`` (``jax.eval_shape``, no
    memory), for any length (also past ``max_seq_len``, for planning).

``flops_per_token(seq_len)``
    Training FLOPs per token (3x the forward's matmul FLOPs; attention counts the keys a
    query actually sees), used for MFU.

Bad input is a clear error: token ids outside ``[0, vocab_size)`` (when concrete), inputs or
caches longer than ``max_seq_len``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glocal.layers import Embed, Unembed, make_norm
from glocal.layers.cache import tree_nbytes
from glocal.layers.decoder import merge_aux
from glocal.layers.params import active_param_count, param_count  # noqa: F401 - part of the model API
from glocal.models.decoder_config import DTYPES, DecoderConfig  # noqa: F401 - the families' config base
from glocal.sharding import constrain


@runtime_checkable
class LanguageModel(Protocol):
    """The interface (see the module docstring for what each method means)."""

    config: Any
    packed_documents: bool

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None): ...

    def init_cache(self, batch_size: int, max_len: int | None = None): ...

    def prefill(self, tokens_BT, lengths_B, cache): ...

    def decode(self, tokens_B, cache): ...

    def cache_nbytes(self, batch_size: int, length: int) -> int: ...

    def flops_per_token(self, seq_len: int) -> float: ...


class ModelCache:
    """Base of a family's cache dataclass: it must have ``length_B`` (tokens per row)."""

    length_B: jax.Array

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)


class ModelBase(nnx.Module):
    """Plumbing shared by every family. A subclass sets ``self.config`` and, for the shared
    output head, ``self.embed`` (token embedding, the tied head), ``self.final_norm`` and
    ``self.head`` (None when tied), e.g. with ``self._init_output(width, rngs)``."""

    packed_documents: bool = False  # a class attribute, or a property derived from the layers
    packing_note: str = ""  # why documents cannot be isolated (for the error)

    @property
    def growing_caches(self) -> list[str]:
        """What makes the decoding cache grow with the sequence; empty when every layer's cache
        is bounded (sliding windows, windows with sinks, recurrent states), in which case
        ``glocal.generate`` decodes past ``max_seq_len`` in constant memory."""
        return [f"the {type(self).__name__} architecture"]

    # -- inputs ---------------------------------------------------------------------------
    def _check_inputs(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> None:
        cfg = self.config
        name = type(self).__name__
        if not self.packed_documents and (positions_BT is not None or segment_ids_BT is not None):
            raise ValueError(
                f"{name} does not take positions_BT / segment_ids_BT: it cannot keep packed documents "
                f"apart ({self.packing_note}). Call it without them; the trainer feeds such models plain "
                f"windows and masks cross-document targets in the loss.")
        if tokens_BT.ndim != 2:
            raise ValueError(f"{name} expects tokens of shape [batch, length], got {tokens_BT.shape}.")
        T = tokens_BT.shape[1]
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}; raise max_seq_len"
                             f"{self._length_hint()} or feed shorter windows.")
        check_tokens(tokens_BT, cfg.vocab_size)

    def _length_hint(self) -> str:
        return ""

    def _positions(self, B: int, T: int):
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    # -- output head ------------------------------------------------------------------------
    def _init_output(self, width: int, rngs: nnx.Rngs) -> None:
        cfg = self.config
        self.final_norm = make_norm(cfg.norm, width, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else Unembed(
            width, cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def _make_embed(self, width: int, rngs: nnx.Rngs) -> Embed:
        cfg = self.config
        return Embed(cfg.vocab_size, width, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     rngs=rngs)

    def _logits(self, x_BTD):
        """Final norm, head (or the tied embedding), optional soft-cap; float32 logits."""
        x_BTD = self.final_norm(x_BTD)
        logits_BTV = self.embed.attend(x_BTD) if self.head is None else self.head(x_BTD)
        logits_BTV = constrain(logits_BTV, ("batch", None, "vocab_act"))
        cap = self.config.logit_softcap
        return logits_BTV if cap is None else cap * jnp.tanh(logits_BTV / cap)

    @staticmethod
    def _output(logits_BTV, *auxes: dict):
        """``(logits, aux)``: every stack's auxiliary losses merged (``{}`` when none)."""
        return logits_BTV, merge_aux({}, *auxes)

    def _head_flops(self) -> float:
        """Forward FLOPs per token of the final norm and the output matmul."""
        table = self.embed.table_VD if self.head is None else self.head.w_DV
        return 2.0 * (param_count(self.final_norm) + table.size)

    # -- caches -----------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int | None = None):
        """Empty cache for sequences up to ``max_len`` tokens (default ``max_seq_len``)."""
        return self._empty_cache(batch_size, self._cache_length(max_len))

    def cache_nbytes(self, batch_size: int, length: int) -> int:
        """Bytes of the cache for ``length`` tokens (shapes only: nothing is allocated)."""
        return tree_nbytes(jax.eval_shape(lambda: self._empty_cache(batch_size, length)))

    def _empty_cache(self, batch_size: int, length: int):
        raise NotImplementedError(f"{type(self).__name__} does not decode with a cache.")

    def _cache_length(self, max_len: int | None) -> int:
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}.")
        if max_len < 1:
            raise ValueError(f"cache length must be positive, got {max_len}.")
        return max_len

    # -- prefill and decode, for families that consume any chunk with one ``_extend`` ---------
    def prefill(self, tokens_BT, lengths_B, cache):
        """Right-padded prompts (``lengths_B`` real tokens each) into a fresh cache; returns
        the next-token logits ``[B, V]`` at each prompt's last token."""
        self._check_fresh(cache)
        return self._extend(tokens_BT, lengths_B, cache)

    def decode(self, tokens_B, cache):
        """One new token per sequence -> next-token logits ``[B, V]`` and the updated cache."""
        return self._extend(tokens_B[:, None], jnp.ones_like(cache.length_B), cache)

    def _extend(self, tokens_BT, lengths_B, cache):
        """Consume a chunk after what the cache holds: ``(logits_BV, cache)``."""
        raise NotImplementedError(f"{type(self).__name__} does not decode with a cache.")

    def _chunk(self, tokens_BT, lengths_B, cache):
        """``(positions_BT, valid_BT)`` of a chunk that continues each row of ``cache``
        (checked like any input); the first ``lengths_B`` tokens of a row are real."""
        self._check_inputs(tokens_BT)
        T = tokens_BT.shape[1]
        positions_BT = cache.length_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        return positions_BT, jnp.arange(T)[None] < lengths_B[:, None]

    def _last_logits(self, x_BTD, lengths_B):
        """Next-token logits ``[B, V]`` at each row's last real token of a chunk."""
        last_B = jnp.maximum(lengths_B - 1, 0)
        return self._logits(jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1))[:, 0]

    def _check_fresh(self, cache) -> None:
        """``prefill`` takes a fresh cache (checked when the cache is concrete)."""
        if isinstance(cache.length_B, jax.core.Tracer):
            return
        if np.any(np.asarray(cache.length_B) != 0):
            raise ValueError(f"{type(self).__name__}.prefill needs an empty cache (from init_cache); this one "
                             f"already holds tokens. Continue a cached sequence with decode(), one token at a "
                             f"time.")


def check_tokens(tokens_BT, vocab_size: int) -> None:
    """Reject out-of-range token ids when they are concrete (inside jit they are not)."""
    if isinstance(tokens_BT, jax.core.Tracer):
        return
    t = np.asarray(tokens_BT)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {t.dtype}.")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t.max() if t.max() >= vocab_size else t.min()
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size}); check the "
                         f"tokenizer matches the model or raise vocab_size.")
