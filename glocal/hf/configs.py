"""Hugging Face ``config.json`` <-> glocal configs, field by field.

    LlamaForCausalLM    <-> transformer (layer_pattern "g")
    MistralForCausalLM  <-> transformer, every layer a sliding window (layer_pattern "s")
    Qwen2ForCausalLM    <-> transformer with qkv_bias (layer_types -> a "g"/"s" pattern)
    Qwen3ForCausalLM    <-> transformer with qk_norm (the same layer types)
    MixtralForCausalLM  <-> moe: top-k of num_experts, softmax over the chosen k, every layer
    Qwen3NextForCausalLM <-> moe with Gated DeltaNet layers ("dddg"), gated attention and a
                             gated shared expert (glocal.hf.qwen3_next)
    GptOssForCausalLM   <-> moe with window / global layers ("sg"), learned sinks, attention
                            biases, YaRN, biased router and experts, clamped SwiGLU
                            (glocal.hf.gpt_oss)

RoPE scaling (any architecture): ``linear``, ``llama3`` and ``yarn`` (``rope_scaling`` or
``rope_parameters``), read and written back.

Every field that changes the function a checkpoint computes is read explicitly; a value
glocal cannot represent (a rope scaling type, biases, another activation, quantisation)
is an ``HFConfigError`` naming the field, never a silently different model. Fields that
only matter to training or serving elsewhere (dropout, ``use_cache``, token ids) are
ignored on import and written back on export.

Window semantics: Hugging Face lets query ``i`` see key ``j`` when ``i - W < j <= i``, i.e.
``W`` tokens including itself, which is glocal's ``sliding_window`` exactly. A window at
least as long as the context is plain causal attention and imports as a global layer.
"""

from __future__ import annotations

import warnings

from glocal.errors import UserError
from glocal.hf import gpt_oss, qwen3_next

ARCHITECTURES = {  # HF class -> (family, kind)
    "LlamaForCausalLM": ("transformer", "llama"),
    "MistralForCausalLM": ("transformer", "mistral"),
    "Qwen2ForCausalLM": ("transformer", "qwen2"),
    "Qwen3ForCausalLM": ("transformer", "qwen3"),
    "MixtralForCausalLM": ("moe", "mixtral"),
    "Qwen3NextForCausalLM": ("moe", "qwen3_next"),  # glocal.hf.qwen3_next
    "GptOssForCausalLM": ("moe", "gpt_oss"),  # glocal.hf.gpt_oss
}
MODEL_TYPES = {kind: arch for arch, (_, kind) in ARCHITECTURES.items()}

# What transformers (5.18) assumes for a key config.json leaves out, per architecture: a
# missing key must mean what it means there. (An explicit null kv-head count means "as many
# as query heads" everywhere; a null head_dim means width / heads.)
_COMMON = dict(rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", head_dim=None)
DEFAULTS = {
    "llama": dict(_COMMON, num_key_value_heads=None, max_position_embeddings=2048),
    "mistral": dict(_COMMON, num_key_value_heads=8, max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(_COMMON, num_key_value_heads=32, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
    "qwen3": dict(_COMMON, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "mixtral": dict(_COMMON, rope_theta=1_000_000.0, rms_norm_eps=1e-5, num_key_value_heads=8,
                    max_position_embeddings=131072, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.001),
    "gpt_oss": gpt_oss.DEFAULTS,
}


def field(hf: dict, kind: str, name: str):
    """``hf[name]``, or what transformers assumes when config.json leaves it out."""
    return hf[name] if name in hf else DEFAULTS[kind].get(name)


class HFConfigError(UserError, ValueError):
    """A Hugging Face config that glocal cannot represent exactly (or an export target
    the glocal model does not fit)."""


def architecture(hf: dict) -> str:
    """The HF class name a config describes (``architectures[0]``, else from ``model_type``)."""
    archs = hf.get("architectures") or []
    if archs:
        arch = archs[0]
    elif hf.get("model_type") in MODEL_TYPES:
        arch = MODEL_TYPES[hf["model_type"]]
    else:
        arch = None
    if arch not in ARCHITECTURES:
        raise HFConfigError(f"config.json describes {arch or hf.get('model_type') or 'an unnamed model'!r}; glocal "
                            f"imports {', '.join(ARCHITECTURES)} (causal LMs of those shapes).")
    return arch


def rope_fields(hf: dict, kind: str = "llama") -> dict:
    """glocal's rope fields from ``rope_theta`` + ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5; a non-empty ``rope_scaling`` wins, as there): no
    scaling, ``linear``, ``llama3`` or ``yarn``; other scalings (dynamic NTK, LongRoPE) and
    different parameters per layer type are refused."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    nested = [v for v in params.values() if isinstance(v, dict)]
    if nested:  # per layer type ({"full_attention": {...}, "sliding_attention": {...}})
        if any(v != nested[0] for v in nested) or len(nested) != len(params):
            raise HFConfigError("config.json rope_parameters differ per layer type; glocal uses one RoPE for every "
                                "layer.")
        params = dict(nested[0])
    kind_ = params.get("rope_type", params.get("type")) or "default"
    theta = float(params.get("rope_theta", field(hf, kind, "rope_theta")))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFConfigError("config.json partial_rotary_factor != 1 (RoPE on part of each head) is not supported.")
    if kind_ == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind_ not in ("linear", "llama3", "yarn"):
        raise HFConfigError(f"rope scaling type {kind_!r} (config.json rope_scaling / rope_parameters) is not "
                            f"supported: glocal implements none, 'linear', 'llama3' and 'yarn'. Dropping the scaling "
                            f"would give a different model at long context.")
    if kind_ == "yarn":
        return {"rope_theta": theta, **_yarn_fields(hf, kind, params)}
    try:
        fields = {"rope_theta": theta, "rope_scaling": kind_, "rope_factor": float(params["factor"])}
        if kind_ == "llama3":
            original = params.get("original_max_position_embeddings", field(hf, kind, "max_position_embeddings"))
            fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                          rope_high_freq_factor=float(params["high_freq_factor"]),
                          rope_original_context=int(original))
    except KeyError as e:
        raise HFConfigError(f"config.json rope scaling {kind_!r} lacks the field {e.args[0]!r}.") from None
    return fields


def _yarn_fields(hf: dict, kind: str, params: dict) -> dict:
    """glocal's YaRN fields as transformers reads them: a top-level
    ``original_max_position_embeddings`` wins, then the rope dict's, then the context; no
    ``factor`` means context / original; ``beta_*`` 0 or null mean 32 / 1; ``truncate`` true
    when absent; ``mscale`` with ``mscale_all_dim`` (both non-zero) fix the attention factor."""
    from glocal.layers.rope import RopeScaling

    context = field(hf, kind, "max_position_embeddings")
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or context
    factor = params.get("factor")
    factor = float(context / original if factor is None else factor)
    fields = dict(rope_scaling="yarn", rope_factor=factor, rope_original_context=int(original),
                  rope_beta_fast=float(params.get("beta_fast") or 32.0),
                  rope_beta_slow=float(params.get("beta_slow") or 1.0), rope_truncate=bool(params.get("truncate", True)),
                  rope_attention_factor=params.get("attention_factor"))
    if fields["rope_attention_factor"] is None and params.get("mscale") and params.get("mscale_all_dim"):
        fields["rope_attention_factor"] = RopeScaling("yarn", factor, mscale=float(params["mscale"]),
                                                      mscale_all_dim=float(params["mscale_all_dim"])).attention_factor
    elif fields["rope_attention_factor"] is not None:
        fields["rope_attention_factor"] = float(fields["rope_attention_factor"])
    return fields


def rope_config(config) -> dict:
    """The inverse of ``rope_fields`` in transformers 4's spelling, which 5 reads as well."""
    if config.rope_scaling is None:
        return {"rope_theta": config.rope_theta}
    return {"rope_theta": config.rope_theta, "rope_scaling": _scaling(config)}


def rope_parameters(config) -> dict:
    """transformers 5's ``rope_parameters`` of a config, always explicit (``"default"`` when unscaled)."""
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {**_scaling(config), "rope_theta": config.rope_theta}


def _scaling(config) -> dict:
    scaling = {"rope_type": config.rope_scaling, "factor": config.rope_factor}
    if config.rope_scaling == "llama3":
        scaling.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                       original_max_position_embeddings=config.rope_original_context)
    if config.rope_scaling == "yarn":
        scaling.update(original_max_position_embeddings=config.rope_original_context, beta_fast=config.rope_beta_fast,
                       beta_slow=config.rope_beta_slow, truncate=config.rope_truncate)
        if config.rope_attention_factor is not None:
            scaling["attention_factor"] = config.rope_attention_factor
    return scaling


def _require(hf: dict, field: str, ok, what: str) -> None:
    if field in hf and hf[field] is not None and not ok(hf[field]):
        raise HFConfigError(f"config.json {field}={hf[field]!r} is not supported: glocal needs {what}.")


def layer_pattern(hf: dict, kind: str, num_layers: int, context: int) -> tuple[str, int | None]:
    """``(layer_pattern, sliding_window)``: per layer "g" (full causal) or "s" (window),
    folded to the shortest repeating unit."""
    window = field(hf, kind, "sliding_window")
    types = hf.get("layer_types")
    if kind in ("qwen2", "qwen3"):
        if not field(hf, kind, "use_sliding_window"):
            window = None  # (transformers drops the window, whatever layer_types says)
        if types is None:
            start = field(hf, kind, "max_window_layers")
            types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                     for i in range(num_layers)]
    elif kind == "gpt_oss":
        types = types or gpt_oss.default_layer_types(num_layers)
    elif kind in ("mistral", "mixtral"):
        if types:
            raise HFConfigError("config.json layer_types on a Mistral/Mixtral model (alternating attention) is not "
                                "supported; only a window on every layer (or none).")
        types = ["sliding_attention" if window is not None else "full_attention"] * num_layers
    else:  # Llama has no window: transformers ignores the field
        window, types = None, ["full_attention"] * num_layers
    if len(types) != num_layers or set(types) - {"full_attention", "sliding_attention"}:
        raise HFConfigError(f"config.json layer_types={types!r}: glocal reads {num_layers} entries of "
                            f"'full_attention' / 'sliding_attention'.")
    if window is None and "sliding_attention" in types:
        raise HFConfigError("config.json layer_types has sliding_attention layers but no window (sliding_window "
                            "null or use_sliding_window false); transformers cannot run such a model either.")
    if window is not None and window >= context:
        window = None  # sees the whole context: a global layer
    if window is None or "sliding_attention" not in types:
        return "g", None
    letters = "".join("s" if t == "sliding_attention" else "g" for t in types)
    unit = next(p for p in range(1, num_layers + 1) if num_layers % p == 0 and letters[:p] * (num_layers // p) == letters)
    return letters[:unit], int(window)


def to_glocal(hf: dict, dtype: str = "float32"):
    """``(family, config)`` for a Hugging Face config dict."""
    arch = architecture(hf)
    family, kind = ARCHITECTURES[arch]
    if hf.get("quantization_config"):
        mxfp4 = " (GPT-OSS hub checkpoints hold MXFP4 experts: let transformers dequantise and save them)"
        raise HFConfigError(f"config.json has quantization_config: quantised checkpoints are not supported; "
                            f"import the unquantised (float32/bfloat16) weights{mxfp4 if kind == 'gpt_oss' else ''}.")
    if kind == "gpt_oss":  # (its own activation and biases: the checks below are Llama's)
        _positive_sizes(hf)
        fields = gpt_oss.glocal_fields(hf, rope_fields=rope_fields, layer_pattern=layer_pattern)
        return family, _config(family, dict(fields, dtype=dtype, param_dtype=dtype))
    _require(hf, "hidden_act", lambda v: v in ("silu", "swish"), "hidden_act='silu' (SwiGLU)")
    _require(hf, "attention_bias", lambda v: not v, "no q/k/v/o biases (attention_bias=false)")
    _require(hf, "mlp_bias", lambda v: not v, "no MLP biases (mlp_bias=false)")
    _require(hf, "logits_soft_cap", lambda v: False, "no logit soft-capping")
    _positive_sizes(hf)
    if kind == "qwen3_next":
        fields = dict(qwen3_next.glocal_fields(hf, error=HFConfigError, rope_fields=rope_fields), dtype=dtype,
                      param_dtype=dtype)
        return family, _config(family, fields)
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    L = hf["num_hidden_layers"]
    head_dim = field(hf, kind, "head_dim") or D // H
    context = int(field(hf, kind, "max_position_embeddings"))
    pattern, window = layer_pattern(hf, kind, L, context)
    fields = dict(
        vocab_size=hf["vocab_size"], max_seq_len=context, d_model=D, num_layers=L, num_heads=H,
        num_kv_heads=field(hf, kind, "num_key_value_heads") or H, head_dim=None if head_dim * H == D else head_dim,
        d_ff=hf["intermediate_size"], mlp="swiglu", norm="rms", norm_eps=float(field(hf, kind, "rms_norm_eps")),
        **rope_fields(hf, kind), qk_norm=kind == "qwen3", qkv_bias=kind == "qwen2",
        tie_embeddings=bool(field(hf, kind, "tie_word_embeddings")), layer_pattern=pattern, sliding_window=window,
        dtype=dtype, param_dtype=dtype,
    )
    if kind == "mixtral":
        fields.update(num_experts=field(hf, kind, "num_local_experts"), top_k=field(hf, kind, "num_experts_per_tok"),
                      router="token_choice", router_weights="renorm", moe_impl="dropless", shared_experts=0,
                      balance_weight=float(field(hf, kind, "router_aux_loss_coef")), router_z_weight=0.0,
                      moe_every=1, first_dense_layers=0)
    return family, _config(family, fields)


def _positive_sizes(hf: dict) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(name), int) or hf[name] < 1:
            raise HFConfigError(f"config.json field {name} is missing or not a positive integer ({hf.get(name)!r}).")


def _config(family: str, fields: dict):
    import glocal.models as gm

    try:
        return gm.config_class(family).from_dict(fields)  # (flat option names or sections; validates)
    except UserError as e:
        raise HFConfigError(f"config.json maps to a {family} config glocal rejects: {e}") from None


def bos_eos(hf: dict) -> dict:
    """The token-id fields carried through an import/export round trip."""
    return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}


def export_architecture(config, prefer: str | None = None) -> str:
    """The HF class a glocal config exports as (``prefer``, e.g. the class it was imported
    from, when the config still fits it), or an ``HFConfigError`` saying why none fits."""
    from glocal.models.moe import MoEConfig
    from glocal.models.transformer import TransformerConfig

    def refuse(why: str):
        raise HFConfigError(f"this {type(config).__name__} has no Hugging Face twin: {why}. "
                            f"save_pretrained(..., format='glocal') writes safetensors + glocal's config.json instead.")

    if qwen3_next.is_qwen3_next(config):
        why = qwen3_next.export_refusal(config)
        if why:
            refuse(f"{why}; with Gated DeltaNet layers or gated attention the one Hugging Face twin is Qwen3-Next")
        return qwen3_next.ARCH
    if gpt_oss.is_gpt_oss(config):
        why = gpt_oss.export_refusal(config)
        if why:
            refuse(f"{why}; with learned sinks, an attention output bias, router or expert biases or the clamped "
                   f"SwiGLU the one Hugging Face twin is GPT-OSS")
        return gpt_oss.ARCH
    if not isinstance(config, TransformerConfig):
        refuse("only the transformer and moe families map onto Llama/Mistral/Qwen2/Qwen3/Mixtral")
    checks = [("mlp", "swiglu"), ("norm", "rms"), ("attn_softcap", None), ("logit_softcap", None)]
    for name, want in checks:
        if getattr(config, name) != want:
            refuse(f"{name}={getattr(config, name)!r} (Hugging Face's models use {want!r})")
    if config.rope_theta is None:
        refuse("rope_theta=None (no positions)")
    pattern = set(config.layer_pattern)
    if pattern - {"g", "s"}:
        refuse(f"layer_pattern={config.layer_pattern!r} has mixers other than global / sliding-window attention")
    window = config.options.get("window") if "s" in pattern else None
    if window is not None and window.sinks:
        refuse(f"window.sinks={window.sinks} (StreamingLLM sinks: Hugging Face's sliding-window models see only "
               f"the window)")
    if isinstance(config, MoEConfig):
        m = config.options["moe"]
        if m.impl == "capacity":
            warnings.warn("moe_impl='capacity' drops tokens over an expert's capacity; the exported Mixtral is "
                          "dropless, so its outputs differ wherever this model dropped tokens.", stacklevel=3)
        moe = {"moe.router": (m.router, "token_choice"), "moe.router_weights": (m.router_weights, "renorm"),
               "moe.shared_experts": (m.shared_experts, 0), "first_dense_layers": (config.first_dense_layers, 0),
               "moe_every": (config.moe_every, 1), "moe.bias_rate": (m.bias_rate, 0.0)}
        for name, (value, ok) in moe.items():
            if value != ok:
                refuse(f"{name}={value!r} (Mixtral: token-choice top-k renormalised over the "
                       f"chosen experts, every layer routed, no shared experts)")
        if config.qk_norm or config.qkv_bias or pattern == {"g", "s"}:
            refuse("Mixtral has no qk-norm, no q/k/v biases and one attention kind on every layer")
        return "MixtralForCausalLM"
    if config.ffn != "mlp":
        refuse(f"ffn={config.ffn!r} (Llama / Mistral / Qwen layers have a dense SwiGLU MLP; a routed FFN on every "
               f"layer is the moe family, which exports as Mixtral)")
    if config.qkv_bias and config.qk_norm:
        refuse("qkv_bias with qk_norm (Qwen2 has the biases, Qwen3 the norm)")
    if config.qkv_bias:
        return "Qwen2ForCausalLM"
    if config.qk_norm:
        return "Qwen3ForCausalLM"
    if pattern == {"g", "s"}:
        refuse(f"layer_pattern={config.layer_pattern!r} mixes window and global layers (only Qwen2 / Qwen3, "
               f"which have q/k/v biases / qk-norm, express that)")
    if pattern == {"s"}:
        return "MistralForCausalLM"
    return prefer if prefer in ("LlamaForCausalLM", "MistralForCausalLM") else "LlamaForCausalLM"


def to_hf(config, arch: str, dtype: str, extra: dict | None = None) -> dict:
    """The ``config.json`` dict of ``arch`` for a glocal config (checked by
    ``export_architecture``); ``extra`` carries token ids and the like."""
    family, kind = ARCHITECTURES[arch]
    E = config.head_dim or config.d_model // config.num_heads
    types = ["sliding_attention" if config.layer_pattern[i % len(config.layer_pattern)] == "s" else "full_attention"
             for i in range(config.num_layers)]
    hf = dict(
        architectures=[arch], model_type=kind, vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.d_ff, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads or config.num_heads, head_dim=E, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, **rope_config(config),
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, attention_dropout=0.0,
        initializer_range=config.init_std, use_cache=True, torch_dtype=dtype,
    )
    if kind == "llama":
        hf.update(mlp_bias=False, pretraining_tp=1)
    if kind == "qwen2":
        hf.pop("attention_bias")  # (Qwen2's q/k/v biases are not optional)
    if kind in ("mistral", "mixtral"):
        hf["sliding_window"] = window_size(config) if "s" in config.layer_pattern else None
    if kind in ("qwen2", "qwen3"):
        windowed = "sliding_attention" in types
        hf.update(use_sliding_window=windowed, sliding_window=window_size(config) if windowed else None,
                  max_window_layers=types.index("sliding_attention") if windowed else config.num_layers,
                  layer_types=types)
    if kind == "mixtral":  # every layer is routed: the dense width d_ff is unused
        m = config.options["moe"]
        hf.update(intermediate_size=m.d_expert or config.d_ff, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                  router_aux_loss_coef=m.balance_weight, router_jitter_noise=0.0, output_router_logits=False)
    if kind == "qwen3_next":
        hf.update(qwen3_next.hf_fields(config))
    if kind == "gpt_oss":  # transformers 5's rope dict, explicit (a missing one means YaRN x32 there)
        hf.pop("rope_scaling", None)
        hf.pop("rope_theta")
        hf.update(gpt_oss.hf_fields(config, rope_parameters(config)))
    hf.update(extra or {})
    return hf


def window_size(config) -> int | None:
    """The sliding window (``window.size``) of a config with window layers, else None."""
    return config.options["window"].size if "window" in config.options else None


def glocal_config_record(config) -> dict:
    """``config.json`` for a family without a Hugging Face twin (read back by from_pretrained)."""
    import glocal.models as gm

    return {"format": "glocal", "model": gm.model_name(config), "config": config.to_dict()}
