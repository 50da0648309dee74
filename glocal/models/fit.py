"""FIT (Far-reaching Interleaved Transformers) as a language model and as an encoder.

The sequence is cut into groups of ``n`` tokens; each group owns ``m`` latent tokens. A
layer spec ``"(a1)b1(a2)b2...(aK)"`` interleaves, per unit ``i``:

    tokens  x [(B G), n, C] --LocalStack_i (causal inside the group)-->
    latents z [(B G), m, D] <- z + CrossAttn(q=z, kv=x)            "l2x": group g reads group g
    latents z [B, G*m, D]   --GlobalStack_i (chunk-causal over groups)-->
    tokens  x               <- x + CrossAttn(q=x, kv=shift(z))     "x2l": group g reads group g-1

``shift`` hands group ``g`` the latents of group ``g - 1`` (group 0 gets zeros). l2x lets a
group's latents read *all* of the group's tokens, so without the shift a token would see its
own group's future; with it, token ``(g, j)`` depends on ``(g, <= j)`` through the local path
and on earlier groups only through group ``g-1``'s latents. The latent stream itself is not
shifted (it is a residual stream initialised once per group from learned slot embeddings
``latents_MD``). There is no x2l after the last global stack, so the LM spec ends with a
local-only unit. ``causal=False`` is the bidirectional encoder: full attention inside groups
and over all latents, and no shift.

Letters (beyond the package legend): C token width, D latent width, G groups, N tokens per
group (n), M latents per group (m), R = B*G group rows, U spec units.

Positions: RoPE inside a group for tokens (0..n-1) and over the flat latent index for
latents, so the number of groups is not baked into parameters. Which group a token is in
reaches it only through the latents (as with FIT's per-group position table).

Cached decoding (``init_cache`` / ``prefill`` / ``decode``, see ``FITCache``): a token step
runs the local stacks on one token with the group's KV and the previous group's x2l keys
and values; when a group fills, its latents go through l2x and the global stacks unit by
unit (appending ``m`` entries to each global layer's KV) and the next group's x2l keys and
values are computed. Packed-document ``segment_ids`` are not used: the global path sees
across document boundaries (the trainer's loss mask still skips cross-document targets).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.configs.base import ConfigError, ModelConfig
from glocal.kernels.masks import Causal, ChunkCausal, Full
from glocal.layers import Embed, KVCache, Unembed, make_norm
from glocal.layers.cache import clear_rows, stack_cache, tree_nbytes
from glocal.layers.cross import CrossAttention
from glocal.layers.params import param
from glocal.models.stack import run_decoder_layers, stack_modules
from glocal.models.transformer import Block, TransformerConfig, check_empty_cache, check_layer_choices, check_tokens


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
class FITConfig(ModelConfig):
    vocab_size: int = 384
    d_model: int = 64  # token width C
    d_latent: int | None = None  # latent width D (None = d_model)
    num_heads: int = 4  # token (local) heads
    num_kv_heads: int | None = None
    latent_heads: int | None = None  # global heads (None = num_heads)
    d_ff: int = 192
    d_ff_latent: int | None = None  # global MLP width (None = d_ff scaled by D / C)
    group_size: int = 16  # n tokens per group
    num_latents: int = 4  # m latents per group
    layer_spec: str = "(1)1(1)"
    max_seq_len: int = 256
    causal: bool = True  # False: bidirectional encoder (no shift, full masks)
    mlp: str = "swiglu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope_theta: float | None = 10_000.0  # None: no positions (symmetric encoder)
    tie_embeddings: bool = False
    attention_impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02

    def validate(self) -> None:
        self.require_positive("vocab_size", "d_model", "num_heads", "d_ff", "group_size", "num_latents",
                              "max_seq_len")
        units = parse_layer_spec(self.layer_spec)
        if self.causal and units[-1][1]:
            raise ConfigError(f"layer_spec={self.layer_spec!r} ends with global layers, whose output "
                              f"would never reach the tokens in the language model; end with a "
                              f"local unit, e.g. '{self.layer_spec}(1)'.")
        self.require_multiple("max_seq_len", "group_size")
        check_layer_choices(self)
        self.local_config, self.global_config  # width/head checks with clear messages
        width = min(self.d_model, self.latent_width)
        if width % self.cross_heads:
            raise ConfigError(f"cross-attention width min(d_model, d_latent) = {width} is not "
                              f"divisible by min(num_heads, latent_heads) = {self.cross_heads}.")

    # -- derived ---------------------------------------------------------------------------
    @property
    def latent_width(self) -> int:
        return self.d_model if self.d_latent is None else self.d_latent

    @property
    def cross_heads(self) -> int:
        return min(self.num_heads, self.num_heads if self.latent_heads is None else self.latent_heads)

    @property
    def units(self) -> list[tuple[int, int]]:
        return parse_layer_spec(self.layer_spec)

    @property
    def max_groups(self) -> int:
        return self.max_seq_len // self.group_size

    def _sub(self, **kw) -> TransformerConfig:
        common = dict(vocab_size=self.vocab_size, mlp=self.mlp, norm=self.norm, norm_eps=self.norm_eps,
                      rope_theta=self.rope_theta, attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        return TransformerConfig(**common, **kw)

    @property
    def local_config(self) -> TransformerConfig:
        """Shape of one local layer (a baseline decoder layer over a group)."""
        return self._sub(d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                         d_ff=self.d_ff, max_seq_len=self.group_size)

    @property
    def global_config(self) -> TransformerConfig:
        D = self.latent_width
        d_ff = self.d_ff_latent if self.d_ff_latent is not None else self.d_ff * D // self.d_model
        heads = self.num_heads if self.latent_heads is None else self.latent_heads
        return self._sub(d_model=D, num_heads=heads, num_kv_heads=None, d_ff=d_ff,
                         max_seq_len=self.max_groups * self.num_latents)


class FITUnit(nnx.Module):
    """One ``(a)b`` of the layer spec: local stack, then (if b > 0) l2x, global stack, x2l."""

    def __init__(self, cfg: FITConfig, n_local: int, n_global: int, last: bool, *, rngs: nnx.Rngs):
        lc, gc = cfg.local_config, cfg.global_config
        local_mask = Causal() if cfg.causal else Full()
        global_mask = ChunkCausal(cfg.num_latents) if cfg.causal else Full()
        self.local = stack_modules(lambda r: Block(lc, local_mask, rngs=r), n_local, rngs)
        cross = lambda dq, dkv: CrossAttention(dq, dkv, cfg.cross_heads, norm=cfg.norm, norm_eps=cfg.norm_eps,
                                               impl=cfg.attention_impl, dtype=cfg.dtype,
                                               param_dtype=cfg.param_dtype, rngs=rngs)
        self.l2x = cross(gc.d_model, lc.d_model) if n_global else None
        self.global_ = stack_modules(lambda r: Block(gc, global_mask, rngs=r), n_global, rngs) if n_global else None
        self.x2l = cross(lc.d_model, gc.d_model) if n_global and not last else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FITCache:
    """Decoding state per sequence (lists are per unit; None where a unit has no such part).

    local_U   KVCache [a_i, B, K, n, E]: the current group's tokens in each local layer
    tokens_U  [B, n, C]: the current group's token states entering l2x (units with globals)
    x2l_U     (k, v) [B, m, Hc, Ec]: the previous group's latents, projected for x2l
    global_U  KVCache [b_i, B, Hg, G*m, Eg]: every finished group's latents
    length_B  tokens consumed per sequence
    """

    local_U: tuple
    tokens_U: tuple
    x2l_U: tuple
    global_U: tuple
    length_B: jax.Array

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)


class FIT(nnx.Module):
    config_class = FITConfig

    def __init__(self, cfg: FITConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        C, D = cfg.d_model, cfg.latent_width
        self.embed = Embed(cfg.vocab_size, C, init_std=cfg.init_std, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, rngs=rngs)
        std = cfg.init_std
        self.latents_MD = param(rngs, lambda k, s, d: std * jax.random.normal(k, s, d), (cfg.num_latents, D),
                                (None, "embed"), cfg.param_dtype)
        units = cfg.units
        self.units = nnx.List([FITUnit(cfg, a, b, i == len(units) - 1, rngs=rngs)
                               for i, (a, b) in enumerate(units)])
        self.final_norm = make_norm(cfg.norm, C, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else Unembed(
            C, cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    # -- pieces ------------------------------------------------------------------------------
    def _stack(self, stacked, x, positions, caches=None, valid=None):
        cfg = self.config
        return run_decoder_layers(stacked, x, positions, caches, valid, scan=cfg.scan_layers, remat=cfg.remat)

    def _start_latents(self, *lead):
        return jnp.broadcast_to(self.latents_MD[...].astype(self.config.dtype), (*lead, *self.latents_MD.shape))

    def _logits(self, x_BTC):
        x_BTC = self.final_norm(x_BTC)
        return self.embed.attend(x_BTC) if self.head is None else self.head(x_BTC)

    def _shift(self, z_BGMD):
        """Group g reads group g-1's latents; group 0 reads zeros (causal form only)."""
        if not self.config.causal:
            return z_BGMD
        return jnp.concatenate([jnp.zeros_like(z_BGMD[:, :1]), z_BGMD[:, :-1]], axis=1)

    # -- the whole sequence -----------------------------------------------------------------
    def encode(self, tokens_BT, *, global_caches=None, groups_done_B=None, shift: bool = True):
        """Token states ``[B, T, C]`` (before the final norm) and the latents after each
        global stack (``[B, G, m, D]`` per unit with globals). With ``global_caches`` the
        global layers also store the latents of each row's first ``groups_done_B`` groups
        (prefill). ``shift=False`` drops the latent shift (only to show it is needed)."""
        cfg = self.config
        check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}; raise "
                             f"max_seq_len (a multiple of group_size={cfg.group_size}) or feed shorter windows.")
        n, M = cfg.group_size, cfg.num_latents
        G = -(-T // n)
        # Padding at the end is exact: nothing before a position depends on what follows it.
        tokens_BT = jnp.pad(tokens_BT, ((0, 0), (0, G * n - T)))
        x_RNC = self.embed(tokens_BT).reshape(B * G, n, cfg.d_model)  # R = B*G group rows
        pos_RN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B * G, n))
        z_BGMD = self._start_latents(B, G)
        pos_BL = jnp.broadcast_to(jnp.arange(G * M, dtype=jnp.int32), (B, G * M))
        valid_BL = None if groups_done_B is None else pos_BL < (groups_done_B * M)[:, None]
        latents_U, caches_U = [], []
        for i, unit in enumerate(self.units):
            x_RNC, _ = self._stack(unit.local, x_RNC, pos_RN)
            if unit.global_ is None:
                continue
            D = z_BGMD.shape[-1]
            z_RMD = unit.l2x(z_BGMD.reshape(B * G, M, D), x_RNC)
            caches = None if global_caches is None else global_caches[i]
            z_BLD, caches = self._stack(unit.global_, z_RMD.reshape(B, G * M, D), pos_BL, caches, valid_BL)
            caches_U.append(caches)
            z_BGMD = z_BLD.reshape(B, G, M, D)
            latents_U.append(z_BGMD)
            if unit.x2l is not None:
                src_BGMD = self._shift(z_BGMD) if shift else z_BGMD
                x_RNC = unit.x2l(x_RNC, src_BGMD.reshape(B * G, M, D))
        x_BTC = x_RNC.reshape(B, G * n, cfg.d_model)[:, :T]
        return x_BTC, latents_U, caches_U

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, shift: bool = True):
        """Logits ``[B, T, V]`` for every position, any ``T <= max_seq_len``.

        ``positions_BT`` and ``segment_ids_BT`` (packed documents) are accepted for the
        trainer's calling convention and not used (see the module docstring)."""
        del positions_BT, segment_ids_BT
        x_BTC, _, _ = self.encode(tokens_BT, shift=shift)
        return self._logits(x_BTC)

    # -- cost model ---------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3x the forward's matmul FLOPs).

        Each parameter counts 2 FLOPs per row it multiplies: local layers and the head run on
        every token, global layers on m/n latents per token, cross-attention projects queries
        and keys on their own side. Attention scores: a token sees (n+1)/2 keys on average in
        its group plus m latents; a latent sees n tokens in l2x and ~(G+1)/2 groups of m.
        """
        cfg = self.config
        n, M = cfg.group_size, cfg.num_latents
        G = max(1, -(-seq_len // n))
        size = lambda mod: sum(x.size for _, x in nnx.to_flat_state(nnx.state(mod, nnx.Param)))
        per_latent = M / n
        fwd = 0.0
        lc, gc = cfg.local_config, cfg.global_config
        for (n_local, n_glob), unit in zip(cfg.units, self.units):
            fwd += 2 * size(unit.local)
            fwd += 4 * lc.num_heads * lc.head_size * (n + 1) / 2 * n_local
            if unit.global_ is not None:
                fwd += 2 * size(unit.global_) * per_latent
                fwd += 4 * gc.num_heads * gc.head_size * (G + 1) / 2 * M * n_glob * per_latent
                for cross, q_rate, kv_rate, keys in ((unit.l2x, per_latent, 1.0, n),
                                                     (unit.x2l, 1.0, per_latent, M)):
                    if cross is None:
                        continue
                    at = cross.attn
                    fwd += 2 * (at.q_DHE.size + at.o_HED.size) * q_rate
                    fwd += 2 * (at.k_DKE.size + at.v_DKE.size) * kv_rate
                    fwd += 4 * at.num_heads * at.head_dim * keys * q_rate
        head = self.embed.table_VD if self.head is None else self.head.w_DV
        fwd += 2 * head.size
        return 3 * fwd

    # -- cached decoding ----------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int | None = None) -> FITCache:
        cfg = self.config
        n, M = cfg.group_size, cfg.num_latents
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}.")
        if not cfg.causal:
            raise ValueError("the encoder form (causal=False) sees future tokens; it cannot decode.")
        groups = -(-max_len // n)
        lc, gc = cfg.local_config, cfg.global_config
        B, dt = batch_size, cfg.dtype
        local, tokens, x2l, glob = [], [], [], []
        for (a, b), unit in zip(cfg.units, self.units):
            local.append(stack_cache(KVCache.create(B, n, lc.kv_heads, lc.head_size, dt), a))
            tokens.append(jnp.zeros((B, n, cfg.d_model), dt) if b else None)
            glob.append(stack_cache(KVCache.create(B, groups * M, gc.kv_heads, gc.head_size, dt), b) if b else None)
            if unit.x2l is not None:  # group 0 reads zero latents
                x2l.append(self._x2l_kv(unit, jnp.zeros((B, M, cfg.latent_width), dt)))
            else:
                x2l.append(None)
        return FITCache(tuple(local), tuple(tokens), tuple(x2l), tuple(glob), jnp.zeros((B,), jnp.int32))

    def cache_nbytes(self, batch_size: int, length: int) -> int:
        """The cache size by formula (``2 a n K E`` local, ``2 b (L m / n) K E`` global,
        ``n C`` token states and ``2 m Hc Ec`` x2l keys/values per unit, plus int32 slot
        positions); tests compare it with the allocated pytree."""
        cfg = self.config
        n, M = cfg.group_size, cfg.num_latents
        groups = -(-length // n)
        lc, gc = cfg.local_config, cfg.global_config
        item = jnp.dtype(cfg.dtype).itemsize
        total = 0
        for (a, b), unit in zip(cfg.units, self.units):
            total += a * (2 * n * lc.kv_heads * lc.head_size * item + n * 4)
            if b:
                total += b * (2 * groups * M * gc.kv_heads * gc.head_size * item + groups * M * 4)
                total += n * cfg.d_model * item
            if unit.x2l is not None:
                total += 2 * M * unit.x2l.attn.num_kv_heads * unit.x2l.attn.head_dim * item
        return batch_size * total + batch_size * 4  # + length_B

    def _x2l_kv(self, unit: FITUnit, z_BMD):
        k, v = unit.x2l.kv(z_BMD)
        return k.astype(self.config.dtype), v.astype(self.config.dtype)

    def prefill(self, tokens_BT, lengths_B, cache: FITCache):
        """Consume right-padded prompts into an *empty* cache; next-token logits ``[B, V]``.

        One parallel pass over the prompts gives the logits and stores every finished
        group's latents in the global KV; a second pass over each row's unfinished group
        fills the local KV and the token states that l2x will read when the group closes."""
        cfg = self.config
        n, M = cfg.group_size, cfg.num_latents
        B, T = tokens_BT.shape
        check_empty_cache(cache, "FIT")
        done_B = lengths_B // n  # finished groups per row
        x_BTC, latents_U, glob = self.encode(tokens_BT, global_caches=cache.global_U, groups_done_B=done_B)
        last_B = jnp.maximum(lengths_B - 1, 0)
        logits_BV = self._logits(jnp.take_along_axis(x_BTC, last_B[:, None, None], axis=1))[:, 0]

        # The unfinished group: its tokens (ids past the prompt are masked out below).
        padded = jnp.pad(tokens_BT, ((0, 0), (0, n)))
        idx_BN = done_B[:, None] * n + jnp.arange(n)[None]
        tok_BN = jnp.take_along_axis(padded, jnp.minimum(idx_BN, T + n - 1), axis=1)
        pos_BN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
        valid_BN = pos_BN < (lengths_B % n)[:, None]
        x_BNC = self.embed(tok_BN)
        local, tokens, x2l, g = [], [], [], 0
        for i, unit in enumerate(self.units):
            x_BNC, c = self._stack(unit.local, x_BNC, pos_BN, cache.local_U[i], valid_BN)
            local.append(c)
            tokens.append(None if unit.global_ is None else x_BNC)
            if unit.x2l is None:
                x2l.append(None)
                continue
            # Previous group's latents after this unit's global stack (zeros before group 1).
            z_BGMD = self._shift(latents_U[g])
            z_BMD = jnp.take_along_axis(z_BGMD, jnp.minimum(done_B, z_BGMD.shape[1] - 1)[:, None, None, None],
                                        axis=1)[:, 0]
            z_BMD = jnp.where((done_B < z_BGMD.shape[1])[:, None, None], z_BMD, latents_U[g][:, -1])
            kv = self._x2l_kv(unit, z_BMD)
            x2l.append(kv)
            x_BNC = unit.x2l.with_kv(x_BNC, *kv)
            g += 1
        it = iter(glob)  # encode returns one cache per unit with globals
        glob_U = tuple(None if unit.global_ is None else next(it) for unit in self.units)
        return logits_BV, FITCache(tuple(local), tuple(tokens), tuple(x2l), glob_U, cache.length_B + lengths_B)

    def decode(self, tokens_B, cache: FITCache):
        """One token per sequence -> next-token logits ``[B, V]`` and the updated cache."""
        cfg = self.config
        n = cfg.group_size
        B = tokens_B.shape[0]
        j_B = cache.length_B % n  # slot of this token inside its group
        pos_B1 = j_B[:, None]
        x_B1C = self.embed(tokens_B[:, None])
        local, tokens = [], []
        for i, unit in enumerate(self.units):
            x_B1C, c = self._stack(unit.local, x_B1C, pos_B1, cache.local_U[i])
            local.append(c)
            if unit.global_ is not None:
                tokens.append(cache.tokens_U[i].at[jnp.arange(B), j_B].set(x_B1C[:, 0].astype(cfg.dtype)))
            else:
                tokens.append(None)
            if unit.x2l is not None:
                x_B1C = unit.x2l.with_kv(x_B1C, *cache.x2l_U[i])
        logits_BV = self._logits(x_B1C)[:, 0]
        cache = dataclasses.replace(cache, local_U=tuple(local), tokens_U=tuple(tokens),
                                    length_B=cache.length_B + 1)
        closing_B = cache.length_B % n == 0
        cache = jax.lax.cond(jnp.any(closing_B), lambda c: self._close_group(c, closing_B), lambda c: c, cache)
        return logits_BV, cache

    def _close_group(self, cache: FITCache, closing_B):
        """Rows whose group just filled: run l2x and the global stacks for the group's
        latents unit by unit (appending to the global KV), then project the new latents
        for the next group's x2l. Other rows keep their state."""
        cfg = self.config
        n, M = cfg.group_size, cfg.num_latents
        B = closing_B.shape[0]
        g_B = cache.length_B // n - 1
        pos_BM = g_B[:, None] * M + jnp.arange(M, dtype=jnp.int32)[None]
        valid_BM = jnp.broadcast_to(closing_B[:, None], (B, M))
        z_BMD = self._start_latents(B)
        glob, x2l, local = list(cache.global_U), list(cache.x2l_U), []
        for i, unit in enumerate(self.units):
            # Local KV of the filled group is stale for the next group: clear it.
            local.append(clear_rows(cache.local_U[i], closing_B))
            if unit.global_ is None:
                continue
            z_BMD = unit.l2x(z_BMD, cache.tokens_U[i])
            z_BMD, glob[i] = self._stack(unit.global_, z_BMD, pos_BM, cache.global_U[i], valid_BM)
            if unit.x2l is not None:
                k, v = self._x2l_kv(unit, z_BMD)
                keep = closing_B[:, None, None, None]
                x2l[i] = (jnp.where(keep, k, x2l[i][0]), jnp.where(keep, v, x2l[i][1]))
        return dataclasses.replace(cache, local_U=tuple(local), global_U=tuple(glob), x2l_U=tuple(x2l))
