"""Qwen3-Next's pieces as options of the existing layers, each against a float64 NumPy
reference of the Hugging Face formula (transformers' modeling_qwen3_next.py): zero-centred
RMSNorm (``norm="rms_centered"``), partial rotary (``rope_fraction``), the attention output
gate (``attn_output_gate``) in a full layer and through prefill + decode, and the MoE's gated
shared expert of its own width (``moe.shared_gate``, ``moe.d_shared``); bad values are
one-line ConfigErrors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glocal.models as gm
from glocal.configs.base import ConfigError
from glocal.layers import LayerSpec
from glocal.layers.attention import Attention
from glocal.layers.moe import MoEFFN, MoEOptions
from glocal.layers.norms import RMSNorm, make_norm
from glocal.layers.rope import apply_rope
from tests.lm_checks import assert_causal, assert_decode_matches, build

RNG = np.random.default_rng(7)


def randn(*shape, scale=1.0):
    return RNG.normal(size=shape, scale=scale)


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def rms_centered_np(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1 + w)


def partial_rope_np(x, pos, rd, theta=10_000.0):
    """Rotate-half inside ``x[..., :rd]`` (pairs (i, i + rd/2), frequencies theta^(-2i/rd))."""
    inv = theta ** (-np.arange(0, rd, 2) / rd)
    ang = pos[..., None, None] * inv  # [B, T, 1, rd/2]
    x1, x2, rest = x[..., : rd // 2], x[..., rd // 2: rd], x[..., rd:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang), rest], -1)


def test_zero_centred_rmsnorm():
    norm = make_norm("rms_centered", 16, eps=1e-6, dtype=None, rngs=nnx.Rngs(0))
    assert isinstance(norm, RMSNorm) and norm.zero_centered and not np.any(norm.scale[...])  # w starts at 0
    assert not make_norm("rms", 16, eps=1e-6, dtype=None, rngs=nnx.Rngs(0)).zero_centered
    x, w = randn(2, 5, 16), randn(16, scale=0.3)
    norm.scale[...] = jnp.asarray(w, jnp.float32)
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), rms_centered_np(x, w), rtol=1e-5, atol=1e-6)
    half = RMSNorm(16, zero_centered=True, dtype="bfloat16", rngs=nnx.Rngs(0))
    assert half(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16  # f32 inside, cast at the end


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_partial_rotary_matches_rotate_half_on_the_first_dims(fraction):
    x, pos = randn(2, 6, 3, 16), RNG.integers(0, 200, size=(2, 6))
    rd = int(16 * fraction)
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), rotary_dim=rd)
    np.testing.assert_allclose(got, partial_rope_np(x, pos, rd), rtol=1e-4, atol=1e-5)
    if fraction < 1:
        np.testing.assert_array_equal(got[..., rd:], np.float32(x[..., rd:]))  # passes through untouched
    else:  # the full rotary dim is the default path, bit for bit
        np.testing.assert_array_equal(got, apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos)))


def test_gated_attention_layer_matches_the_hf_formula():
    D, H, K, E, T = 24, 4, 2, 16, 7
    layer = Attention(D, H, K, E, qk_norm=True, norm="rms_centered", rope_fraction=0.25, output_gate=True,
                      rngs=nnx.Rngs(1))
    assert layer.gate_DHE.shape == (D, H, E) and layer.rotary_dim == 4
    for norm in (layer.q_norm, layer.k_norm):  # zero-init offsets would hide a missing (1 + w)
        norm.scale[...] = jnp.asarray(randn(E, scale=0.5), jnp.float32)
    x, pos = randn(2, T, D), np.arange(T)[None] + np.array([[0], [5]])
    qw, kw, vw = (np.asarray(w, np.float64) for w in layer.qkv_kernels())
    gw, ow = (np.asarray(p[...], np.float64) for p in (layer.gate_DHE, layer.o_HED))
    wq, wk = (np.asarray(n.scale[...], np.float64) for n in (layer.q_norm, layer.k_norm))
    q = partial_rope_np(rms_centered_np(np.einsum("btd,dhe->bthe", x, qw), wq), pos, 4)
    k = partial_rope_np(rms_centered_np(np.einsum("btd,dke->btke", x, kw), wk), pos, 4)
    v = np.einsum("btd,dke->btke", x, vw)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # query head h reads kv head h // (H/K)
    s = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(E) + np.where(np.tri(T), 0, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), v)
    want = np.einsum("bthe,hed->btd", o * sigmoid(np.einsum("btd,dhe->bthe", x, gw)), ow)
    y, _ = layer(jnp.asarray(x, jnp.float32), positions_BT=jnp.asarray(pos))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        Attention(D, H, H, E, kv_dim=8, output_gate=True, rngs=nnx.Rngs(0))


QWEN3_NEXT_ATTENTION = dict(max_seq_len=32, norm="rms_centered", qk_norm=True, rope_fraction=0.5,
                            attn_output_gate=True)


def test_model_with_every_attention_piece_decodes_like_its_forward():
    model = build("transformer", "tiny", **QWEN3_NEXT_ATTENTION)
    cfg = model.config
    assert (cfg.norm, cfg.rope_fraction, cfg.attn_output_gate) == ("rms_centered", 0.5, True)
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # Randomise the zero-init norm offsets so every (1 + w) matters.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))
    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * jax.random.normal(next(keys), v.shape, v.dtype)
        if "scale" in jax.tree_util.keystr(p) else v, params), rest)
    x = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    assert_decode_matches(model, x, [5, 9])
    assert_causal(model, x, [3, 8], vocab=cfg.vocab_size)
    # Training FLOPs (3x the forward's 2 per parameter) count the gate projection.
    flops = gm.build_from_config(cfg.replace(attn_output_gate=False)).flops_per_token(32)
    D, H = cfg.d_model, cfg.num_heads
    assert model.flops_per_token(32) - flops == 6 * cfg.num_layers * D * H * (D // H)  # gate_DHE of each layer


def moe_np(layer, x, d):
    """``sum_k p_k y_e(x) + sigmoid(x w_sg) * shared(x)``, softmax over the k chosen logits."""
    w = {k: np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    y = np.zeros_like(x)
    for b, t in np.ndindex(x.shape[:2]):
        logits = x[b, t] @ w[("router_DX",)]
        idx = np.argsort(-logits)[:2]
        comb = np.exp(logits[idx] - logits[idx].max())
        for c, e in zip(comb / comb.sum(), idx):
            h = np.einsum("d,dai->ai", x[b, t], w[("wi_XDAI",)][e])
            y[b, t] += c * (h[0] * sigmoid(h[0]) * h[1]) @ w[("wo_XID",)][e]
    h = np.einsum("btd,dai->btai", x, w[("shared", "wi_DAI")])
    assert h.shape[-1] == d  # the shared expert's own width, not shared_experts * d_expert
    shared = (h[..., 0, :] * sigmoid(h[..., 0, :]) * h[..., 1, :]) @ w[("shared", "wo_ID")]
    return y + sigmoid(x @ w[("shared_gate_D1",)]) * shared


@pytest.mark.parametrize("impl", ["dense", "dropless"])
def test_moe_gated_shared_expert_of_its_own_width(impl):
    spec = LayerSpec(d_model=8, num_heads=2, d_ff=12)
    options = MoEOptions(num_experts=4, top_k=2, impl=impl, shared_experts=1, d_shared=10, shared_gate=True)
    layer = MoEFFN(spec, options, rngs=nnx.Rngs(0))
    layer.router_DX[...] = jnp.asarray(randn(8, 4), jnp.float32)  # clear-cut top-k choices
    layer.shared_gate_D1[...] = jnp.asarray(randn(8, 1), jnp.float32)
    assert layer.shared_gate_D1.shape == (8, 1) and layer.shared.wi_DAI.shape == (8, 2, 10)
    x = randn(2, 5, 8)
    y, _ = layer(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(y, moe_np(layer, x, 10), rtol=1e-4, atol=1e-5)
    experts = 2 * (layer.wi_XDAI.size + layer.wo_XID.size) / 4
    shared = layer.shared.wi_DAI.size + layer.shared.wo_ID.size
    assert layer.active_params() == 8 * 4 + experts + shared + 8  # the gate's D parameters counted


@pytest.mark.parametrize("family, overrides, message", [
    ("transformer", {"norm": "centered"}, r"norm='centered' is not one of \('rms', 'layer', 'rms_centered'\)"),
    ("transformer", {"rope_fraction": 0}, r"rope_fraction=0.0 must be in \(0, 1\]"),
    ("transformer", {"rope_fraction": 1.5}, r"rope_fraction=1.5 must be in \(0, 1\]"),
    ("transformer", {"rope_fraction": 0.1}, r"rope_fraction=0.1 rotates int\(16 \* 0.1\) = 1 dims .* even"),
    ("transformer", {"rope_fraction": 0.5, "rope_theta": None}, r"rope_fraction is set but rope_theta=None"),
    ("moe", {"moe.shared_experts": 0, "moe.d_shared": 16}, r"moe\.d_shared=16 needs a shared expert"),
    ("moe", {"moe.shared_experts": 0, "moe.shared_gate": True}, r"moe\.shared_gate=True needs a shared expert"),
    ("moe", {"moe.shared_experts": 1, "moe.d_shared": 0}, r"moe\.d_shared=0 must be a positive integer"),
])
def test_bad_values_are_one_line_config_errors(family, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        gm.get_config(family, "tiny", **{k: str(v) for k, v in overrides.items()})  # as the CLI passes them
    assert "\n" not in str(e.value)
