"""Block Transformer: a coarse block decoder over blocks of ``N`` tokens and a fine token
decoder that writes each block from one context vector (global-to-local).

    tokens [B, G, N] --concat of N small embeddings--> e_BGC         (C = d_block)
    BlockDecoder (causal over blocks)               -> c_BGC         (block j has seen blocks <= j)
    context for block j: c_{j-1}; block 0 gets a learned start vector
    prefix  P_j = W_exp ctx_j + b                   -> [(B G), Q, D] (Q prefix vectors, D = d_token)
    TokenDecoder over [P_1..P_Q, emb(x_j,0) .. emb(x_j,N-2)]  (causal, positions restart per block)
    outputs at Q-1 .. Q+N-2 predict x_j,0 .. x_j,N-1  (so the logits at position p are the
    output that predicts token p + 1, as for every LM here)

Letters follow the package legend: G blocks, N tokens per block (``block_size``), Q prefix
vectors (``prefix_len``), C block width (``d_block``), D token width (``d_token``), O = B*G
block rows; the token decoder runs on sequences of Q + N - 1 positions (its T).

Unlike the paper's training (which never predicts block 0), every position gets logits:
block 0 is decoded from the start vector, so ``model(tokens_BT)`` is a drop-in LM. The token
decoder never attends across blocks, so its KV cache holds at most ``Q + N - 1`` entries
and is reset every block; the block decoder advances once per block. Layers are our
Llama-style decoder layers (pre-norm, RoPE, SwiGLU), not GPT-NeoX. Packed documents cannot
be kept apart (a block vector mixes the documents it spans), so the model rejects
``segment_ids_BT`` / ``positions_BT`` and the trainer feeds it plain windows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.configs.base import ConfigError
from glocal.layers import DecoderStack, Embed, make_norm
from glocal.layers.cache import clear_rows
from glocal.layers.params import fan_in_init, param
from glocal.models.base import DecoderConfig, ModelBase, ModelCache


@dataclasses.dataclass(frozen=True)
class BlockTransformerConfig(DecoderConfig):
    block_size: int = 4  # N tokens per block
    prefix_len: int = 2  # Q prefix vectors expanded from each context
    d_block: int = 64  # C; each token embeds into C / N
    block_layers: int = 2
    block_heads: int = 4
    block_kv_heads: int | None = None
    block_head_dim: int | None = None  # None = d_block // block_heads
    block_d_ff: int = 192
    d_token: int = 64  # D
    token_layers: int = 2
    token_heads: int = 4
    token_kv_heads: int | None = None
    token_head_dim: int | None = None  # None = d_token // token_heads
    token_d_ff: int = 192

    def validate(self) -> None:
        super().validate()
        self.require_positive("block_size", "prefix_len", "d_block", "block_layers", "block_d_ff", "d_token",
                              "token_layers", "token_d_ff")
        self.require_multiple("max_seq_len", "block_size")
        if self.d_block % self.block_size:
            raise ConfigError(f"d_block={self.d_block} is not divisible by block_size={self.block_size}: "
                              f"a block vector concatenates block_size token embeddings of width "
                              f"d_block / block_size.")
        self.require_heads("d_block", "block_heads", "block_kv_heads", "block_head_dim")
        self.require_heads("d_token", "token_heads", "token_kv_heads", "token_head_dim")

    @property
    def token_seq_len(self) -> int:
        """Length of one token-decoder sequence: Q prefix vectors + N - 1 tokens."""
        return self.prefix_len + self.block_size - 1

    def block_decoder(self, rngs: nnx.Rngs) -> DecoderStack:
        spec = self.layer(d_model=self.d_block, num_heads=self.block_heads, num_kv_heads=self.block_kv_heads,
                          head_dim=self.block_head_dim, d_ff=self.block_d_ff)
        return DecoderStack(spec, [self.kind("global")], self.block_layers, scan=self.scan_layers,
                            remat=self.remat, rngs=rngs)

    def token_decoder(self, rngs: nnx.Rngs) -> DecoderStack:
        spec = self.layer(d_model=self.d_token, num_heads=self.token_heads, num_kv_heads=self.token_kv_heads,
                          head_dim=self.token_head_dim, d_ff=self.token_d_ff)
        return DecoderStack(spec, [self.kind("global")], self.token_layers, scan=self.scan_layers,
                            remat=self.remat, rngs=rngs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockTransformerCache(ModelCache):
    """blocks     the block decoder's caches: one entry per finished block [layers, B, K, G, E]
    tokens     the token decoder's caches: the current block only [layers, B, K, Q + N - 1, E]
    buffer_BN  ids of the current block's tokens so far (embedded when the block closes)
    length_B   tokens consumed per sequence"""

    blocks: tuple
    tokens: tuple
    buffer_BN: jax.Array
    length_B: jax.Array


class BlockTransformer(ModelBase):
    packing_note = "a block vector mixes every document the block spans"

    def __init__(self, cfg: BlockTransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        N, Q, C, D = cfg.block_size, cfg.prefix_len, cfg.d_block, cfg.d_token
        self.block_embed = Embed(cfg.vocab_size, C // N, init_std=cfg.init_std, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, rngs=rngs)  # concatenated, not pooled
        self.block_decoder = cfg.block_decoder(rngs)
        self.block_norm = make_norm(cfg.norm, C, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        std = cfg.init_std
        self.start_C = param(rngs, lambda k, s, d: std * jax.random.normal(k, s, d), (C,), ("embed",),
                             cfg.param_dtype)
        self.expand_CQD = param(rngs, fan_in_init(C), (C, Q, D), ("embed", None, "mlp"), cfg.param_dtype)
        self.expand_bias_QD = param(rngs, lambda k, s, d: jnp.zeros(s, d), (Q, D), (None, "mlp"), cfg.param_dtype)
        self.embed = self._make_embed(D, rngs)  # the token decoder's (and a tied head's) table
        self.token_decoder = cfg.token_decoder(rngs)
        self._init_output(D, rngs)

    def _length_hint(self) -> str:
        return f" (a multiple of block_size={self.config.block_size})"

    # -- pieces ------------------------------------------------------------------------------
    def _embed_blocks(self, tokens_BGN):
        B, G, N = tokens_BGN.shape
        return self.block_embed(tokens_BGN).reshape(B, G, self.config.d_block)

    def _prefix(self, ctx_C):
        """Context vectors ``[..., C]`` -> prefix ``[..., Q, D]``."""
        dt = self.config.dtype
        return (jnp.einsum("...c,cqd->...qd", ctx_C.astype(dt), self.expand_CQD[...].astype(dt))
                + self.expand_bias_QD[...].astype(dt))

    # -- teacher forcing -----------------------------------------------------------------------
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None):
        """Logits ``[B, T, V]`` for every position, any ``T <= max_seq_len``."""
        self._check_inputs(tokens_BT, positions_BT, segment_ids_BT)
        cfg = self.config
        B, T = tokens_BT.shape
        N, Q, C, D = cfg.block_size, cfg.prefix_len, cfg.d_block, cfg.d_token
        # Predictions exist for tokens 0..T; the one for token T (the logits at position
        # T-1) may start a new block, so run T // N + 1 blocks. Padding is exact (causal).
        G = T // N + 1
        tokens_BGN = jnp.pad(tokens_BT, ((0, 0), (0, G * N - T))).reshape(B, G, N)
        c_BGC, _, block_aux = self.block_decoder(self._embed_blocks(tokens_BGN), positions_BT=self._positions(B, G))
        c_BGC = self.block_norm(c_BGC)
        start_BGC = jnp.broadcast_to(self.start_C[...].astype(c_BGC.dtype), (B, 1, C))
        ctx_BGC = jnp.concatenate([start_BGC, c_BGC[:, :-1]], axis=1)  # c_{j-1} decodes block j
        prefix_OQD = self._prefix(ctx_BGC).reshape(B * G, Q, D)
        inputs_OND = self.embed(tokens_BGN[:, :, :-1].reshape(B * G, N - 1))
        seq_OTD = jnp.concatenate([prefix_OQD, inputs_OND.astype(prefix_OQD.dtype)], axis=1)
        h_OTD, _, token_aux = self.token_decoder(seq_OTD, positions_BT=self._positions(B * G, Q + N - 1))
        logits = self._logits(h_OTD[:, Q - 1:])  # [(B G), N, V]: prediction of each token
        logits_BTV = logits.reshape(B, G * N, -1)[:, 1 : T + 1]  # position p predicts token p + 1
        return self._output(logits_BTV, block_aux, token_aux)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3x the forward's matmul FLOPs): the block decoder, its
        norm and the expansion run once per N tokens, the token decoder on (Q + N - 1) / N
        rows per token, the head on every token; attention counts the average visible keys."""
        cfg = self.config
        N, Q = cfg.block_size, cfg.prefix_len
        G = max(1, -(-seq_len // N))
        T_tok = Q + N - 1
        fwd = (self.block_decoder.flops_per_row(G) + 2 * (self.expand_CQD.size + self.block_norm.scale.size)) / N
        fwd += self.token_decoder.flops_per_row(T_tok) * T_tok / N
        return 3 * (fwd + self._head_flops())

    # -- cached decoding -----------------------------------------------------------------------
    def _empty_cache(self, batch_size: int, max_len: int) -> BlockTransformerCache:
        """One block-decoder entry per ``N`` tokens, a constant ``Q + N - 1`` token-decoder
        entries per layer, the block's token ids and the lengths."""
        cfg = self.config
        B = batch_size
        return BlockTransformerCache(self.block_decoder.init_cache(B, -(-max_len // cfg.block_size)),
                                     self.token_decoder.init_cache(B, cfg.token_seq_len),
                                     jnp.zeros((B, cfg.block_size), jnp.int32), jnp.zeros((B,), jnp.int32))

    def prefill(self, tokens_BT, lengths_B, cache: BlockTransformerCache):
        """Consume right-padded prompts into a fresh cache; next-token logits ``[B, V]``.

        The block decoder runs over every finished block of each row (one parallel pass,
        storing their KV); the token decoder then runs once over the unfinished block:
        its prefix from the last context and the tokens already given."""
        cfg = self.config
        N = cfg.block_size
        B, T = tokens_BT.shape
        self._check_inputs(tokens_BT)
        self._check_fresh(cache)
        G = -(-T // N)
        done_B = lengths_B // N  # finished blocks per row
        padded = jnp.pad(tokens_BT, ((0, 0), (0, (G + 1) * N - T)))
        e_BGC = self._embed_blocks(padded[:, : G * N].reshape(B, G, N))
        pos_BG = self._positions(B, G)
        c_BGC, blocks, _ = self.block_decoder(e_BGC, positions_BT=pos_BG, caches=cache.blocks,
                                              valid_BT=pos_BG < done_B[:, None])
        c_BGC = self.block_norm(c_BGC)
        last_BC = jnp.take_along_axis(c_BGC, jnp.maximum(done_B - 1, 0)[:, None, None], axis=1)[:, 0]
        ctx_BC = jnp.where((done_B > 0)[:, None], last_BC, self.start_C[...].astype(last_BC.dtype))
        idx_BN = done_B[:, None] * N + jnp.arange(N)[None]
        buffer_BN = jnp.take_along_axis(padded, idx_BN, axis=1)
        logits_BV, tokens = self._token_block(ctx_BC, buffer_BN, lengths_B % N, cache.tokens)
        return logits_BV, BlockTransformerCache(blocks, tokens, buffer_BN, cache.length_B + lengths_B)

    def _token_block(self, ctx_BC, buffer_BN, given_B, token_cache, rows_B=None):
        """Start a block: run the token decoder over [prefix(ctx), first ``given_B`` tokens]
        into a cleared cache (only ``rows_B``), returning the logits after the last input."""
        cfg = self.config
        N, Q = cfg.block_size, cfg.prefix_len
        B = ctx_BC.shape[0]
        seq_BTD = jnp.concatenate([self._prefix(ctx_BC), self.embed(buffer_BN[:, : N - 1]).astype(cfg.dtype)], axis=1)
        pos_BT = self._positions(B, Q + N - 1)
        valid_BT = pos_BT < (Q + given_B)[:, None]
        if rows_B is not None:
            valid_BT &= rows_B[:, None]
            token_cache = clear_rows(token_cache, rows_B)
        h_BTD, token_cache, _ = self.token_decoder(seq_BTD, positions_BT=pos_BT, caches=token_cache,
                                                   valid_BT=valid_BT)
        h_BD = jnp.take_along_axis(h_BTD, (Q - 1 + given_B)[:, None, None], axis=1)[:, 0]
        return self._logits(h_BD[:, None])[:, 0], token_cache

    def decode(self, tokens_B, cache: BlockTransformerCache):
        """One token per sequence -> next-token logits ``[B, V]`` and the updated cache.

        Inside a block the token decoder takes one step; a token that completes its block
        instead sends the block through the block decoder (one step) and starts the next
        block from its prefix (the token decoder's cache is reset)."""
        self._check_inputs(tokens_B[:, None])
        cfg = self.config
        N, Q = cfg.block_size, cfg.prefix_len
        B = tokens_B.shape[0]
        offset_B = cache.length_B % N
        buffer_BN = cache.buffer_BN.at[jnp.arange(B), offset_B].set(tokens_B)
        closing_B = offset_B == N - 1
        # Inside a block: one token-decoder step at position Q + offset.
        h_B1D, tokens, _ = self.token_decoder(self.embed(tokens_B[:, None]), positions_BT=(Q + offset_B)[:, None],
                                              caches=cache.tokens, valid_BT=~closing_B[:, None])
        logits_BV = self._logits(h_B1D)[:, 0]

        def close(args):
            logits_BV, tokens, blocks = args
            g_B1 = (cache.length_B // N)[:, None]
            c_B1C, blocks, _ = self.block_decoder(self._embed_blocks(buffer_BN[:, None]), positions_BT=g_B1,
                                                  caches=blocks, valid_BT=closing_B[:, None])
            first_BV, tokens = self._token_block(self.block_norm(c_B1C)[:, 0], buffer_BN, jnp.zeros_like(offset_B),
                                                 tokens, rows_B=closing_B)
            return jnp.where(closing_B[:, None], first_BV, logits_BV), tokens, blocks

        logits_BV, tokens, blocks = jax.lax.cond(jnp.any(closing_B), close, lambda a: a,
                                                 (logits_BV, tokens, cache.blocks))
        return logits_BV, BlockTransformerCache(blocks, tokens, buffer_BN, cache.length_B + 1)
