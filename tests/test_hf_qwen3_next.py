"""Qwen3-Next against transformers itself: a tiny random ``Qwen3NextForCausalLM`` (Gated
DeltaNet + gated attention, 3:1; MoE with a gated shared expert; every weight perturbed,
including the zero-initialised norm offsets and the decay parameters) imports with the same
logits (<= 1e-4, float32, across delta-rule chunk boundaries) and the same 32-token greedy
continuation (transformers' own CPU delta rule and cache are the oracle); a glocal model of
that shape exports to a folder transformers loads with the same numbers; import -> export ->
import is bitwise, and the files hold the original tensors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3NextForCausalLM"):
    pytest.skip("this transformers has no Qwen3-Next (added in 4.57)", allow_module_level=True)

import glocal  # noqa: E402
import glocal.hf  # noqa: E402
import glocal.models as gm  # noqa: E402
from glocal.hf import safetensors as st  # noqa: E402
from glocal.hf.configs import HFConfigError  # noqa: E402
from tests.test_hf import hf_greedy, hf_logits, params_of  # noqa: E402

torch.set_num_threads(1)
V, CONTEXT = 97, 96
HF = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
          rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5},
          linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2,
          linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          shared_expert_intermediate_size=48, initializer_range=0.1, attn_implementation="eager")


def hf_model(seed=0, **overrides):
    config = transformers.Qwen3NextConfig(**{**HF, **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(config).eval()
    with torch.no_grad():  # zero offsets, ones and constants at init: randomise them all
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("dt_bias", "A_log")):
                p.uniform_(-0.5, 0.5) if "linear_attn.norm" not in name else p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "qwen3_next"
    hf_model().save_pretrained(path)
    return path


def test_import_matches_transformers(folder):
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = glocal.hf.from_pretrained(folder)
    cfg = model.config
    assert gm.model_name(cfg) == "moe" and cfg.layer_pattern == "dddg" and cfg.rope_fraction == 0.5
    x = np.random.default_rng(1).integers(0, V, (2, 80))  # > 64: transformers' chunk boundary
    diff = np.abs(np.asarray(model(jnp.asarray(x))[0]) - hf_logits(ref, x)).max()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
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


def test_glocal_model_exports_to_transformers(tmp_path):
    model = gm.build("moe", "qwen3_next_tiny", seed=3, vocab_size=V, max_seq_len=CONTEXT, norm_eps=1e-5,
                     **{"gated_delta.norm_eps": 1e-5})
    assert glocal.hf.save_pretrained(model, tmp_path / "out") == "hf"
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3NextForCausalLM"] and hf["layer_types"][3] == "full_attention"
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    x = np.random.default_rng(4).integers(0, V, (2, 40))
    diff = np.abs(np.asarray(model(jnp.asarray(x))[0]) - hf_logits(ref, x)).max()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    back = glocal.hf.from_pretrained(tmp_path / "out")
    assert all(np.array_equal(a, b) for a, b in zip(params_of(model), params_of(back)))


@pytest.mark.parametrize("changes,match", [
    (dict(mlp_only_layers=[2]), "mlp_only_layers"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(layer_types=["linear_attention"] * 3 + ["sliding_attention"]), "layer_types"),
])
def test_unsupported_configs_are_named(changes, match):
    hf = {**transformers.Qwen3NextConfig(**HF).to_dict(), **changes}
    with pytest.raises(HFConfigError, match=match):
        glocal.hf.configs.to_glocal(hf)


def test_export_refuses_what_qwen3_next_cannot_express(tmp_path):
    model = gm.build("moe", "qwen3_next_tiny", vocab_size=V, max_seq_len=CONTEXT)  # delta norm eps 1e-6 = norm_eps
    with pytest.raises(HFConfigError, match=r"gated_delta.norm_eps=1e-05 differs from norm_eps=1e-06"):
        glocal.hf.save_pretrained(gm.build("moe", "qwen3_next_tiny", **{"gated_delta.norm_eps": 1e-5}), tmp_path / "a",
                                  format="hf")
    with pytest.raises(HFConfigError, match="qk_norm=False"):
        glocal.hf.save_pretrained(gm.build("moe", "qwen3_next_tiny", qk_norm=False), tmp_path / "b", format="hf")
    assert glocal.hf.save_pretrained(model, tmp_path / "c") == "hf"
