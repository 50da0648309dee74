"""FIT (Far-reaching Interleaved Transformers) as a language model and as an encoder.

The sequence is cut into groups of ``n`` tokens; each group owns ``m`` latent tokens. A
layer spec ``"(a1)b1(a2)b2...(aK)"`` interleaves, per unit ``i``:

    tokens  x_OND [(B G), n, D] --LocalStack_i (causal inside the group)-->
    latents z_OMC [(B G), m, C] <- z + CrossAttn(q=z, kv=x)        "l2x": group g reads group g
    latents z     [B, G*m, C]   --GlobalStack_i (chunk-causal over groups)-->
    tokens  x_OND               <- x + CrossAttn(q=x, kv=shift(z)) "x2l": group g reads group g-1

``shift`` hands group ``g`` the latents of group ``g - 1`` (group 0 gets zeros). l2x lets a
group's latents read *all* of the group's tokens, so without the shift a token would see its
own group's future; with it, token ``(g, j)`` depends on ``(g, <= j)`` through the local path
and on earlier groups only through group ``g-1``'s latents. The latent stream itself is not
shifted (it is a residual stream initialised once per group from learned slot embeddings
``latents_MC``). There is no x2l after the last global stack, so the LM spec ends with a
local-only unit. ``causal=False`` is the bidirectional encoder: full attention inside groups
and over all latents, and no shift.

Letters follow the package legend: D token width (``d_model``), C latent width
(``d_latent``), G groups, N tokens per group (n), M latents per group (m), O = B*G group
rows, U spec units.

Positions: RoPE inside a group for tokens (0..n-1) and over the flat latent index for
latents, so the number of groups is not baked into parameters. Which group a token is in
reaches it only through the latents (as with FIT's per-group position table).

Cached decoding (``init_cache`` / ``prefill`` / ``decode``, see ``FITCache``): a token step
runs the local stacks on one token with the group's KV and the previous group's x2l keys
and values; when a group fills, its latents go through l2x and the global stacks unit by
unit (appending ``m`` entries to each global layer's KV) and the next group's x2l keys and
values are computed. Packed documents cannot be kept apart (latents summarise whole
groups), so the model rejects ``segment_ids_BT`` / ``positions_BT`` and the trainer feeds
it plain windows (see ``glocal.models.base``).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.configs.base import ConfigError
from glocal.kernels.masks import Causal, ChunkCausal, Full
from glocal.layers import DecoderStack
from glocal.layers.cache import clear_rows
from glocal.layers.decoder import merge_aux
from glocal.layers.cross import CrossAttention
from glocal.layers.params import param
from glocal.models.base import DecoderConfig, ModelBase, ModelCache


def parse_layer_spec(spec: str) -> list[tuple[int, int]]:
    """``"(2)2(2)"`` -> ``[(2, 2), (2, 0)]``: (local layers, global layers) per unit."""
    if not re.fullmatch(r"(\(\d+\)\d*)+", spec or ""):
        raise ConfigError(f"layer_spec={spec!r} is not of the form '(a1)b1(a2)b2...(aK)bK', e.g. "
                          f"'(2)2(2)': a = local layers on token groups, b = global layers on latents.")
    units = [(int(a), int(b or 0)) for a, b in re.findall(r"\((\d+)\)(\d*)", spec)]
    if any(a < 1 for a, _ in units):
        raise ConfigError(f"layer_spec={spec!r}: every unit needs at least one local layer.")
    if any(b == 0 for _, b in units[:-1]):
        raise ConfigError(f"layer_spec={spec!r}: only the last unit may have no global layers "
                          f"(two local stacks in a row are one stack: merge them).")
    return units


@dataclasses.dataclass(frozen=True)
class FITConfig(DecoderConfig):
    d_model: int = 64  # token width D
    num_heads: int = 4  # token (local) heads
    num_kv_heads: int | None = None
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 192
    d_latent: int | None = None  # latent width C (None = d_model)
    latent_heads: int | None = None  # global heads (None = num_heads)
    latent_kv_heads: int | None = None  # None = latent_heads
    latent_head_dim: int | None = None  # None = d_latent // latent_heads
    d_ff_latent: int | None = None  # global MLP width (None = d_ff scaled by C / D)
    group_size: int = 16  # n tokens per group
    num_latents: int = 4  # m latents per group
    layer_spec: str = "(1)1(1)"
    causal: bool = True  # False: bidirectional encoder (no shift, full masks)

    def validate(self) -> None:
        super().validate()
        self.require_positive("d_model", "d_ff", "group_size", "num_latents")
        units = parse_layer_spec(self.layer_spec)
        if self.causal and units[-1][1]:
            raise ConfigError(f"layer_spec={self.layer_spec!r} ends with global layers, whose output "
                              f"would never reach the tokens in the language model; end with a "
                              f"local unit, e.g. '{self.layer_spec}(1)'.")
        self.require_multiple("max_seq_len", "group_size")
        self.require_heads("d_model", "num_heads", "num_kv_heads", "head_dim")
        if self.d_latent is not None:
            self.require_positive("d_latent")
        if self.latent_heads is not None:
            self.require_heads("d_latent", "latent_heads", "latent_kv_heads", "latent_head_dim",
                               width_value=self.latent_width)
        else:
            self.require_heads("d_latent", "num_heads", "latent_kv_heads", "latent_head_dim",
                               width_value=self.latent_width)
        width = min(self.d_model, self.latent_width)
        if width % self.cross_heads:
            raise ConfigError(f"cross-attention width min(d_model, d_latent) = {width} is not "
                              f"divisible by min(num_heads, latent_heads) = {self.cross_heads}.")

    # -- derived ---------------------------------------------------------------------------
    @property
    def latent_width(self) -> int:
        return self.d_model if self.d_latent is None else self.d_latent

    @property
    def global_heads(self) -> int:
        return self.num_heads if self.latent_heads is None else self.latent_heads

    @property
    def cross_heads(self) -> int:
        return min(self.num_heads, self.global_heads)

    @property
    def units(self) -> list[tuple[int, int]]:
        return parse_layer_spec(self.layer_spec)

    def local_stack(self, n_layers: int, rngs: nnx.Rngs) -> DecoderStack:
        """Decoder layers on one group of tokens (causal inside it; full for the encoder)."""
        spec = self.layer(d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, d_ff=self.d_ff)
        kind = self.kind("global", mask=Causal() if self.causal else Full())
        return DecoderStack(spec, [kind], n_layers, scan=self.scan_layers, remat=self.remat, rngs=rngs)

    def global_stack(self, n_layers: int, rngs: nnx.Rngs) -> DecoderStack:
        """Decoder layers on every group's latents (chunk-causal over groups)."""
        C = self.latent_width
        d_ff = self.d_ff_latent if self.d_ff_latent is not None else self.d_ff * C // self.d_model
        spec = self.layer(d_model=C, num_heads=self.global_heads, num_kv_heads=self.latent_kv_heads,
                          head_dim=self.latent_head_dim, d_ff=d_ff)
        kind = self.kind("global", mask=ChunkCausal(self.num_latents) if self.causal else Full())
        return DecoderStack(spec, [kind], n_layers, scan=self.scan_layers, remat=self.remat, rngs=rngs)


class FITUnit(nnx.Module):
    """One ``(a)b`` of the layer spec: local stack, then (if b > 0) l2x, global stack, x2l."""

    def __init__(self, cfg: FITConfig, n_local: int, n_global: int, last: bool, *, rngs: nnx.Rngs):
        D, C = cfg.d_model, cfg.latent_width
        self.local = cfg.local_stack(n_local, rngs)
        cross = lambda dq, dkv: CrossAttention(dq, dkv, cfg.cross_heads, norm=cfg.norm, norm_eps=cfg.norm_eps,
                                               impl=cfg.attention_impl, dtype=cfg.dtype,
                                               param_dtype=cfg.param_dtype, rngs=rngs)
        self.l2x = cross(C, D) if n_global else None
        self.global_ = cfg.global_stack(n_global, rngs) if n_global else None
        self.x2l = cross(D, C) if n_global and not last else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FITCache(ModelCache):
    """Decoding state per sequence (tuples are per unit; None where a unit has no such part).

    local_U   the local stack's caches: KV of the current group's tokens [a_i, B, K, N, E]
    tokens_U  [B, N, D]: the current group's token states entering l2x (units with globals)
    x2l_U     (k, v) [B, M, Hc, Ec]: the previous group's latents, projected for x2l
    global_U  the global stack's caches: KV of every finished group's latents [b_i, B, K, G*M, E]
    length_B  tokens consumed per sequence
    """

    local_U: tuple
    tokens_U: tuple
    x2l_U: tuple
    global_U: tuple
    length_B: jax.Array


class FIT(ModelBase):
    packing_note = "a group's latents summarise every token of the group, across document boundaries"

    def __init__(self, cfg: FITConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = self._make_embed(cfg.d_model, rngs)
        std = cfg.init_std
        self.latents_MC = param(rngs, lambda k, s, d: std * jax.random.normal(k, s, d),
                                (cfg.num_latents, cfg.latent_width), (None, "embed"), cfg.param_dtype)
        units = cfg.units
        self.units = nnx.List([FITUnit(cfg, a, b, i == len(units) - 1, rngs=rngs)
                               for i, (a, b) in enumerate(units)])
        self._init_output(cfg.d_model, rngs)

    def _length_hint(self) -> str:
        return f" (a multiple of group_size={self.config.group_size})"

    # -- pieces ------------------------------------------------------------------------------
    def _start_latents(self, *lead):
        return jnp.broadcast_to(self.latents_MC[...].astype(self.config.dtype), (*lead, *self.latents_MC.shape))

    def _shift(self, z_BGMC):
        """Group g reads group g-1's latents; group 0 reads zeros (causal form only)."""
        if not self.config.causal:
            return z_BGMC
        return jnp.concatenate([jnp.zeros_like(z_BGMC[:, :1]), z_BGMC[:, :-1]], axis=1)

    # -- the whole sequence -----------------------------------------------------------------
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None):
        """Logits ``[B, T, V]`` for every position, any ``T <= max_seq_len``."""
        self._check_inputs(tokens_BT, positions_BT, segment_ids_BT)
        x_BTD, _, _, aux = self._encode(tokens_BT)
        return self._output(self._logits(x_BTD), aux)

    def encode(self, tokens_BT):
        """Token states ``[B, T, D]`` (before the final norm) and the latents after each
        global stack (``[B, G, M, C]`` per unit with globals)."""
        self._check_inputs(tokens_BT)
        x_BTD, latents_U, _, _ = self._encode(tokens_BT)
        return x_BTD, latents_U

    def _encode(self, tokens_BT, *, global_caches=None, groups_done_B=None, shift: bool = True):
        """``encode`` (plus the global caches and the stacks' auxiliary losses) that can also
        store the latents of each row's first ``groups_done_B`` groups in ``global_caches``
        (prefill). ``shift=False`` drops the latent shift (only
        for the test that shows the shift is what makes the model causal)."""
        cfg = self.config
        B, T = tokens_BT.shape
        N, M, D = cfg.group_size, cfg.num_latents, cfg.d_model
        G = -(-T // N)
        # Padding at the end is exact: nothing before a position depends on what follows it.
        tokens_BT = jnp.pad(tokens_BT, ((0, 0), (0, G * N - T)))
        x_OND = self.embed(tokens_BT).reshape(B * G, N, D)  # O = B*G group rows
        pos_ON = self._positions(B * G, N)
        z_BGMC = self._start_latents(B, G)
        lat_pos = self._positions(B, G * M)  # [B, G*M]: latents in group-major order
        lat_valid = None if groups_done_B is None else lat_pos < (groups_done_B * M)[:, None]
        latents_U, caches_U, auxes = [], [], []
        for i, unit in enumerate(self.units):
            x_OND, _, aux = unit.local(x_OND, positions_BT=pos_ON)
            auxes.append(aux)
            if unit.global_ is None:
                continue
            C = z_BGMC.shape[-1]
            z_OMC = unit.l2x(z_BGMC.reshape(B * G, M, C), x_OND)
            caches = None if global_caches is None else global_caches[i]
            z_flat, caches, aux = unit.global_(z_OMC.reshape(B, G * M, C), positions_BT=lat_pos, caches=caches,
                                               valid_BT=lat_valid)
            auxes.append(aux)
            caches_U.append(caches)
            z_BGMC = z_flat.reshape(B, G, M, C)
            latents_U.append(z_BGMC)
            if unit.x2l is not None:
                src_BGMC = self._shift(z_BGMC) if shift else z_BGMC
                x_OND = unit.x2l(x_OND, src_BGMC.reshape(B * G, M, C))
        x_BTD = x_OND.reshape(B, G * N, D)[:, :T]
        return x_BTD, latents_U, caches_U, merge_aux({}, *auxes) if auxes else {}

    # -- cost model ---------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3x the forward's matmul FLOPs).

        Each parameter counts 2 FLOPs per row it multiplies: local layers and the head run on
        every token, global layers on m/n latents per token, cross-attention projects queries
        and keys on their own side. Attention scores: a token sees (n+1)/2 keys on average in
        its group plus m latents; a latent sees n tokens in l2x and ~(G+1)/2 groups of m.
        """
        cfg = self.config
        N, M = cfg.group_size, cfg.num_latents
        G = max(1, -(-seq_len // N))
        per_latent = M / N
        fwd = self._head_flops()
        for unit in self.units:
            fwd += unit.local.flops_per_row(N)
            if unit.global_ is None:
                continue
            fwd += unit.global_.flops_per_row(G * M) * per_latent
            for cross, q_rate, kv_rate, keys in ((unit.l2x, per_latent, 1.0, N), (unit.x2l, 1.0, per_latent, M)):
                if cross is not None:
                    fwd += cross.flops(q_rate, kv_rate, keys)
        return 3 * fwd

    # -- cached decoding ----------------------------------------------------------------------
    def _empty_cache(self, batch_size: int, max_len: int) -> FITCache:
        """Each local stack's KV of one group, each global stack's KV of ``m`` latents per
        group, the group's token states and the x2l keys/values per unit."""
        cfg = self.config
        N, M = cfg.group_size, cfg.num_latents
        if not cfg.causal:
            raise ValueError("the encoder form (causal=False) sees future tokens; it cannot decode.")
        groups = -(-max_len // N)
        B, dt = batch_size, cfg.dtype
        local, tokens, x2l, glob = [], [], [], []
        for unit in self.units:
            local.append(unit.local.init_cache(B, N))
            has_global = unit.global_ is not None
            tokens.append(jnp.zeros((B, N, cfg.d_model), dt) if has_global else None)
            glob.append(unit.global_.init_cache(B, groups * M) if has_global else None)
            # Group 0 reads zero latents.
            x2l.append(None if unit.x2l is None else self._x2l_kv(unit, jnp.zeros((B, M, cfg.latent_width), dt)))
        return FITCache(tuple(local), tuple(tokens), tuple(x2l), tuple(glob), jnp.zeros((B,), jnp.int32))

    def _x2l_kv(self, unit: FITUnit, z_BMC):
        k, v = unit.x2l.kv(z_BMC)
        return k.astype(self.config.dtype), v.astype(self.config.dtype)

    def prefill(self, tokens_BT, lengths_B, cache: FITCache):
        """Consume right-padded prompts into a fresh cache; next-token logits ``[B, V]``.

        One parallel pass over the prompts gives the logits and stores every finished
        group's latents in the global KV; a second pass over each row's unfinished group
        fills the local KV and the token states that l2x will read when the group closes."""
        cfg = self.config
        N = cfg.group_size
        B, T = tokens_BT.shape
        self._check_inputs(tokens_BT)
        self._check_fresh(cache)
        done_B = lengths_B // N  # finished groups per row
        x_BTD, latents_U, glob, _ = self._encode(tokens_BT, global_caches=cache.global_U, groups_done_B=done_B)
        last_B = jnp.maximum(lengths_B - 1, 0)
        logits_BV = self._logits(jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1))[:, 0]

        # The unfinished group: its tokens (ids past the prompt are masked out below).
        padded = jnp.pad(tokens_BT, ((0, 0), (0, N)))
        idx_BN = done_B[:, None] * N + jnp.arange(N)[None]
        tok_BN = jnp.take_along_axis(padded, jnp.minimum(idx_BN, T + N - 1), axis=1)
        pos_BN = self._positions(B, N)
        valid_BN = pos_BN < (lengths_B % N)[:, None]
        x_BND = self.embed(tok_BN)
        local, tokens, x2l, g = [], [], [], 0
        for i, unit in enumerate(self.units):
            x_BND, c, _ = unit.local(x_BND, positions_BT=pos_BN, caches=cache.local_U[i], valid_BT=valid_BN)
            local.append(c)
            tokens.append(None if unit.global_ is None else x_BND)
            if unit.x2l is None:
                x2l.append(None)
                continue
            # Previous group's latents after this unit's global stack (zeros before group 1).
            z_BGMC = self._shift(latents_U[g])
            z_BMC = jnp.take_along_axis(z_BGMC, jnp.minimum(done_B, z_BGMC.shape[1] - 1)[:, None, None, None],
                                        axis=1)[:, 0]
            z_BMC = jnp.where((done_B < z_BGMC.shape[1])[:, None, None], z_BMC, latents_U[g][:, -1])
            kv = self._x2l_kv(unit, z_BMC)
            x2l.append(kv)
            x_BND = unit.x2l.with_kv(x_BND, *kv)
            g += 1
        it = iter(glob)  # _encode returns one cache per unit with globals
        glob_U = tuple(None if unit.global_ is None else next(it) for unit in self.units)
        return logits_BV, FITCache(tuple(local), tuple(tokens), tuple(x2l), glob_U, cache.length_B + lengths_B)

    def decode(self, tokens_B, cache: FITCache):
        """One token per sequence -> next-token logits ``[B, V]`` and the updated cache."""
        self._check_inputs(tokens_B[:, None])
        cfg = self.config
        N = cfg.group_size
        B = tokens_B.shape[0]
        j_B = cache.length_B % N  # slot of this token inside its group
        x_B1D = self.embed(tokens_B[:, None])
        local, tokens = [], []
        for i, unit in enumerate(self.units):
            x_B1D, c, _ = unit.local(x_B1D, positions_BT=j_B[:, None], caches=cache.local_U[i])
            local.append(c)
            if unit.global_ is not None:
                tokens.append(cache.tokens_U[i].at[jnp.arange(B), j_B].set(x_B1D[:, 0].astype(cfg.dtype)))
            else:
                tokens.append(None)
            if unit.x2l is not None:
                x_B1D = unit.x2l.with_kv(x_B1D, *cache.x2l_U[i])
        logits_BV = self._logits(x_B1D)[:, 0]
        cache = dataclasses.replace(cache, local_U=tuple(local), tokens_U=tuple(tokens),
                                    length_B=cache.length_B + 1)
        closing_B = cache.length_B % N == 0
        cache = jax.lax.cond(jnp.any(closing_B), lambda c: self._close_group(c, closing_B), lambda c: c, cache)
        return logits_BV, cache

    def _close_group(self, cache: FITCache, closing_B):
        """Rows whose group just filled: run l2x and the global stacks for the group's
        latents unit by unit (appending to the global KV), then project the new latents
        for the next group's x2l. Other rows keep their state."""
        cfg = self.config
        N, M = cfg.group_size, cfg.num_latents
        B = closing_B.shape[0]
        g_B = cache.length_B // N - 1
        pos_BM = g_B[:, None] * M + jnp.arange(M, dtype=jnp.int32)[None]
        valid_BM = jnp.broadcast_to(closing_B[:, None], (B, M))
        z_BMC = self._start_latents(B)
        glob, x2l = list(cache.global_U), list(cache.x2l_U)
        # The local KV of the filled group is stale for the next group: clear it.
        local = clear_rows(cache.local_U, closing_B)
        for i, unit in enumerate(self.units):
            if unit.global_ is None:
                continue
            z_BMC = unit.l2x(z_BMC, cache.tokens_U[i])
            z_BMC, glob[i], _ = unit.global_(z_BMC, positions_BT=pos_BM, caches=cache.global_U[i], valid_BT=valid_BM)
            if unit.x2l is not None:
                k, v = self._x2l_kv(unit, z_BMC)
                keep = closing_B[:, None, None, None]
                x2l[i] = (jnp.where(keep, k, x2l[i][0]), jnp.where(keep, v, x2l[i][1]))
        return dataclasses.replace(cache, local_U=local, global_U=tuple(glob), x2l_U=tuple(x2l))
