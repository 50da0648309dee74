"""Hugging Face ``GptOssForCausalLM`` <-> glocal's ``moe`` family with GPT-OSS's options.

A GPT-OSS model is a pre-norm decoder whose attention layers alternate a sliding window and
global attention (``layer_types``; sliding first, glocal pattern ``"sg"``) and whose FFNs are
all routed MoEs. In glocal terms: ``attn_sinks`` (a learned logit per query head in every
softmax), ``qkv_bias`` and ``attn_out_bias`` (``attention_bias``), RoPE with YaRN scaling
(``rope_scaling="yarn"``), ``moe.router_bias`` (top-k of the *biased* router logits, softmax
over the k chosen: ``moe.router_weights="renorm"``), ``moe.expert_bias`` and the clamped SwiGLU
(``mlp="swiglu_clamped"``, ``swiglu_alpha``, ``swiglu_limit``). A window of ``sliding_window``
lets a query see that many tokens, itself included: glocal's ``window.size``.

Tensor layouts (letters as in ``glocal/__init__.py``; the experts are stored **in x out**):

    self_attn.{q,k,v,o}_proj (+ .bias)       -> as Qwen2 (``glocal.hf.weights``), o bias -> mixer.attn.o_b_D
    self_attn.sinks [H]                      -> mixer.attn.sinks_H
    mlp.router.weight [X, D] / .bias [X]     -> ffn.router_DX [D, X] / ffn.router_b_X
    mlp.experts.gate_up_proj [X, D, 2I]      -> ffn.wi_XDAI [X, D, 2, I]  (gate = even columns, up = odd)
    mlp.experts.gate_up_proj_bias [X, 2I]    -> ffn.bi_XAI [X, 2, I]      (interleaved likewise)
    mlp.experts.down_proj [X, I, D] / _bias  -> ffn.wo_XID (as is) / ffn.bo_XD [X, D]

What transformers assumes when config.json leaves the rope out (absent or null
``rope_parameters`` / ``rope_scaling``) is YaRN x32 over 4096 tokens with ``truncate`` false,
so an export always writes its rope explicitly (``rope_type "default"`` when unscaled).
Quantised checkpoints (``quantization_config``, MXFP4 ``*_blocks`` / ``*_scales`` expert
tensors) are refused: import weights that transformers has dequantised and saved.
transformers before 5.25 ignores ``swiglu_alpha`` / ``swiglu_limit`` (it hard-codes 1.702 and
7.0), so an export with other values is refused: such a reader would compute another model.
"""

from __future__ import annotations

import numpy as np

from glocal.hf.weights import HFWeightsError, Rule, _t, attention_rules

ARCH, KIND = "GptOssForCausalLM", "gpt_oss"

# What transformers assumes for a key config.json leaves out (5.18 = 5.25).
DEFAULTS = dict(rope_theta=150_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", head_dim=64,
                num_key_value_heads=8, max_position_embeddings=131072, sliding_window=128, num_local_experts=128,
                num_experts_per_tok=4, router_aux_loss_coef=0.001, attention_bias=True, swiglu_alpha=1.702,
                swiglu_limit=7.0)
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
SWIGLU = (1.702, 7.0)  # the (alpha, limit) every transformers version computes


def _get(hf: dict, name: str):
    return hf[name] if hf.get(name) is not None else DEFAULTS.get(name)


def default_layer_types(num_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def glocal_fields(hf: dict, *, rope_fields, layer_pattern) -> dict:
    """The glocal ``moe`` config fields of a GPT-OSS ``config.json`` (``rope_fields`` /
    ``layer_pattern``: the shared readers of ``glocal.hf.configs``, which raise its errors)."""
    L, H = hf["num_hidden_layers"], hf["num_attention_heads"]
    context = int(_get(hf, "max_position_embeddings"))
    hf = dict(hf, layer_types=hf.get("layer_types") or default_layer_types(L))
    pattern, window = layer_pattern(hf, KIND, L, context)
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):  # transformers' GPT-OSS default
        hf["rope_parameters"] = dict(DEFAULT_ROPE)
    X = hf.get("num_local_experts") or hf.get("num_experts") or DEFAULTS["num_local_experts"]  # (an alias there)
    bias = bool(_get(hf, "attention_bias"))
    return dict(
        vocab_size=hf["vocab_size"], max_seq_len=context, d_model=hf["hidden_size"], num_layers=L, num_heads=H,
        num_kv_heads=_get(hf, "num_key_value_heads") or H, head_dim=hf.get("head_dim") or hf["hidden_size"] // H,
        d_ff=hf["intermediate_size"], mlp="swiglu_clamped", swiglu_alpha=float(_get(hf, "swiglu_alpha")),
        swiglu_limit=float(_get(hf, "swiglu_limit")), norm="rms", norm_eps=float(_get(hf, "rms_norm_eps")),
        **rope_fields(hf, KIND), qk_norm=False, qkv_bias=bias, attn_out_bias=bias, attn_sinks=True,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings")), layer_pattern=pattern, sliding_window=window,
        moe_every=1, first_dense_layers=0,
        moe=dict(num_experts=int(X), top_k=int(_get(hf, "num_experts_per_tok")), d_expert=hf["intermediate_size"],
                 router="token_choice", router_weights="renorm", impl="dropless", shared_experts=0,
                 router_bias=True, expert_bias=True, balance_weight=float(_get(hf, "router_aux_loss_coef")),
                 z_weight=0.0),
    )


def is_gpt_oss(config) -> bool:
    """Whether a glocal config has a piece only GPT-OSS expresses (then it exports as that class only)."""
    m = config.options.get("moe") if hasattr(config, "options") else None
    return bool(getattr(config, "attn_sinks", False) or getattr(config, "attn_out_bias", False)
                or getattr(config, "mlp", None) == "swiglu_clamped"
                or (m is not None and (m.router_bias or m.expert_bias)))


def export_refusal(config) -> str | None:
    """Why ``config`` is not a GPT-OSS model (None if it is)."""
    from glocal.models.moe import MoEConfig

    if not isinstance(config, MoEConfig):
        return "GPT-OSS layers are routed: build it in the moe family"
    want = dict(norm="rms", mlp="swiglu_clamped", qk_norm=False, attn_sinks=True, attn_output_gate=False,
                attn_softcap=None, logit_softcap=None, rope_fraction=1.0, first_dense_layers=0, moe_every=1)
    for name, value in want.items():
        if getattr(config, name) != value:
            return f"{name}={getattr(config, name)!r} (GPT-OSS: {value!r})"
    if config.rope_theta is None:
        return "rope_theta=None (GPT-OSS has RoPE)"
    if config.qkv_bias != config.attn_out_bias:
        return (f"qkv_bias={config.qkv_bias} with attn_out_bias={config.attn_out_bias} (GPT-OSS's attention_bias is "
                f"one switch for the q/k/v and output biases)")
    if (config.swiglu_alpha, config.swiglu_limit) != SWIGLU:
        return (f"swiglu_alpha={config.swiglu_alpha}, swiglu_limit={config.swiglu_limit}: transformers before 5.25 "
                f"ignores those config.json keys and computes {SWIGLU}, so the export would load as another model")
    if set(config.layer_pattern) - {"g", "s"}:
        return f"layer_pattern={config.layer_pattern!r} (GPT-OSS layers are 's' window or 'g' global attention)"
    if "window" in config.options and getattr(config.options["window"], "sinks", 0):
        return "window.sinks (StreamingLLM sink tokens; GPT-OSS's sinks are learned logits, attn_sinks)"
    m = config.options["moe"]
    moe = dict(router=(m.router, "token_choice"), router_weights=(m.router_weights, "renorm"),
               shared_experts=(m.shared_experts, 0), bias_rate=(m.bias_rate, 0.0), router_bias=(m.router_bias, True),
               expert_bias=(m.expert_bias, True))
    for name, (value, ok) in moe.items():
        if value != ok:
            return f"moe.{name}={value!r} (GPT-OSS: {ok!r})"
    return None


def hf_fields(config, rope_parameters: dict) -> dict:
    """The GPT-OSS part of ``config.json`` for a glocal config ``export_refusal`` accepts
    (``rope_parameters``: transformers 5's rope dict, always explicit)."""
    m = config.options["moe"]
    P = config.layer_pattern
    types = ["sliding_attention" if P[i % len(P)] == "s" else "full_attention" for i in range(config.num_layers)]
    window = config.options["window"].size if "s" in P else None
    E = config.head_dim or config.d_model // config.num_heads
    return dict(layer_types=types, sliding_window=window, head_dim=E,
                intermediate_size=m.d_expert or config.d_ff, num_local_experts=m.num_experts,
                num_experts_per_tok=m.top_k, attention_bias=config.qkv_bias, rope_parameters=rope_parameters,
                swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit,
                router_aux_loss_coef=m.balance_weight, output_router_logits=False)


def check_tensor_names(names, folder) -> None:
    """Refuse MXFP4-quantised expert tensors (``*_blocks`` / ``*_scales``) in one line."""
    quantised = sorted(n for n in names if n.endswith(("_blocks", "_scales")))
    if quantised:
        raise HFWeightsError(f"{folder} holds MXFP4-quantised expert tensors (e.g. {quantised[0]}); glocal imports "
                             f"float32/bfloat16 weights only: let transformers dequantise the model and save it first.")


def _interleave(w):
    """``[..., 2, I]`` -> ``[..., 2I]`` with gate columns even, up columns odd."""
    return np.stack([w[..., 0, :], w[..., 1, :]], axis=-1).reshape(*w.shape[:-2], -1)


def _split(w):
    """``[..., 2I]`` (gate even, up odd) -> ``[..., 2, I]``."""
    return np.stack([w[..., 0::2], w[..., 1::2]], axis=-2)


def layer_rules(config, i: int, *, fused_experts: bool = False) -> list[Rule]:
    """Every rule of decoder layer ``i`` of a GPT-OSS config (``fused_experts``: unused, the
    experts have one layout)."""
    del fused_experts
    pre, D, H = f"model.layers.{i}.", config.d_model, config.num_heads
    K, E = config.num_kv_heads or H, config.head_dim or config.d_model // H
    m = config.options["moe"]
    X, I = m.num_experts, m.d_expert or config.d_ff  # noqa: E741 - the legend's FFN width
    a, f = pre + "self_attn.", pre + "mlp."
    same = lambda path, name, shape: Rule(path, (name,), (shape,), lambda w: w, lambda w: (w,))
    rules = attention_rules(pre, D, H, K, E, qk_norm=False, qkv_bias=config.qkv_bias)
    if config.attn_out_bias:
        rules.append(same("mixer.attn.o_b_D", a + "o_proj.bias", (D,)))
    return rules + [
        same("mixer.attn.sinks_H", a + "sinks", (H,)),
        Rule("ffn.router_DX", (f + "router.weight",), ((X, D),), _t, lambda w: (_t(w),)),
        same("ffn.router_b_X", f + "router.bias", (X,)),
        Rule("ffn.wi_XDAI", (f + "experts.gate_up_proj",), ((X, D, 2 * I),), _split, lambda w: (_interleave(w),)),
        Rule("ffn.bi_XAI", (f + "experts.gate_up_proj_bias",), ((X, 2 * I),), _split, lambda w: (_interleave(w),)),
        same("ffn.wo_XID", f + "experts.down_proj", (X, I, D)),
        same("ffn.bo_XD", f + "experts.down_proj_bias", (X, D)),
    ]
