"""GPT-OSS against transformers itself: a tiny random ``GptOssForCausalLM`` (window 4 / global
layers, learned sinks, q/k/v/o biases, YaRN over a 16-token original context, biased router
and experts, clamped SwiGLU; every weight perturbed, sinks and router bias by N(0, 1), the
gate/up biases scaled so the clamps trigger) imports with the same logits (<= 1e-4, float32,
past the window and the original context), decodes like its forward and continues 32 tokens
greedily as transformers' generate; a glocal model of that shape exports to a folder
transformers loads with the same numbers; import -> export -> import is bitwise and the files
hold the original tensors; config.json defaults (GPT-OSS's implicit YaRN x32) and refusals.
YaRN through another family (Llama) is checked the same way."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GptOssForCausalLM"):
    pytest.skip("this transformers has no GPT-OSS (added in 4.55)", allow_module_level=True)

import glocal  # noqa: E402
import glocal.hf  # noqa: E402
import glocal.models as gm  # noqa: E402
from glocal.hf import safetensors as st  # noqa: E402
from glocal.hf.configs import HFConfigError, to_glocal  # noqa: E402
from glocal.hf.weights import HFWeightsError  # noqa: E402
from tests.lm_checks import assert_decode_matches  # noqa: E402
from tests.test_hf import hf_greedy, hf_logits, params_of  # noqa: E402

torch.set_num_threads(1)
V, CONTEXT = 97, 128
YARN = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 16, "rope_theta": 150_000.0}
HF = dict(vocab_size=V, hidden_size=32, intermediate_size=12, num_hidden_layers=4, num_attention_heads=4,
          num_key_value_heads=2, head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
          max_position_embeddings=CONTEXT, rope_parameters=YARN, rms_norm_eps=1e-5, attn_implementation="eager")


def hf_model(seed=0, **overrides):
    config = transformers.GptOssConfig(**{**HF, **overrides})
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((1.0 if name.endswith(("sinks", "router.bias")) else 0.3) * torch.randn_like(p))
        for layer in model.model.layers:  # pre-activations past the limit 7: both clamps act
            layer.mlp.experts.gate_up_proj_bias.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt_oss"
    hf_model().save_pretrained(path)
    return path


def test_import_matches_transformers(folder):
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = glocal.hf.from_pretrained(folder)
    cfg, m = model.config, model.config.options["moe"]
    assert gm.model_name(cfg) == "moe" and cfg.layer_pattern == "sg" and cfg.options["window"].size == 4
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_context, cfg.rope_truncate) == ("yarn", 8.0, 16, False)
    assert cfg.attn_sinks and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp == "swiglu_clamped"
    assert m.router_bias and m.expert_bias and m.router_weights == "renorm"
    bias = st.CheckpointReader(folder).get("model.layers.0.mlp.experts.gate_up_proj_bias")  # the clamps act
    assert (bias[:, 0::2] > 7).any() and (np.abs(bias[:, 1::2]) > 7).any()
    x = np.random.default_rng(1).integers(0, V, (2, 40))  # past the window (4) and the original context (16)
    diff = np.abs(np.asarray(model(jnp.asarray(x))[0]) - hf_logits(ref, x)).max()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    assert_decode_matches(model, jnp.asarray(x, jnp.int32), [3, 16])  # one prompt length per row
    prompt = np.random.default_rng(2).integers(0, V, 24).tolist()
    assert glocal.generate(model, [prompt], 32)[0] == hf_greedy(ref, prompt, 32)


def test_import_export_import_is_bitwise(folder, tmp_path):
    first = glocal.hf.from_pretrained(folder)
    assert glocal.hf.save_pretrained(first, tmp_path / "again") == "hf"
    second = glocal.hf.from_pretrained(tmp_path / "again")
    assert second.config == first.config
    a, b = params_of(first), params_of(second)
    assert len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
    src, out = st.CheckpointReader(folder), st.CheckpointReader(tmp_path / "again")
    assert sorted(src.keys()) == sorted(out.keys())
    assert all(np.array_equal(src.get(n), out.get(n)) for n in src.keys())
    layer = "model.layers.1."  # one layer's tensors, as transformers names and shapes them
    assert {n[len(layer):]: list(src.info(n)[0]) for n in src.keys() if n.startswith(layer)} == {
        "input_layernorm.weight": [32], "post_attention_layernorm.weight": [32],
        "self_attn.q_proj.weight": [32, 32], "self_attn.q_proj.bias": [32], "self_attn.k_proj.weight": [16, 32],
        "self_attn.k_proj.bias": [16], "self_attn.v_proj.weight": [16, 32], "self_attn.v_proj.bias": [16],
        "self_attn.o_proj.weight": [32, 32], "self_attn.o_proj.bias": [32], "self_attn.sinks": [4],
        "mlp.router.weight": [4, 32], "mlp.router.bias": [4], "mlp.experts.gate_up_proj": [4, 32, 24],
        "mlp.experts.gate_up_proj_bias": [4, 24], "mlp.experts.down_proj": [4, 12, 32],
        "mlp.experts.down_proj_bias": [4, 32]}
    gate_up = src.get(layer + "mlp.experts.gate_up_proj")  # interleaved columns: gate even, up odd
    np.testing.assert_array_equal(np.asarray(first.decoder.units.layers[1].ffn.wi_XDAI[...][0]),
                                  np.stack([gate_up[..., 0::2], gate_up[..., 1::2]], axis=2))


def perturbed(model, seed=0, scale=0.1):
    """Every parameter + N(0, scale) (the zero-initialised biases included; at 0.3 this 64-wide
    model is ill-conditioned enough that transformers' own float32 logits differ from its
    float64 ones by 2e-4)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda v: v + scale * jax.random.normal(next(keys), v.shape, v.dtype), params)
    return nnx.merge(graphdef, params, rest)


def test_glocal_model_exports_to_transformers(tmp_path):
    model = perturbed(gm.build("moe", "gpt_oss_tiny", seed=3, vocab_size=V, max_seq_len=CONTEXT))
    assert glocal.hf.save_pretrained(model, tmp_path / "out") == "hf"
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["architectures"] == ["GptOssForCausalLM"] and hf["model_type"] == "gpt_oss"
    assert hf["layer_types"] == ["sliding_attention", "full_attention"] * 2 and hf["sliding_window"] == 8
    assert (hf["head_dim"], hf["attention_bias"], hf["num_local_experts"], hf["intermediate_size"]) == (16, True, 4, 48)
    assert hf["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 150_000.0, "factor": 8.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32}
    assert "rope_scaling" not in hf and "rope_theta" not in hf and (hf["swiglu_alpha"], hf["swiglu_limit"]) == (1.702, 7.0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    x = np.random.default_rng(4).integers(0, V, (2, 40))  # past the window (8) and the original context (32)
    diff = np.abs(np.asarray(model(jnp.asarray(x))[0]) - hf_logits(ref, x)).max()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    back = glocal.hf.from_pretrained(tmp_path / "out")
    assert all(np.array_equal(a, b) for a, b in zip(params_of(model), params_of(back)))


def test_an_unscaled_export_writes_the_default_rope_explicitly(tmp_path):
    model = gm.build("moe", "gpt_oss_tiny", vocab_size=V, rope_scaling=None)
    glocal.hf.save_pretrained(model, tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 150_000.0}
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").rope_parameters["rope_type"] == "default"
    assert glocal.hf.from_pretrained(tmp_path / "out").config.rope_scaling is None


def hf_config(**changes):
    hf = {k: v for k, v in transformers.GptOssConfig(**HF).to_dict().items() if k != "rope_parameters"}
    return {**hf, "architectures": ["GptOssForCausalLM"], **changes}


@pytest.mark.parametrize("changes", [{}, {"rope_scaling": None}, {"rope_parameters": None}])
def test_a_missing_rope_is_yarn_x32_as_in_transformers(changes):
    hf = hf_config(**changes)
    hf.pop("layer_types")
    cfg = to_glocal(hf)[1]
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_context, cfg.rope_truncate, cfg.rope_theta) == (
        "yarn", 32.0, 4096, False, 150_000.0)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_attention_factor) == (32.0, 1.0, None)
    assert cfg.layer_pattern == "sg"  # sliding first, as transformers' default layer_types


def test_config_keys_and_their_defaults():
    cfg = to_glocal(hf_config(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, attention_bias=False,
                              num_local_experts=None, num_experts=6, layer_types=["full_attention"] * 4))[1]
    assert cfg.rope_scaling is None and cfg.rope_theta == 5000.0 and cfg.layer_pattern == "g"
    assert not cfg.qkv_bias and not cfg.attn_out_bias and cfg.options["moe"].num_experts == 6
    cfg = to_glocal(hf_config(swiglu_alpha=1.5, swiglu_limit=5.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
        "mscale_all_dim": 0.5}))[1]
    assert (cfg.swiglu_alpha, cfg.swiglu_limit, cfg.rope_truncate) == (1.5, 5.0, True)  # truncate: true when absent
    assert cfg.rope_attention_factor == pytest.approx((0.1 * np.log(4) + 1) / (0.05 * np.log(4) + 1), rel=1e-15)


def test_what_glocal_cannot_represent_is_refused(folder, tmp_path):
    with pytest.raises(HFConfigError, match="quantization_config.*MXFP4"):
        to_glocal(hf_config(quantization_config={"quant_method": "mxfp4"}))
    with pytest.raises(HFConfigError, match="rope scaling type 'longrope'"):
        to_glocal(hf_config(rope_parameters={"rope_type": "longrope", "factor": 2.0}))
    # MXFP4 expert tensors beside the config: one line, before any weight is read.
    src = st.CheckpointReader(folder)
    tensors = [(n, tuple(src.info(n)[0]), np.dtype(np.float32), lambda n=n: src.get(n)) for n in src.keys()]
    blocks = np.zeros((4, 24, 2, 16), np.uint8)
    tensors.append(("model.layers.0.mlp.experts.gate_up_proj_blocks", blocks.shape, blocks.dtype, lambda: blocks))
    (tmp_path / "q").mkdir()
    st.write_checkpoint(tmp_path / "q", tensors)
    (tmp_path / "q" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(HFWeightsError, match=r"MXFP4-quantised expert tensors \(e.g. .*gate_up_proj_blocks\)"):
        glocal.hf.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("overrides,match", [
    (dict(swiglu_alpha=1.5), r"swiglu_alpha=1.5, swiglu_limit=7.0: transformers before 5.25 ignores"),
    ({"moe.expert_bias": False}, r"moe.expert_bias=False \(GPT-OSS: True\)"),
    (dict(attn_out_bias=False), r"qkv_bias=True with attn_out_bias=False"),
    (dict(attn_sinks=False), r"attn_sinks=False \(GPT-OSS: True\)"),
    (dict(num_layers=2, first_dense_layers=1, layer_pattern="s"), r"first_dense_layers=1"),
])
def test_export_refuses_what_gpt_oss_cannot_express(overrides, match, tmp_path):
    with pytest.raises(HFConfigError, match=match) as e:
        glocal.hf.save_pretrained(gm.build("moe", "gpt_oss_tiny", **overrides), tmp_path / "x", format="hf")
    assert "\n" not in str(e.value)


def test_yarn_in_another_family_imports_and_exports(tmp_path):
    """A Llama with YaRN (transformers 4's rope_scaling spelling; truncate and the attention
    factor left to their defaults) past its original context, out and back in."""
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10_000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path / "llama")
    model = glocal.hf.from_pretrained(tmp_path / "llama")
    cfg = model.config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_context, cfg.rope_truncate) == ("yarn", 4.0, 16, True)
    x = np.random.default_rng(5).integers(0, V, (2, 48))
    diff = np.abs(np.asarray(model(jnp.asarray(x))[0]) - hf_logits(ref, x)).max()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    assert glocal.hf.save_pretrained(model, tmp_path / "out") == "hf"
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": True}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(back, x), hf_logits(ref, x))
    assert glocal.hf.from_pretrained(tmp_path / "out").config == cfg
