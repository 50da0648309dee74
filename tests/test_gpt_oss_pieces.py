"""GPT-OSS's pieces as options of the existing layers, each against a float64 NumPy reference
of the formula (and YaRN against transformers' own ``ROPE_INIT_FUNCTIONS["yarn"]`` and rotary
embedding when torch is installed): YaRN rope scaling (``rope_scaling="yarn"``: frequencies,
the attention factor on the rotated part, partial rotary), the attention output bias
(``attn_out_bias``), the MoE's router bias and expert biases (``moe.router_bias``,
``moe.expert_bias``) in every dispatch, and the clamped SwiGLU (``mlp="swiglu_clamped"``).
The options off leave every parameter draw where it was; bad values are one-line ConfigErrors."""

import math
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glocal.models as gm
from glocal.configs.base import ConfigError
from glocal.layers import LayerSpec
from glocal.layers.attention import Attention
from glocal.layers.mlp import activate
from glocal.layers.moe import MoEFFN, MoEOptions
from glocal.layers.rope import RopeScaling, apply_rope, rope_angles

RNG = np.random.default_rng(11)


def randn(*shape, scale=1.0):
    return RNG.normal(size=shape, scale=scale)


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


# -- YaRN ----------------------------------------------------------------------------------------

def yarn_np(dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """``(inv_freq [dim / 2], attention factor)`` in float64, from the formula (NTK-by-parts)."""
    base = theta ** (-np.arange(0, dim, 2) / dim)
    turns = lambda r: dim * math.log(original / (2 * math.pi * r)) / (2 * math.log(theta))
    low, high = turns(beta_fast), turns(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)  # 1: divided by factor
    return base * (1 - ramp) + base / factor * ramp, 0.1 * math.log(factor) + 1


GPT_OSS_YARN = dict(factor=32.0, original_context=4096, beta_fast=32.0, beta_slow=1.0, truncate=False)
YARN_CASES = [(64, False, 1.0), (64, True, 1.0), (8, False, 1.0), (64, False, 0.5)]  # (head_dim, truncate, fraction)


def glocal_inv_freq(scaling, dim, theta):
    return np.asarray(rope_angles(jnp.ones((1, 1), jnp.int32), dim, theta, scaling))[0, 0]


@pytest.mark.parametrize("head_dim,truncate,fraction", YARN_CASES)
def test_yarn_frequencies_and_attention_factor_match_the_formula(head_dim, truncate, fraction):
    dim = int(head_dim * fraction)
    scaling = RopeScaling("yarn", **dict(GPT_OSS_YARN, truncate=truncate))
    want, factor = yarn_np(dim, 150_000.0, 32.0, 4096, truncate=truncate)
    np.testing.assert_allclose(glocal_inv_freq(scaling, dim, 150_000.0), want, rtol=5e-7)
    assert scaling.attention_factor == pytest.approx(factor, rel=1e-15) == pytest.approx(1.346574, abs=1e-6)


@pytest.mark.parametrize("head_dim,truncate,fraction", YARN_CASES)
def test_yarn_matches_transformers(head_dim, truncate, fraction):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
              "original_max_position_embeddings": 4096, "rope_theta": 150_000.0}
    if fraction != 1.0:
        params["partial_rotary_factor"] = fraction
    config = transformers.GptOssConfig(head_dim=head_dim, rope_parameters=params)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    scaling = RopeScaling("yarn", **dict(GPT_OSS_YARN, truncate=truncate))
    got = glocal_inv_freq(scaling, int(head_dim * fraction), 150_000.0)
    np.testing.assert_allclose(got, inv_freq.double().numpy(), rtol=5e-7)
    assert scaling.attention_factor == factor


def test_yarn_attention_factor_forms():
    assert RopeScaling("yarn", 4.0, original_context=64, attention_factor=0.7).attention_factor == 0.7
    both = RopeScaling("yarn", 40.0, original_context=64, mscale=1.0, mscale_all_dim=0.707)
    assert both.attention_factor == pytest.approx((0.1 * math.log(40) + 1) / (0.0707 * math.log(40) + 1), rel=1e-15)
    assert RopeScaling("yarn", 40.0, original_context=64, mscale=1.0).attention_factor == 0.1 * math.log(40) + 1
    assert RopeScaling("yarn", 1.0, original_context=64).attention_factor == 1.0  # no extension: no gain
    assert RopeScaling("llama3", 8.0).attention_factor == RopeScaling("linear", 2.0).attention_factor == 1.0


def rope_np(x, pos, inv_freq, gain):
    """Rotate-half on ``x[..., :2 len(inv_freq)]`` with cos and sin times ``gain``; the rest passes."""
    rd = 2 * len(inv_freq)
    ang = pos[..., None, None] * inv_freq
    c, s = gain * np.cos(ang), gain * np.sin(ang)
    x1, x2 = x[..., : rd // 2], x[..., rd // 2: rd]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., rd:]], -1)


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_apply_rope_scales_only_the_rotated_part_by_the_attention_factor(rotary_dim):
    scaling = RopeScaling("yarn", 16.0, original_context=32, beta_fast=8.0, beta_slow=2.0)
    x, pos = randn(2, 5, 3, 16), RNG.integers(0, 2000, (2, 5))
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), theta=10_000.0, scaling=scaling,
                     rotary_dim=rotary_dim)
    inv, gain = yarn_np(rotary_dim or 16, 10_000.0, 16.0, 32, 8.0, 2.0)
    np.testing.assert_allclose(got, rope_np(x, pos, inv, gain), rtol=2e-4, atol=2e-5)
    if rotary_dim:
        np.testing.assert_array_equal(got[..., rotary_dim:], np.float32(x[..., rotary_dim:]))


def test_yarn_rope_matches_transformers_beyond_the_original_context():
    """transformers' GPT-OSS rotary embedding (cos and sin times the attention factor) at
    positions up to 3x the original context (64), applied as its rotate-half does."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss import modeling_gpt_oss as hf

    params = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
              "original_max_position_embeddings": 64, "rope_theta": 150_000.0}
    config = transformers.GptOssConfig(head_dim=16, rope_parameters=params, max_position_embeddings=512)
    pos = np.array([[0, 1, 63, 64, 65, 130, 191, 511]])
    x = randn(1, 8, 2, 16)
    cos, sin = hf.GptOssRotaryEmbedding(config)(torch.zeros(1), torch.tensor(pos))
    want = hf._apply_rotary_emb(torch.tensor(x, dtype=torch.float32).transpose(1, 2), cos[:, None], sin[:, None])
    scaling = RopeScaling("yarn", 8.0, original_context=64, truncate=False)
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), theta=150_000.0, scaling=scaling)
    np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), rtol=1e-5, atol=2e-5)


def test_yarn_in_a_model_config():
    cfg = gm.get_config("transformer", "tiny", rope_scaling="yarn", rope_factor=8.0, rope_original_context=32,
                        rope_truncate=False)
    spec = cfg.rope_scaling_spec()
    assert (spec.kind, spec.factor, spec.original_context, spec.truncate) == ("yarn", 8.0, 32, False)
    assert spec.attention_factor == 0.1 * math.log(8) + 1
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


# -- clamped SwiGLU, biases ------------------------------------------------------------------------

def clamped_swiglu_np(g, u, alpha=1.702, limit=7.0):
    g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
    return (u + 1) * g * sigmoid(alpha * g)


def test_clamped_swiglu_matches_the_formula():
    h = randn(50, 2, 16, scale=6.0)  # both clamps hit
    assert (h[:, 0] > 7).any() and (np.abs(h[:, 1]) > 7).any()
    got = activate(jnp.asarray(h, jnp.float32), "swiglu_clamped")
    np.testing.assert_allclose(got, clamped_swiglu_np(h[:, 0], h[:, 1]), rtol=1e-5, atol=1e-5)
    got = activate(jnp.asarray(h, jnp.float32), "swiglu_clamped", alpha=1.0, limit=3.0)
    np.testing.assert_allclose(got, clamped_swiglu_np(h[:, 0], h[:, 1], 1.0, 3.0), rtol=1e-5, atol=1e-5)


def test_attention_output_bias_adds_to_the_output_and_moves_no_draw():
    plain = Attention(16, 4, 2, rngs=nnx.Rngs(0))
    biased = Attention(16, 4, 2, out_bias=True, rngs=nnx.Rngs(0))
    assert not hasattr(plain, "o_b_D") and not np.any(biased.o_b_D[...])
    for name in ("qkv_DKAE", "o_HED"):
        np.testing.assert_array_equal(getattr(plain, name)[...], getattr(biased, name)[...])
    b = randn(16)
    biased.o_b_D[...] = jnp.asarray(b, jnp.float32)
    x = jnp.asarray(randn(2, 6, 16), jnp.float32)
    np.testing.assert_allclose(biased(x)[0], np.asarray(plain(x)[0]) + b, rtol=1e-6, atol=1e-6)


GPT_OSS_MOE = dict(num_experts=4, top_k=2, router_bias=True, expert_bias=True, z_weight=0.0)


def gpt_oss_moe_layer(impl, seed=0, **options):
    spec = LayerSpec(d_model=8, num_heads=2, d_ff=6, mlp="swiglu_clamped")
    layer = MoEFFN(spec, MoEOptions(**{**GPT_OSS_MOE, "impl": impl, "capacity_factor": 4.0, **options}),
                   rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    for name, scale in (("router_DX", 1.0), ("router_b_X", 1.0), ("wi_XDAI", 1.5), ("bi_XAI", 4.0),
                        ("wo_XID", 0.5), ("bo_XD", 1.0)):
        var = getattr(layer, name)
        var[...] = jnp.asarray(rng.normal(size=var.shape, scale=scale), var.dtype)
    return layer


def gpt_oss_moe_np(layer, x):
    """GPT-OSS's formula: top-k of the biased logits, softmax over those k, biased experts with
    the clamped SwiGLU (float64)."""
    w = {k[0]: np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    y, hits = np.zeros_like(x), 0
    for b, t in np.ndindex(x.shape[:2]):
        logits = x[b, t] @ w["router_DX"] + w["router_b_X"]
        idx = np.argsort(-logits)[:2]
        comb = np.exp(logits[idx] - logits[idx].max())
        for c, e in zip(comb / comb.sum(), idx):
            h = np.einsum("d,dai->ai", x[b, t], w["wi_XDAI"][e]) + w["bi_XAI"][e]
            hits += int((h[0] > 7).sum() + (np.abs(h[1]) > 7).sum())
            y[b, t] += c * (clamped_swiglu_np(h[0], h[1]) @ w["wo_XID"][e] + w["bo_XD"][e])
    return y, hits


@pytest.mark.parametrize("impl", ["dense", "capacity", "dropless"])
def test_gpt_oss_moe_matches_the_formula_in_every_dispatch(impl):
    layer = gpt_oss_moe_layer(impl)
    x = randn(2, 7, 8)
    y, aux = layer(jnp.asarray(x, jnp.float32))
    want, hits = gpt_oss_moe_np(layer, x)
    assert hits > 10  # the clamps are exercised
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert float(aux["moe_dropped"][0]) == 0.0


def test_expert_biases_get_the_same_gradients_in_every_dispatch():
    x = jnp.asarray(randn(2, 7, 8), jnp.float32)
    grads = {}
    for impl in ("dense", "capacity", "dropless"):
        g = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(gpt_oss_moe_layer(impl))
        grads[impl] = {k: np.asarray(getattr(g, k)[...]) for k in ("router_b_X", "bi_XAI", "bo_XD", "wi_XDAI")}
    for impl in ("capacity", "dropless"):
        for k, v in grads[impl].items():
            np.testing.assert_allclose(v, grads["dense"][k], rtol=1e-4, atol=1e-5, err_msg=f"{impl} {k}")
    assert np.abs(grads["dense"]["router_b_X"]).max() > 1e-3  # the bias changes the combine weights


def test_moe_bias_options_move_no_draw_and_count_as_active():
    spec = LayerSpec(d_model=8, num_heads=2, d_ff=6, mlp="swiglu_clamped")
    plain = MoEFFN(spec, MoEOptions(num_experts=4, top_k=2), rngs=nnx.Rngs(0))
    biased = MoEFFN(spec, MoEOptions(**GPT_OSS_MOE), rngs=nnx.Rngs(0))
    for name in ("router_DX", "wi_XDAI", "wo_XID"):
        np.testing.assert_array_equal(getattr(plain, name)[...], getattr(biased, name)[...])
    assert biased.router_b_X.shape == (4,) and biased.bi_XAI.shape == (4, 2, 6) and biased.bo_XD.shape == (4, 8)
    assert biased.active_params() - plain.active_params() == 4 + 2 * (2 * 6 + 8)  # router bias + k experts' biases


def test_expert_parallel_dispatch_adds_the_expert_biases():
    """The dropless dispatch with the experts split over 4 fake devices (shard_map + all_to_all)
    gives the one-device numbers with router and expert biases and the clamped SwiGLU."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from glocal import sharding as shd
        from tests.test_gpt_oss_pieces import gpt_oss_moe_layer
        layer = gpt_oss_moe_layer("dropless")
        graph, params = nnx.split(layer)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 8)), jnp.float32)
        f = jax.jit(lambda p, x: nnx.merge(graph, p)(x)[0])
        one = f(params, x)
        mesh = shd.make_mesh(shd.mesh_shape({"expert": 4}, 4))
        with jax.set_mesh(mesh), shd.use_rules(shd.rule_table("fsdp")):
            text = f.lower(params, x).as_text()
            split = f(params, x)
        diff = np.abs(np.asarray(split) - np.asarray(one)).max()
        print("ALL_TO_ALL", text.count("all_to_all"), "DIFF", float(diff))
    """)
    root = str(pathlib.Path(__file__).resolve().parents[1])  # (the child imports tests.*)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert "ALL_TO_ALL" in out.stdout, out.stderr[-2000:]
    counts, diff = out.stdout.split("ALL_TO_ALL")[1].split("DIFF")
    assert int(counts) >= 2 and float(diff) < 1e-5, out.stdout


@pytest.mark.parametrize("family, overrides, message", [
    ("transformer", {"rope_scaling": "yarn", "rope_beta_fast": 1.0}, r"yarn needs 0 < rope_beta_slow < rope_beta_fast"),
    ("transformer", {"rope_scaling": "yarn", "rope_attention_factor": 0}, r"rope_attention_factor=0.0 must be positive"),
    ("transformer", {"rope_scaling": "yarn", "rope_factor": 0}, r"rope scaling factor must be positive"),
    ("transformer", {"rope_scaling": "ntk"}, r"unknown rope scaling 'ntk'.*'yarn'"),
    ("transformer", {"mlp": "swiglu_clamped", "swiglu_limit": 0}, r"swiglu_limit=0.0: mlp='swiglu_clamped' needs"),
])
def test_bad_values_are_one_line_config_errors(family, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        gm.get_config(family, "tiny", **{k: str(v) for k, v in overrides.items()})  # as the CLI passes them
    assert "\n" not in str(e.value)


def test_gpt_oss_preset_on_eight_devices_trains_like_one(sharded):
    """(tests/sharded_check.py trains the preset through the trainer on 1 and on 8 devices:
    sinks over the heads axis, the biased router and experts under the fsdp_tp table.)"""
    r = sharded["models"]["moe_gpt_oss_tiny"]
    np.testing.assert_allclose(r["fsdp_tp"], r["one"], rtol=1e-5)
    assert r["param_rel_diff"] < 1e-5, r["param_rel_diff"]
