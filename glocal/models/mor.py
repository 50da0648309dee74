"""Mixture-of-Recursions (Bae et al. 2025): one shared stack of ``b`` layers applied up to
``num_recursions`` (N_r) times, a router deciding per token how many times.

    tokens -> Embed -> [first layer] -> r = 1..N_r: route, Shared_b on the routed tokens
           -> [last layer] -> Norm -> head

Parameter sharing (``sharing``): ``cycle`` (``num_layers = b N_r``, every unrolled layer is a
shared one) or ``middle_cycle`` (``num_layers = b N_r + 2``: the first and last layers are
unique; the paper's main variant). ``router="none"`` is the plain recursive baseline (every
token takes every step).

Expert-choice router (``router="expert_choice"``): per step r a linear router ``w_r`` (no
bias) gives ``g = alpha * sigmoid(x . w_r)``. Two routing modes share the weights:

* ``topk`` (training; non-causal, the paper's): among the tokens selected at step r-1 (all at
  r = 1), the ``k_r = max(1, floor(cap_r T))`` with the largest logits, sorted by position; the
  shared layers run on the compacted ``[B, k_r, D]`` sequence with RoPE at the *original*
  positions (causal order is kept by the sort), and ``x <- x + g * Shared(x)`` for them (the
  stack's output includes its residual, so a selected token becomes ``(1 + g) h + g Delta``);
  the others keep ``x``. A BCE loss (``router_aux_weight``) teaches ``sigmoid(logit)`` the
  top-k membership, over each step's candidates, summed over steps.
* ``threshold`` (evaluation, decoding; causal): a token continues to step r if it reached step
  r - 1, its logit is > 0 (``sigmoid > 0.5``), and fewer than ``ceil(cap_r (t + 1))`` tokens of
  its row up to its position t have (a running budget: it bounds step r's cache by
  ``cap_r`` of the length whatever the router says). Steps with ``cap_r = 1`` take every
  candidate, as top-k does. Teacher forcing runs the shared layers on the whole sequence with
  attention restricted to the tokens active at the step; cached decoding stores only them.

Token-choice router (``router="token_choice"``): one softmax over depths on the recursion's
input; each token runs ``1 + argmax`` steps (causal by construction), leaves as
``h0 + p * out``; Switch balance loss over depths and z-loss. Its steps are computed on the
whole sequence with masks (static shapes; no ragged re-batching) and its caches hold every
token (a depth has no capacity).

Recursive KV sharing (``kv_sharing=True``, expert choice): the first step's shared layers
store their keys/values and every later step's queries attend to those (the tokens' own
later-step keys/values are never computed into a cache): 1 / N_r of the shared layers' KV.

Caches are recursion-wise and compacted (``CompactKVCache``): step r's shared layers hold
``ceil(cap_r max_len)`` slots, so a sequence costs ``2 K E L (2 + b sum_r cap_r)`` elements
(middle_cycle) against ``2 K E L (2 + b N_r)`` for full recursion.

Letters as in the package legend: R recursion steps; ``_BS`` tensors index the ``k_r``
tokens routed at a step (its capacity slots).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.configs.base import ConfigError
from glocal.layers import DecoderStack
from glocal.layers.cache import CompactKVCache, stack_cache
from glocal.layers.decoder import merge_aux
from glocal.layers.moe import ROUTING_MODES
from glocal.layers.params import fan_in_init, param
from glocal.models.base import DecoderConfig, ModelBase, ModelCache

SHARING = ("cycle", "middle_cycle")
RECURSION_ROUTERS = ("expert_choice", "token_choice", "none")


@dataclasses.dataclass(frozen=True)
class MoRConfig(DecoderConfig):
    d_model: int = 64
    num_layers: int = 6  # unrolled depth: b * num_recursions (+ 2 for middle_cycle)
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 256
    num_recursions: int = 2  # N_r
    sharing: str = "middle_cycle"  # cycle | middle_cycle
    recursion_router: str = "expert_choice"  # expert_choice | token_choice | none (full recursion)
    capacities: tuple[float, ...] | None = None  # cap_r per step; None = (N_r - r + 1) / N_r
    router_alpha: float = 0.1  # g = alpha * sigmoid(logit)
    router_aux_weight: float = 1e-3  # BCE of the router logit against top-k membership
    kv_sharing: bool = False  # steps after the first reuse the first step's keys/values (expert choice)
    depth_balance_weight: float = 0.1  # token choice: Switch balance loss over depths
    depth_z_weight: float = 1e-5  # token choice: router z-loss
    routing_mode: str = "topk"  # expert choice: topk (training; non-causal) | threshold (causal; decoding)

    def validate(self) -> None:
        super().validate()
        self.require_positive("d_model", "num_layers", "d_ff", "num_recursions")
        self.require_heads("d_model", "num_heads", "num_kv_heads", "head_dim")
        for name, allowed in (("sharing", SHARING), ("recursion_router", RECURSION_ROUTERS),
                              ("routing_mode", ROUTING_MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        unique = 2 if self.sharing == "middle_cycle" else 0
        R = self.num_recursions
        if self.num_layers - unique < R or (self.num_layers - unique) % R:
            form = "b x num_recursions + 2 (first and last unique)" if unique else "b x num_recursions"
            ok = [b * R + unique for b in range(1, 5)]
            raise ConfigError(f"num_layers={self.num_layers} does not split into {form} with num_recursions={R}; "
                              f"use num_layers in {ok}... or another num_recursions.")
        if self.kv_sharing and self.recursion_router != "expert_choice":
            raise ConfigError(f"kv_sharing=true needs recursion_router='expert_choice' (got "
                              f"{self.recursion_router!r}); set kv_sharing=false.")
        caps = self.capacity_schedule
        if len(caps) != R:
            raise ConfigError(f"capacities has {len(caps)} entries; give one per recursion step ({R}).")
        if any(not 0 < c <= 1 for c in caps) or any(b > a for a, b in zip(caps, caps[1:])):
            raise ConfigError(f"capacities={caps} must lie in (0, 1] and never increase from one step to the next "
                              f"(a token can only continue if it took the previous step), e.g. "
                              f"{tuple(round((R - r) / R, 3) for r in range(R))}.")

    @property
    def base_depth(self) -> int:
        return (self.num_layers - (2 if self.sharing == "middle_cycle" else 0)) // self.num_recursions

    @property
    def capacity_schedule(self) -> tuple[float, ...]:
        R = self.num_recursions
        if self.recursion_router != "expert_choice":  # every step may see every token
            return (1.0,) * R
        return tuple(self.capacities) if self.capacities is not None else tuple((R - r) / R for r in range(R))

    def routing_modes(self) -> tuple[str, ...]:
        if self.recursion_router == "expert_choice":
            return ROUTING_MODES
        return super().routing_modes()

    def with_routing_mode(self, mode: str):
        cfg = super().with_routing_mode(mode)
        return dataclasses.replace(cfg, routing_mode=mode) if self.recursion_router == "expert_choice" else cfg


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoRCache(ModelCache):
    """``first`` / ``last``: the unique layers' KV caches (empty tuples for ``cycle``);
    ``steps``: per recursion step, the shared layers' compacted caches (only the first step's
    with KV sharing); ``admitted_RB``: tokens each step admitted so far per row (threshold
    routing's running budget)."""

    first: tuple
    steps: tuple
    last: tuple
    admitted_RB: jax.Array
    length_B: jax.Array


def _slots(cap: float, n: int) -> int:
    """``ceil(cap n)``, robust to float rounding (2/3 of 6 is 4, not 5)."""
    return max(1, math.ceil(cap * n - 1e-6))


def _admit(want_BT, positions_BT, count_B, cap: float):
    """Threshold routing's running budget: token t of a row is admitted if it wants to be and
    fewer than ``ceil(cap (t + 1))`` tokens of its row were admitted before it (``count_B`` of
    them in earlier calls). Causal, and never more than ``ceil(cap L)`` tokens in L."""
    limit_BT = jnp.ceil(cap * (positions_BT + 1).astype(jnp.float32) - 1e-6).astype(jnp.int32)

    def step(count_B, xs):
        want_B, limit_B = xs
        ok_B = want_B & (count_B < limit_B)
        return count_B + ok_B.astype(jnp.int32), ok_B

    _, ok_TB = jax.lax.scan(step, count_B, (want_BT.T, limit_BT.T))
    return ok_TB.T


class MoR(ModelBase):
    packed_documents = False
    packing_note = "its top-k router ranks the tokens of the whole window against each other"

    def __init__(self, cfg: MoRConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = self._make_embed(cfg.d_model, rngs)
        spec = cfg.layer(d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, d_ff=cfg.d_ff)
        stack = lambda n: DecoderStack(spec, [cfg.kind("global")], n, scan=cfg.scan_layers,
                                       remat=cfg.remat, rngs=rngs)
        middle = cfg.sharing == "middle_cycle"
        self.first = stack(1) if middle else None
        self.shared = stack(cfg.base_depth)
        self.last = stack(1) if middle else None
        if cfg.recursion_router == "expert_choice":
            self.router_RD = param(rngs, fan_in_init(cfg.d_model), (cfg.num_recursions, cfg.d_model),
                                   (None, "embed"), jnp.float32)
        elif cfg.recursion_router == "token_choice":
            self.router_DR = param(rngs, fan_in_init(cfg.d_model), (cfg.d_model, cfg.num_recursions),
                                   ("embed", None), jnp.float32)
        self._init_output(cfg.d_model, rngs)

    # -- teacher forcing ------------------------------------------------------------------------
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None):
        self._check_inputs(tokens_BT, positions_BT, segment_ids_BT)
        B, T = tokens_BT.shape
        pos_BT = self._positions(B, T)
        x_BTD, auxes = self.embed(tokens_BT), []
        if self.first is not None:
            x_BTD, _, a = self.first(x_BTD, positions_BT=pos_BT)
            auxes.append(a)
        cfg = self.config
        if cfg.recursion_router == "none":
            for _ in range(cfg.num_recursions):
                x_BTD, _, a = self.shared(x_BTD, positions_BT=pos_BT)
                auxes.append(a)
        elif cfg.recursion_router == "token_choice":
            x_BTD, a = self._recurse_depths(x_BTD, pos_BT)
            auxes.append(a)
        elif cfg.routing_mode == "topk":
            x_BTD, a = self._recurse_topk(x_BTD, pos_BT)
            auxes.append(a)
        else:
            x_BTD, a = self._recurse_threshold(x_BTD, pos_BT)
            auxes.append(a)
        if self.last is not None:
            x_BTD, _, a = self.last(x_BTD, positions_BT=pos_BT)
            auxes.append(a)
        return self._output(self._logits(x_BTD), *auxes)

    def _router(self, x_BTD, r: int):
        """The step-r router logit (float32) and gate ``alpha * sigmoid(logit)``."""
        logit_BT = jnp.einsum("btd,d->bt", x_BTD.astype(jnp.float32), self.router_RD[...][r])
        return logit_BT, self.config.router_alpha * jax.nn.sigmoid(logit_BT)

    def _recurse_topk(self, x_BTD, pos_BT, trace: list | None = None):
        """Top-k routing; ``trace`` (a list) receives each step's sorted indices ``[B, k_r]``."""
        cfg = self.config
        B, T, _ = x_BTD.shape
        b_B1 = jnp.arange(B)[:, None]
        cand_BT = jnp.ones((B, T), bool)
        aux, bce, agree, kv = {}, 0.0, [], None
        for r, cap in enumerate(cfg.capacity_schedule):
            logit_BT, gate_BT = self._router(x_BTD, r)
            k = max(1, math.floor(cap * T + 1e-6))
            _, idx_BS = jax.lax.top_k(jnp.where(cand_BT, logit_BT, -jnp.inf), k)
            idx_BS = jnp.sort(idx_BS, axis=-1)  # causal order among the routed tokens
            member_BT = jnp.zeros((B, T), bool).at[b_B1, idx_BS].set(True)
            # BCE over this step's candidates: sigmoid(logit) should say "selected".
            m = member_BT.astype(jnp.float32)
            loss_BT = jnp.maximum(logit_BT, 0) - logit_BT * m + jnp.log1p(jnp.exp(-jnp.abs(logit_BT)))
            bce = bce + jnp.sum(loss_BT * cand_BT) / jnp.maximum(jnp.sum(cand_BT), 1)
            # How often the causal rule (logit > 0, or a full step) makes the same choice.
            rule_BT = (logit_BT > 0) | (cap >= 1.0)
            agree.append(jnp.sum((rule_BT == member_BT) & cand_BT) / jnp.maximum(jnp.sum(cand_BT), 1))
            if trace is not None:
                trace.append(idx_BS)
            x_BSD, pos_BS = x_BTD[b_B1, idx_BS], pos_BT[b_B1, idx_BS]
            if cfg.kv_sharing:  # step 1 fills a KV cache; later steps only read it
                y_BSD, kv = self._shared_kv_step(x_BSD, pos_BS, kv, jnp.ones((B, k), bool), first=r == 0)
            else:
                y_BSD, _, a = self.shared(x_BSD, positions_BT=pos_BS)
                aux = merge_aux(aux, a)
            x_BTD = x_BTD.at[b_B1, idx_BS].add(gate_BT[b_B1, idx_BS][..., None].astype(x_BTD.dtype) * y_BSD)
            cand_BT = member_BT
        aux["mor_router_bce"] = (bce, cfg.router_aux_weight)
        aux["mor_router_agreement"] = (jnp.stack(agree).astype(jnp.float32), None)  # per step
        return x_BTD, aux

    def _recurse_threshold(self, x_BTD, pos_BT, caches=None, valid_BT=None, admitted_RB=None):
        """Causal routing; with ``caches`` (one per step) each step stores only its tokens.
        Returns ``(x, aux)``, or with caches ``(x, caches, admitted_RB)``."""
        cfg = self.config
        B, T, _ = x_BTD.shape
        active_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT
        aux, new_caches, admitted, kv = {}, [], [], None
        for r, cap in enumerate(cfg.capacity_schedule):
            logit_BT, gate_BT = self._router(x_BTD, r)
            want_BT = active_BT & ((logit_BT > 0) | (cap >= 1.0))
            count_B = jnp.zeros((B,), jnp.int32) if admitted_RB is None else admitted_RB[r]
            active_BT = _admit(want_BT, pos_BT, count_B, cap)
            admitted.append(count_B + jnp.sum(active_BT, axis=1, dtype=jnp.int32))
            if cfg.kv_sharing:
                if r == 0 and caches is not None:
                    kv = caches[0]
                y_BTD, kv = self._shared_kv_step(x_BTD, pos_BT, kv, active_BT, first=r == 0)
                if r == 0 and caches is not None:
                    new_caches.append(kv)
            else:
                y_BTD, c, a = self._shared_step(x_BTD, pos_BT, active_BT, None if caches is None else caches[r])
                aux = merge_aux(aux, a)
                if caches is not None:
                    new_caches.append(c)
            x_BTD = jnp.where(active_BT[..., None], x_BTD + gate_BT[..., None].astype(x_BTD.dtype) * y_BTD, x_BTD)
        if caches is None:
            return x_BTD, aux
        return x_BTD, tuple(new_caches), jnp.stack(admitted)

    def _shared_step(self, x_BTD, pos_BT, active_BT, cache):
        """One pass of the shared block over the tokens active at this step: ``(y, cache,
        aux)``. Teacher forcing (``cache`` None) keeps attention among the active tokens
        (segment 1 vs 0); a cached call stores only the active tokens."""
        if cache is None:
            y_BTD, _, aux = self.shared(x_BTD, positions_BT=pos_BT, segment_ids_BT=active_BT.astype(jnp.int32))
            return y_BTD, None, aux
        y_BTD, cache, _ = self.shared(x_BTD, positions_BT=pos_BT, caches=cache, valid_BT=active_BT)
        return y_BTD, cache, {}

    def _shared_kv_step(self, x_BTD, pos_BT, kv, valid_BT, first: bool):
        """Recursive KV sharing. The first step stores the keys/values of the ``valid_BT`` tokens
        in ``kv`` (a fresh cache of T slots when None, or the decoding cache); later steps'
        queries read that cache only: nothing is written and their own keys/values are not used
        (``valid_BT`` all false), so every step attends to the first step's KV."""
        if first:
            kv = self.shared.init_cache(x_BTD.shape[0], x_BTD.shape[1]) if kv is None else kv
            y_BTD, kv, _ = self.shared(x_BTD, positions_BT=pos_BT, caches=kv, valid_BT=valid_BT)
            return y_BTD, kv
        y_BTD, _, _ = self.shared(x_BTD, positions_BT=pos_BT, caches=kv, valid_BT=jnp.zeros_like(valid_BT))
        return y_BTD, kv

    def _recurse_depths(self, x_BTD, pos_BT, caches=None, valid_BT=None):
        """Token choice: one router on the recursion's input picks each token's depth
        ``d = 1 + argmax softmax`` (causal: its own state alone). Step r runs the tokens with
        ``d >= r`` (attention among them; with caches, only they are stored); a token leaves at
        its depth as ``h0 + p_d * out`` (``h0`` the recursion's input, ``out`` the stack output,
        residual included), the others continue with ``out``. Switch balance loss over depths
        (``R sum_d f_d P_d``, 1 when balanced) and router z-loss."""
        cfg = self.config
        B, T, _ = x_BTD.shape
        R = cfg.num_recursions
        logits_BTR = jnp.einsum("btd,dr->btr", x_BTD.astype(jnp.float32), self.router_DR[...])
        probs_BTR = jax.nn.softmax(logits_BTR, axis=-1)
        depth_BT = jnp.argmax(logits_BTR, axis=-1)  # 0-based: the token runs steps 0..depth
        gate_BT = jnp.take_along_axis(probs_BTR, depth_BT[..., None], axis=-1)[..., 0]
        h0_BTD, out_BTD = x_BTD, x_BTD
        valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT
        aux, new_caches = {}, []
        for r in range(R):
            active_BT = (depth_BT >= r) & valid_BT
            y_BTD, c, a = self._shared_step(x_BTD, pos_BT, active_BT, None if caches is None else caches[r])
            aux = merge_aux(aux, a)
            if caches is not None:
                new_caches.append(c)
            ends_BT = (depth_BT == r)[..., None]
            out_BTD = jnp.where(ends_BT, h0_BTD + gate_BT[..., None].astype(x_BTD.dtype) * y_BTD, out_BTD)
            x_BTD = jnp.where(active_BT[..., None], y_BTD, x_BTD)
        if caches is not None:
            return out_BTD, tuple(new_caches)
        f_R = jnp.mean(jax.nn.one_hot(depth_BT, R), axis=(0, 1))
        aux["mor_depth_balance"] = (R * jnp.sum(f_R * jnp.mean(probs_BTR, axis=(0, 1))), cfg.depth_balance_weight)
        aux["mor_depth_z"] = (jnp.mean(jnp.square(jax.nn.logsumexp(logits_BTR, axis=-1))), cfg.depth_z_weight)
        aux["mor_depth_fraction"] = (f_R, None)  # per depth
        return out_BTD, aux

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3x forward), routing-aware: step r runs the shared layers
        on ``cap_r`` of the tokens (attention over ``cap_r T`` keys), plus the unique layers,
        the routers and the head."""
        cfg = self.config
        f = sum(s.flops_per_row(seq_len) for s in (self.first, self.last) if s is not None)
        for cap in cfg.capacity_schedule:
            k = max(1, math.floor(cap * seq_len + 1e-6))
            f += (k / seq_len) * self.shared.flops_per_row(k)
        if cfg.recursion_router == "expert_choice":
            f += 2.0 * self.router_RD.size
        elif cfg.recursion_router == "token_choice":  # every step over every token (masked), + router
            f += 2.0 * self.router_DR.size
        return 3 * (f + self._head_flops())

    # -- cached decoding (threshold routing: causal) --------------------------------------------
    def _empty_cache(self, batch_size: int, max_len: int) -> MoRCache:
        """Unique layers: one slot per token; step r: ``ceil(cap_r length)`` slots in each of the
        b shared layers (with KV sharing only the first step has a cache); the lengths and
        per-step admitted counts."""
        unique = lambda s: () if s is None else s.init_cache(batch_size, max_len)
        mixer = self.shared.units.layers[0].mixer
        caps = self.config.capacity_schedule[:1] if self.config.kv_sharing else self.config.capacity_schedule
        steps = tuple((stack_cache(mixer.init_cache(batch_size, _slots(cap, max_len), CompactKVCache),
                                   self.config.base_depth),)
                      for cap in caps)
        R = self.config.num_recursions
        return MoRCache(unique(self.first), steps, unique(self.last), jnp.zeros((R, batch_size), jnp.int32),
                        jnp.zeros((batch_size,), jnp.int32))

    def _extend(self, tokens_BT, lengths_B, cache: MoRCache):
        cfg = self.config
        pos_BT, valid_BT = self._chunk(tokens_BT, lengths_B, cache)
        x_BTD, first, last, admitted = self.embed(tokens_BT), cache.first, cache.last, cache.admitted_RB
        if self.first is not None:
            x_BTD, first, _ = self.first(x_BTD, positions_BT=pos_BT, caches=cache.first, valid_BT=valid_BT)
        if cfg.recursion_router == "token_choice":
            x_BTD, steps = self._recurse_depths(x_BTD, pos_BT, cache.steps, valid_BT)
        elif cfg.recursion_router == "none":
            steps = []
            for r in range(cfg.num_recursions):
                x_BTD, c, _ = self.shared(x_BTD, positions_BT=pos_BT, caches=cache.steps[r], valid_BT=valid_BT)
                steps.append(c)
            steps = tuple(steps)
        else:
            x_BTD, steps, admitted = self._recurse_threshold(x_BTD, pos_BT, cache.steps, valid_BT, admitted)
        if self.last is not None:
            x_BTD, last, _ = self.last(x_BTD, positions_BT=pos_BT, caches=cache.last, valid_BT=valid_BT)
        return self._last_logits(x_BTD, lengths_B), MoRCache(first, steps, last, admitted, cache.length_B + lengths_B)


__all__ = ["MoR", "MoRCache", "MoRConfig"]
