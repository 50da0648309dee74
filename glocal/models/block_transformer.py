"""Block Transformer: a coarse block decoder over blocks of ``L_B`` tokens and a fine token
decoder that writes each block from one context vector (global-to-local).

    tokens [B, N, L_B] --concat of L_B small embeddings--> e_j [B, N, D_B]
    BlockDecoder (causal over blocks)                    -> c_j [B, N, D_B]   (has seen blocks <= j)
    context for block j: c_{j-1}; block 0 gets a learned start vector
    prefix  P_j = W_exp ctx_j + b                        -> [(B N), r, D_T]
    TokenDecoder over [P_1..P_r, emb(x_j,0) .. emb(x_j,L_B-2)]  (causal, positions restart per block)
    outputs at r-1 .. r+L_B-2 predict x_j,0 .. x_j,L_B-1  (so the logits at position p are the
    output that predicts token p + 1, as for every LM here)

Letters (beyond the package legend): N blocks, L tokens per block (L_B), R prefix vectors (r),
D block width (D_B), T in ``_XST``/``_RT`` the token width (D_T), S = r + L_B - 1 token-decoder
length, X = B*N block rows.

Unlike the paper's training (which never predicts block 0), every position gets logits:
block 0 is decoded from the start vector, so ``model(tokens_BT)`` is a drop-in LM. The token
decoder never attends across blocks, so its KV cache holds at most ``r + L_B - 1`` entries
and is reset every block; the block decoder advances once per block. Layers are our
Llama-style decoder layers (pre-norm, RoPE, SwiGLU), not GPT-NeoX. ``segment_ids`` of packed
documents are not used: the block decoder sees across document boundaries (the trainer's
loss mask still skips cross-document targets).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.configs.base import ConfigError, ModelConfig
from glocal.kernels.masks import Causal
from glocal.layers import Embed, KVCache, Unembed, make_norm
from glocal.layers.cache import clear_rows, stack_cache, tree_nbytes
from glocal.layers.params import fan_in_init, param
from glocal.models.stack import run_decoder_layers, stack_modules
from glocal.models.transformer import Block, TransformerConfig, check_empty_cache, check_layer_choices, check_tokens


@dataclasses.dataclass(frozen=True)
class BlockTransformerConfig(ModelConfig):
    vocab_size: int = 384
    block_size: int = 4  # L_B tokens per block
    prefix_len: int = 2  # r prefix vectors expanded from each context
    d_block: int = 64  # D_B; each token embeds into D_B / L_B
    block_layers: int = 2
    block_heads: int = 4
    block_kv_heads: int | None = None
    block_d_ff: int = 192
    d_token: int = 64  # D_T
    token_layers: int = 2
    token_heads: int = 4
    token_kv_heads: int | None = None
    token_d_ff: int = 192
    max_seq_len: int = 256
    mlp: str = "swiglu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    attention_impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02

    def validate(self) -> None:
        self.require_positive("vocab_size", "block_size", "prefix_len", "d_block", "block_layers", "d_token",
                              "token_layers", "max_seq_len")
        self.require_multiple("max_seq_len", "block_size")
        if self.d_block % self.block_size:
            raise ConfigError(f"d_block={self.d_block} is not divisible by block_size={self.block_size}: "
                              f"a block vector concatenates block_size token embeddings of width "
                              f"d_block / block_size.")
        check_layer_choices(self)
        self.block_config, self.token_config  # width/head checks with clear messages

    @property
    def num_blocks(self) -> int:
        return self.max_seq_len // self.block_size

    @property
    def token_seq_len(self) -> int:
        """Length of one token-decoder sequence: r prefix vectors + L_B - 1 tokens."""
        return self.prefix_len + self.block_size - 1

    def _sub(self, **kw) -> TransformerConfig:
        return TransformerConfig(vocab_size=self.vocab_size, mlp=self.mlp, norm=self.norm, norm_eps=self.norm_eps,
                                 rope_theta=self.rope_theta, attention_impl=self.attention_impl,
                                 dtype=self.dtype, param_dtype=self.param_dtype, **kw)

    @property
    def block_config(self) -> TransformerConfig:
        return self._sub(d_model=self.d_block, num_layers=self.block_layers, num_heads=self.block_heads,
                         num_kv_heads=self.block_kv_heads, d_ff=self.block_d_ff, max_seq_len=self.num_blocks)

    @property
    def token_config(self) -> TransformerConfig:
        return self._sub(d_model=self.d_token, num_layers=self.token_layers, num_heads=self.token_heads,
                         num_kv_heads=self.token_kv_heads, d_ff=self.token_d_ff, max_seq_len=self.token_seq_len)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockTransformerCache:
    """blocks   KVCache [block_layers, B, K, N, E]: one entry per finished block
    tokens   KVCache [token_layers, B, K, r + L_B - 1, E]: the current block only
    buffer_BL  ids of the current block's tokens so far (embedded when the block closes)
    length_B   tokens consumed per sequence"""

    blocks: KVCache
    tokens: KVCache
    buffer_BL: jax.Array
    length_B: jax.Array

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)


class BlockTransformer(nnx.Module):
    config_class = BlockTransformerConfig

    def __init__(self, cfg: BlockTransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        bc, tc = cfg.block_config, cfg.token_config
        L, R = cfg.block_size, cfg.prefix_len
        kw = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.block_embed = Embed(cfg.vocab_size, cfg.d_block // L, **kw)  # concatenated, not pooled
        self.block_decoder = stack_modules(lambda r: Block(bc, Causal(), rngs=r), cfg.block_layers, rngs)
        self.block_norm = make_norm(cfg.norm, cfg.d_block, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        std = cfg.init_std
        self.start_D = param(rngs, lambda k, s, d: std * jax.random.normal(k, s, d), (cfg.d_block,), ("embed",),
                             cfg.param_dtype)
        self.expand_DRT = param(rngs, fan_in_init(cfg.d_block), (cfg.d_block, R, cfg.d_token),
                                ("embed", None, "mlp"), cfg.param_dtype)
        self.expand_bias_RT = param(rngs, lambda k, s, d: jnp.zeros(s, d), (R, cfg.d_token), (None, "mlp"),
                                    cfg.param_dtype)
        self.token_embed = Embed(cfg.vocab_size, cfg.d_token, **kw)
        self.token_decoder = stack_modules(lambda r: Block(tc, Causal(), rngs=r), cfg.token_layers, rngs)
        self.final_norm = make_norm(cfg.norm, cfg.d_token, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.head = Unembed(cfg.d_token, cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    # -- pieces ------------------------------------------------------------------------------
    def _stack(self, stacked, x, positions, caches=None, valid=None):
        cfg = self.config
        return run_decoder_layers(stacked, x, positions, caches, valid, scan=cfg.scan_layers, remat=cfg.remat)

    def _embed_blocks(self, tokens_BNL):
        B, N, L = tokens_BNL.shape
        return self.block_embed(tokens_BNL).reshape(B, N, self.config.d_block)

    def _prefix(self, ctx_XD):
        """Context vectors ``[..., D_B]`` -> prefix ``[..., r, D_T]``."""
        dt = self.config.dtype
        return (jnp.einsum("...d,drt->...rt", ctx_XD.astype(dt), self.expand_DRT[...].astype(dt))
                + self.expand_bias_RT[...].astype(dt))

    def _logits(self, h_BTD):
        return self.head(self.final_norm(h_BTD))

    def _positions(self, B, T):
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    # -- teacher forcing -----------------------------------------------------------------------
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None):
        """Logits ``[B, T, V]`` for every position, any ``T <= max_seq_len``.

        ``positions_BT`` and ``segment_ids_BT`` are accepted for the trainer's calling
        convention and not used (see the module docstring)."""
        del positions_BT, segment_ids_BT
        cfg = self.config
        check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}; raise max_seq_len "
                             f"(a multiple of block_size={cfg.block_size}) or feed shorter windows.")
        L, R = cfg.block_size, cfg.prefix_len
        # Predictions exist for tokens 0..T; the one for token T (the logits at position
        # T-1) may start a new block, so run T // L + 1 blocks. Padding is exact (causal).
        N = T // L + 1
        tokens_BNL = jnp.pad(tokens_BT, ((0, 0), (0, N * L - T))).reshape(B, N, L)
        c_BND, _ = self._stack(self.block_decoder, self._embed_blocks(tokens_BNL), self._positions(B, N))
        c_BND = self.block_norm(c_BND)
        start_BD = jnp.broadcast_to(self.start_D[...].astype(c_BND.dtype), (B, 1, cfg.d_block))
        ctx_BND = jnp.concatenate([start_BD, c_BND[:, :-1]], axis=1)  # c_{j-1} decodes block j
        prefix_XRT = self._prefix(ctx_BND).reshape(B * N, R, cfg.d_token)
        inputs_XLT = self.token_embed(tokens_BNL[:, :, :-1].reshape(B * N, L - 1))
        seq_XST = jnp.concatenate([prefix_XRT, inputs_XLT.astype(prefix_XRT.dtype)], axis=1)
        h_XST, _ = self._stack(self.token_decoder, seq_XST, self._positions(B * N, R + L - 1))
        logits = self._logits(h_XST[:, R - 1:])  # [(B N), L, V]: prediction of each token
        return logits.reshape(B, N * L, -1)[:, 1 : T + 1]  # position p predicts token p + 1

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3x the forward's matmul FLOPs): the block decoder and the
        expansion run once per L_B tokens, the token decoder on (r + L_B - 1) / L_B rows per
        token, the head on every token; attention counts the average visible keys."""
        cfg = self.config
        L, R = cfg.block_size, cfg.prefix_len
        size = lambda mod: sum(x.size for _, x in nnx.to_flat_state(nnx.state(mod, nnx.Param)))
        bc, tc = cfg.block_config, cfg.token_config
        N = max(1, -(-seq_len // L))
        S = R + L - 1
        fwd = 2 * (size(self.block_decoder) + self.expand_DRT.size) / L
        fwd += 4 * bc.num_heads * bc.head_size * (N + 1) / 2 * cfg.block_layers / L
        fwd += 2 * size(self.token_decoder) * S / L
        fwd += 4 * tc.num_heads * tc.head_size * (S + 1) / 2 * cfg.token_layers * S / L
        fwd += 2 * self.head.w_DV.size
        return 3 * fwd

    # -- cached decoding -----------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int | None = None) -> BlockTransformerCache:
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}.")
        bc, tc = cfg.block_config, cfg.token_config
        B, dt = batch_size, cfg.dtype
        blocks = KVCache.create(B, -(-max_len // cfg.block_size), bc.kv_heads, bc.head_size, dt)
        tokens = KVCache.create(B, cfg.token_seq_len, tc.kv_heads, tc.head_size, dt)
        return BlockTransformerCache(stack_cache(blocks, cfg.block_layers), stack_cache(tokens, cfg.token_layers),
                                     jnp.zeros((B, cfg.block_size), jnp.int32), jnp.zeros((B,), jnp.int32))

    def cache_nbytes(self, batch_size: int, length: int) -> int:
        """The cache size by formula: ``2 N_bd (L / L_B) K E`` block entries plus a constant
        ``2 N_td (r + L_B - 1) K E`` token entries (plus int32 slot positions, the block's
        token ids and the lengths); tests compare it with the allocated pytree."""
        cfg = self.config
        bc, tc = cfg.block_config, cfg.token_config
        item = jnp.dtype(cfg.dtype).itemsize
        n_blocks = -(-length // cfg.block_size)
        per_seq = cfg.block_layers * n_blocks * (2 * bc.kv_heads * bc.head_size * item + 4)
        per_seq += cfg.token_layers * cfg.token_seq_len * (2 * tc.kv_heads * tc.head_size * item + 4)
        per_seq += 4 * cfg.block_size + 4
        return batch_size * per_seq

    def prefill(self, tokens_BT, lengths_B, cache: BlockTransformerCache):
        """Consume right-padded prompts into an *empty* cache; next-token logits ``[B, V]``.

        The block decoder runs over every finished block of each row (one parallel pass,
        storing their KV); the token decoder then runs once over the unfinished block:
        its prefix from the last context and the tokens already given."""
        cfg = self.config
        L, R = cfg.block_size, cfg.prefix_len
        B, T = tokens_BT.shape
        N = -(-T // L)
        check_empty_cache(cache, "BlockTransformer")
        done_B = lengths_B // L  # finished blocks per row
        padded = jnp.pad(tokens_BT, ((0, 0), (0, (N + 1) * L - T)))
        e_BND = self._embed_blocks(padded[:, : N * L].reshape(B, N, L))
        pos_BN = self._positions(B, N)
        c_BND, blocks = self._stack(self.block_decoder, e_BND, pos_BN, cache.blocks, pos_BN < done_B[:, None])
        c_BND = self.block_norm(c_BND)
        last_BD = jnp.take_along_axis(c_BND, jnp.maximum(done_B - 1, 0)[:, None, None], axis=1)[:, 0]
        ctx_BD = jnp.where((done_B > 0)[:, None], last_BD, self.start_D[...].astype(last_BD.dtype))
        idx_BL = done_B[:, None] * L + jnp.arange(L)[None]
        buffer_BL = jnp.take_along_axis(padded, idx_BL, axis=1)
        logits_BV, tokens = self._token_block(ctx_BD, buffer_BL, lengths_B % L, cache.tokens)
        return logits_BV, BlockTransformerCache(blocks, tokens, buffer_BL, cache.length_B + lengths_B)

    def _token_block(self, ctx_BD, buffer_BL, given_B, token_cache, rows_B=None):
        """Start a block: run the token decoder over [prefix(ctx), first ``given_B`` tokens]
        into a cleared cache (only ``rows_B``), returning the logits after the last input."""
        cfg = self.config
        L, R = cfg.block_size, cfg.prefix_len
        B = ctx_BD.shape[0]
        seq_BST = jnp.concatenate(
            [self._prefix(ctx_BD), self.token_embed(buffer_BL[:, : L - 1]).astype(cfg.dtype)], axis=1)
        pos_BS = self._positions(B, R + L - 1)
        valid_BS = pos_BS < (R + given_B)[:, None]
        if rows_B is not None:
            valid_BS &= rows_B[:, None]
            token_cache = clear_rows(token_cache, rows_B)
        h_BSD, token_cache = self._stack(self.token_decoder, seq_BST, pos_BS, token_cache, valid_BS)
        h_BD = jnp.take_along_axis(h_BSD, (R - 1 + given_B)[:, None, None], axis=1)[:, 0]
        return self._logits(h_BD[:, None])[:, 0], token_cache

    def decode(self, tokens_B, cache: BlockTransformerCache):
        """One token per sequence -> next-token logits ``[B, V]`` and the updated cache.

        Inside a block the token decoder takes one step; a token that completes its block
        instead sends the block through the block decoder (one step) and starts the next
        block from its prefix (the token decoder's cache is reset)."""
        cfg = self.config
        L, R = cfg.block_size, cfg.prefix_len
        B = tokens_B.shape[0]
        offset_B = cache.length_B % L
        buffer_BL = cache.buffer_BL.at[jnp.arange(B), offset_B].set(tokens_B)
        closing_B = offset_B == L - 1
        # Inside a block: one token-decoder step at position r + offset.
        h_B1D, tokens = self._stack(self.token_decoder, self.token_embed(tokens_B[:, None]), (R + offset_B)[:, None],
                                    cache.tokens, ~closing_B[:, None])
        logits_BV = self._logits(h_B1D)[:, 0]

        def close(args):
            logits_BV, tokens, blocks = args
            j_B1 = (cache.length_B // L)[:, None]
            c_B1D, blocks = self._stack(self.block_decoder, self._embed_blocks(buffer_BL[:, None]), j_B1,
                                        blocks, closing_B[:, None])
            first_BV, tokens = self._token_block(self.block_norm(c_B1D)[:, 0], buffer_BL, jnp.zeros_like(offset_B),
                                                 tokens, rows_B=closing_B)
            return jnp.where(closing_B[:, None], first_BV, logits_BV), tokens, blocks

        logits_BV, tokens, blocks = jax.lax.cond(jnp.any(closing_B), close, lambda a: a,
                                                 (logits_BV, tokens, cache.blocks))
        return logits_BV, BlockTransformerCache(blocks, tokens, buffer_BL, cache.length_B + 1)
