"""The decoder skeleton every family builds on.

    DecoderLayer:  x + mixer(norm(x))  then  x + ffn(norm(x))
    DecoderStack:  a unit of layers (one per ``LayerKind`` of ``pattern``) repeated
                   ``repeats`` times, stacked on a ``layers`` axis and run with ``lax.scan``
                   (compile time flat in depth) or a loop; remat by named policy

A stack owns its layers' caches: ``init_cache`` gives, per pattern slot P, that slot's
mixer cache stacked over the repeats (any ``Cache`` pytree: KV, ring, recurrent state), and
a cached call reads and writes them in place. What a stack can do is what its parts can: it
keeps packed documents apart when every mixer's ``packs_documents`` holds. The baseline is
one stack; FIT's local and global stacks and the Block Transformer's two decoders are stacks
of their own shapes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.layers.cache import stack_cache
from glocal.layers.norms import make_norm
from glocal.layers.params import active_param_count
from glocal.layers.spec import LayerKind, LayerSpec
from glocal.layers.stack import run_cached_stack, run_stack, stack_modules
from glocal.sharding import constrain


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer of ``kind`` (mixer + FFN)."""

    def __init__(self, spec: LayerSpec, kind: LayerKind, *, rngs: nnx.Rngs):
        norm = lambda: make_norm(spec.norm, spec.d_model, eps=spec.norm_eps, dtype=spec.dtype, rngs=rngs)
        self.mixer_norm = norm()
        self.mixer = kind.build_mixer(spec, rngs=rngs)
        self.ffn_norm = norm()
        self.ffn = kind.build_ffn(spec, rngs=rngs)

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None, valid_BT=None):
        """``(x_BTD, cache, aux)``: aux holds the FFN's auxiliary losses (empty for dense)."""
        a_BTD, cache = self.mixer(self.mixer_norm(x_BTD), positions_BT=positions_BT,
                                  segment_ids_BT=segment_ids_BT, cache=cache, valid_BT=valid_BT)
        x_BTD = x_BTD + a_BTD
        y_BTD, aux = self.ffn(self.ffn_norm(x_BTD))
        # Statistics (weight None) get a leading layer axis: they are logged per layer, not summed.
        aux = {k: (v if w is not None else v[None], w) for k, (v, w) in aux.items()}
        x_BTD = x_BTD + y_BTD
        return constrain(x_BTD, ("batch", None, None)), cache, aux


class _Unit(nnx.Module):
    """One repeat of the pattern: the module that is stacked and scanned."""

    def __init__(self, spec: LayerSpec, pattern: tuple[LayerKind, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(spec, kind, rngs=rngs) for kind in pattern])

    def __call__(self, x_BTD, caches_P, **kw):
        new_caches, aux = [], {}
        for p, layer in enumerate(self.layers):
            x_BTD, c, a = layer(x_BTD, cache=None if caches_P is None else caches_P[p], **kw)
            new_caches.append(c)
            aux = merge_aux(aux, a)
        return x_BTD, (None if caches_P is None else tuple(new_caches)), aux


class DecoderStack(nnx.Module):
    """``repeats`` x ``pattern`` decoder layers of shape ``spec``."""

    def __init__(self, spec: LayerSpec, pattern: Sequence[LayerKind], repeats: int, *, scan: bool = True,
                 remat: str = "auto", rngs: nnx.Rngs):
        self.pattern, self.repeats, self.scan, self.remat = tuple(pattern), repeats, scan, remat
        self.units = stack_modules(lambda r: _Unit(spec, self.pattern, rngs=r), repeats, rngs)

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, caches=None, valid_BT=None):
        """``(x_BTD, caches, aux)``. With ``caches`` (from ``init_cache``) each layer attends to
        what its cache holds and stores the new positions where ``valid_BT``."""
        kw = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, valid_BT=valid_BT)
        if caches is None:
            def body(unit, x, _):
                x, _, aux = unit(x, None, **kw)
                return x, aux
            x_BTD, aux_L = run_stack(self.units, x_BTD, None, body, scan=self.scan, remat=self.remat)
            return x_BTD, None, {k: _over_repeats(v, w) for k, (v, w) in aux_L.items()}

        def call(unit, x, views):
            x, views, _ = unit(x, views, **kw)
            return x, views
        x_BTD, caches = run_cached_stack(self.units, x_BTD, caches, call, scan=self.scan, remat=self.remat)
        return x_BTD, caches, {}

    # -- caches and costs ---------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int) -> tuple:
        """Per pattern slot, its mixer's empty cache stacked over the repeats."""
        return tuple(stack_cache(layer.mixer.init_cache(batch_size, max_len), self.repeats)
                     for layer in self.units.layers)

    def flops_per_row(self, seq_len: int) -> float:
        """Forward FLOPs per position for sequences of ``seq_len``: 2 per parameter (every
        parameter multiplies once per position; norm scales included, as a small
        overcount) plus each mixer's score FLOPs. An FFN with ``active_params()`` (a routed
        one) counts only the parameters a position actually uses."""
        n = active_param_count(self)  # (stacked: every size covers all repeats)
        return 2.0 * n + self.repeats * sum(layer.mixer.score_flops(seq_len) for layer in self.units.layers)

    @property
    def crosses_documents(self) -> list[str]:
        """Mixer kinds of this stack that cannot keep packed documents apart (their
        ``packs_documents`` is False); empty when the stack honours segment ids."""
        return sorted({kind.mixer for kind, layer in zip(self.pattern, self.units.layers)
                       if not getattr(layer.mixer, "packs_documents", False)})

    @property
    def growing_caches(self) -> list[str]:
        """Mixer kinds of this stack whose cache grows with the sequence (their ``bounded_cache``
        is False); empty when the stack can decode past ``max_seq_len`` in constant memory."""
        return sorted({kind.mixer for kind, layer in zip(self.pattern, self.units.layers)
                       if not getattr(layer.mixer, "bounded_cache", False)})


def _over_repeats(value_L, weight_L):
    """A unit's aux entry stacked over the repeats (L): losses add up (a weight is the same in
    every layer); statistics ``[L, P, ...]`` become per-layer ``[L P, ...]`` in layer order."""
    if weight_L is None:
        return value_L.reshape(-1, *value_L.shape[2:]), None
    return jnp.sum(value_L, axis=0), weight_L[0]


def merge_aux(a: dict, *others: dict) -> dict:
    """Merge ``{name: (loss, weight)}`` of several layers or stacks: losses add, the weight is
    kept; statistics (weight None, a leading layer axis) are concatenated in layer order."""
    out = dict(a)
    for b in others:
        for name, (loss, weight) in b.items():
            if name not in out:
                out[name] = (loss, weight)
            elif weight is None:
                out[name] = (jnp.concatenate([out[name][0], loss], axis=0), None)
            else:
                out[name] = (out[name][0] + loss, weight)
    return out


class DecoderChain(nnx.Module):
    """Stacks run one after the other with the interface of one ``DecoderStack`` (e.g. a few
    dense layers before a repeating dense/MoE pattern); caches are a tuple per stack."""

    def __init__(self, stacks: Sequence[DecoderStack]):
        self.stacks = nnx.List(list(stacks))

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, caches=None, valid_BT=None):
        new, aux = [], {}
        for i, stack in enumerate(self.stacks):
            x_BTD, c, a = stack(x_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                caches=None if caches is None else caches[i], valid_BT=valid_BT)
            new.append(c)
            aux = merge_aux(aux, a)
        return x_BTD, (None if caches is None else tuple(new)), aux

    def init_cache(self, batch_size: int, max_len: int) -> tuple:
        return tuple(s.init_cache(batch_size, max_len) for s in self.stacks)

    def flops_per_row(self, seq_len: int) -> float:
        return sum(s.flops_per_row(seq_len) for s in self.stacks)

    @property
    def crosses_documents(self) -> list[str]:
        return sorted({m for s in self.stacks for m in s.crosses_documents})

    @property
    def growing_caches(self) -> list[str]:
        return sorted({m for s in self.stacks for m in s.growing_caches})
