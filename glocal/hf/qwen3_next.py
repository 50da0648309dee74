"""Hugging Face ``Qwen3NextForCausalLM`` <-> glocal's ``moe`` family with Gated DeltaNet layers.

A Qwen3-Next model is a pre-norm decoder whose mixers alternate Gated DeltaNet
(``linear_attention``, glocal kind ``gated_delta``, letter ``d``) and gated full attention
(``full_attention``, letter ``g``; 3:1 by default, pattern ``"dddg"``) and whose FFNs are a
routed MoE with a sigmoid-gated shared expert. In glocal terms: ``norm="rms_centered"`` (every
RMSNorm stores ``w`` and scales by ``1 + w``; the delta layer's output norm is plain),
``qk_norm``, ``attn_output_gate``, ``rope_fraction`` (RoPE on the first part of each head),
``moe.shared_experts=1`` with ``moe.d_shared`` and ``moe.shared_gate``.

Tensor layouts (HF ``[out, in]``; letters as in ``glocal/__init__.py``; for the delta layers
K key heads, H value heads, Y = H / K, F / E key / value head widths, W conv taps):

    linear_attn.in_proj_qkvz [K (2F + 2YE), D]  -> mixer.in_DKA [D, K, 2F + 2YE]   (per key head:
                                                    q F | k F | v YE | z YE)
    linear_attn.in_proj_ba [2H, D]              -> mixer.ba_DKA [D, K, 2Y]          (b Y | a Y)
    linear_attn.conv1d [2KF + HE, 1, W]         -> mixer.conv_{q,k}_WKF, conv_v_WHE (channels: all q,
                                                    all k, all v)
    linear_attn.A_log, dt_bias [H], norm [E]    -> mixer.A_log_H, dt_bias_H, norm_E
    linear_attn.out_proj [D, HE]                -> mixer.o_HED
    self_attn.q_proj [2 H E, D]                 -> q part of mixer.attn.qkv_DKAE and mixer.attn.gate_DHE
                                                    (per head: q E | gate E)
    mlp.shared_expert.{gate,up,down}_proj       -> ffn.shared.wi_DAI, wo_ID
    mlp.shared_expert_gate [1, D]               -> ffn.shared_gate_D1 [D, 1]
The rest (k/v/o projections, q/k norms, router, experts, embeddings) is laid out as for
Qwen3 and Mixtral (``glocal.hf.weights``). Checkpoints' multi-token-prediction tensors
(``mtp.*``) are not part of the language model and are skipped, as transformers does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glocal.hf.weights import Rule, _t, attention_rules, mlp_rules, mixtral_rules, norm_rule

ARCH, KIND = "Qwen3NextForCausalLM", "qwen3_next"

# What transformers assumes for a key config.json leaves out (5.18 = 5.25).
DEFAULTS = dict(rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", head_dim=256,
                num_key_value_heads=2, max_position_embeddings=32768, partial_rotary_factor=0.25,
                linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1, moe_intermediate_size=512,
                shared_expert_intermediate_size=512, num_experts_per_tok=10, num_experts=512, norm_topk_prob=True,
                mlp_only_layers=[], router_aux_loss_coef=0.001, full_attention_interval=4)


def _get(hf: dict, name: str):
    return hf[name] if hf.get(name) is not None else DEFAULTS.get(name)


def _rope(hf: dict) -> tuple[dict, float]:
    """``(hf without the partial-rotary factor, the factor)``: transformers 4 writes it at the top
    level, 5 inside ``rope_parameters`` (and merges it into a ``rope_scaling`` dict)."""
    hf = dict(hf)
    factor = hf.pop("partial_rotary_factor", None)
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(hf.get(key), dict):
            params = dict(hf[key])
            factor = params.pop("partial_rotary_factor", factor)
            hf[key] = params
    return hf, float(DEFAULTS["partial_rotary_factor"] if factor is None else factor)


def layer_letters(hf: dict, num_layers: int) -> str:
    types = hf.get("layer_types")
    if types is None:
        interval = _get(hf, "full_attention_interval")
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    return "".join({"linear_attention": "d", "full_attention": "g"}.get(t, "?") for t in types)


def glocal_fields(hf: dict, *, error, rope_fields) -> dict:
    """The glocal ``moe`` config fields of a Qwen3-Next ``config.json`` (``error``: the
    exception class to raise, ``rope_fields``: the shared RoPE reader of ``glocal.hf.configs``)."""
    err = error
    L = hf["num_hidden_layers"]
    letters = layer_letters(hf, L)
    if len(letters) != L or "?" in letters:
        raise err(f"config.json layer_types={hf.get('layer_types')!r}: glocal reads {L} entries of "
                  f"'linear_attention' / 'full_attention'.")
    unit = next(p for p in range(1, L + 1) if L % p == 0 and letters[:p] * (L // p) == letters)
    X = int(_get(hf, "num_experts"))
    if X < 1:
        raise err("config.json num_experts=0 (dense Qwen3-Next layers) is not supported; glocal imports the MoE form.")
    if int(_get(hf, "shared_expert_intermediate_size")) < 1:
        raise err("config.json shared_expert_intermediate_size must be positive (every Qwen3-Next layer has a "
                  "shared expert).")
    step, only = int(_get(hf, "decoder_sparse_step")), sorted(_get(hf, "mlp_only_layers") or [])
    if only != list(range(len(only))) or (only and step != 1):
        raise err(f"config.json mlp_only_layers={only} with decoder_sparse_step={step}: glocal places dense layers "
                  f"only as a prefix (mlp_only_layers = [0, 1, ..]) with every later layer routed, or every "
                  f"decoder_sparse_step-th layer routed with no mlp_only_layers.")
    rope_hf, fraction = _rope(hf)
    head_dim = int(_get(hf, "head_dim"))
    return dict(
        vocab_size=hf["vocab_size"], max_seq_len=int(_get(hf, "max_position_embeddings")), d_model=hf["hidden_size"],
        num_layers=L, num_heads=hf["num_attention_heads"],
        num_kv_heads=_get(hf, "num_key_value_heads") or hf["num_attention_heads"], head_dim=head_dim,
        d_ff=hf["intermediate_size"], mlp="swiglu", norm="rms_centered", norm_eps=float(_get(hf, "rms_norm_eps")),
        **rope_fields(rope_hf, "llama"), rope_fraction=fraction, qk_norm=True, qkv_bias=False,
        attn_output_gate=True, tie_embeddings=bool(_get(hf, "tie_word_embeddings")), layer_pattern=letters[:unit],
        moe_every=step, first_dense_layers=len(only),
        gated_delta=dict(key_heads=int(_get(hf, "linear_num_key_heads")),
                         value_heads=int(_get(hf, "linear_num_value_heads")),
                         key_dim=int(_get(hf, "linear_key_head_dim")),
                         value_dim=int(_get(hf, "linear_value_head_dim")),
                         conv_width=int(_get(hf, "linear_conv_kernel_dim")), norm_eps=float(_get(hf, "rms_norm_eps"))),
        moe=dict(num_experts=X, top_k=int(_get(hf, "num_experts_per_tok")), d_expert=int(_get(hf, "moe_intermediate_size")),
                 router="token_choice", router_weights="renorm" if _get(hf, "norm_topk_prob") else "softmax",
                 impl="dropless", shared_experts=1, d_shared=int(_get(hf, "shared_expert_intermediate_size")),
                 shared_gate=True, balance_weight=float(_get(hf, "router_aux_loss_coef")), z_weight=0.0),
    )


def is_qwen3_next(config) -> bool:
    """Whether a glocal config has Qwen3-Next's shape (then it exports as that class only)."""
    return "gated_delta" in config.options or getattr(config, "attn_output_gate", False)


def export_refusal(config) -> str | None:
    """Why ``config`` is not a Qwen3-Next model (None if it is)."""
    from glocal.models.moe import MoEConfig

    if not isinstance(config, MoEConfig):
        return "Qwen3-Next layers are routed: build it in the moe family"
    want = dict(norm="rms_centered", mlp="swiglu", qk_norm=True, qkv_bias=False, attn_output_gate=True,
                attn_softcap=None, logit_softcap=None, rope_scaling=None)
    for name, value in want.items():
        if getattr(config, name) != value:
            return f"{name}={getattr(config, name)!r} (Qwen3-Next: {value!r})"
    if set(config.layer_pattern) - {"d", "g"}:
        return f"layer_pattern={config.layer_pattern!r} (Qwen3-Next layers are 'd' Gated DeltaNet or 'g' attention)"
    m = config.options["moe"]
    moe = dict(router=(m.router, "token_choice"), shared_experts=(m.shared_experts, 1), shared_gate=(m.shared_gate, True),
               bias_rate=(m.bias_rate, 0.0))
    for name, (value, ok) in moe.items():
        if value != ok:
            return f"moe.{name}={value!r} (Qwen3-Next: {ok!r})"
    d = config.options.get("gated_delta")
    if d is not None and d.norm_eps != config.norm_eps:
        return (f"gated_delta.norm_eps={d.norm_eps} differs from norm_eps={config.norm_eps} (Qwen3-Next has one "
                f"rms_norm_eps for every norm)")
    if config.first_dense_layers and config.moe_every != 1:
        return "first_dense_layers with moe_every != 1 (Hugging Face's mlp_only_layers + decoder_sparse_step)"
    return None


def hf_fields(config) -> dict:
    """The Qwen3-Next part of ``config.json`` for a glocal config ``export_refusal`` accepts."""
    m, d = config.options["moe"], config.options.get("gated_delta")
    E = config.head_dim or config.d_model // config.num_heads
    P = config.layer_pattern
    types = ["linear_attention" if P[i % len(P)] == "d" else "full_attention" for i in range(config.num_layers)]
    K = (d.key_heads if d else None) or config.num_kv_heads or config.num_heads
    H = (d.value_heads if d else None) or config.num_heads
    fields = dict(
        layer_types=types, head_dim=E, partial_rotary_factor=config.rope_fraction,
        linear_num_key_heads=K, linear_num_value_heads=H,
        linear_key_head_dim=(d.key_dim if d else None) or E, linear_value_head_dim=(d.value_dim if d else None) or E,
        linear_conv_kernel_dim=d.conv_width if d else 4, num_experts=m.num_experts, num_experts_per_tok=m.top_k,
        moe_intermediate_size=m.d_expert or config.d_ff, shared_expert_intermediate_size=m.d_shared or (m.d_expert or config.d_ff),
        norm_topk_prob=m.router_weights == "renorm", decoder_sparse_step=config.moe_every,
        mlp_only_layers=list(range(config.first_dense_layers)), router_aux_loss_coef=m.balance_weight,
        output_router_logits=False,
    )
    return fields


def _is_moe_layer(config, i: int) -> bool:
    j = i - config.first_dense_layers
    return j >= 0 and (j + 1) % config.moe_every == 0


def layer_rules(config, i: int, *, fused_experts: bool = False) -> list[Rule]:
    """Every rule of decoder layer ``i`` of a Qwen3-Next config."""
    pre, D = f"model.layers.{i}.", config.d_model
    letter = config.layer_pattern[i % len(config.layer_pattern)]
    if letter == "d":
        rules = _delta_rules(pre, config) + [norm_rule("mixer_norm.scale", pre + "input_layernorm.weight", D),
                                            norm_rule("ffn_norm.scale", pre + "post_attention_layernorm.weight", D)]
    else:
        rules = _gated_attention_rules(pre, config)
    if not _is_moe_layer(config, i):
        return rules + mlp_rules(pre, D, config.d_ff)
    m = config.options["moe"]
    # Fused or per-expert names (the latter what every transformers version reads and 5.x writes).
    experts = mixtral_rules(pre, D, m.d_expert or config.d_ff, m.num_experts, fused_experts, block="mlp.",
                            expert_names=("gate_proj", "up_proj", "down_proj"))
    I_s, s = m.d_shared or m.d_expert or config.d_ff, pre + "mlp."  # noqa: E741
    shared = [dataclasses.replace(r, path=r.path.replace("ffn.", "ffn.shared."),
                                  names=tuple(n.replace(".mlp.", ".mlp.shared_expert.") for n in r.names))
              for r in mlp_rules(pre, D, I_s)]
    return (rules + experts + shared
            + [Rule("ffn.shared_gate_D1", (s + "shared_expert_gate.weight",), ((1, D),), _t, lambda w: (_t(w),))])


def _gated_attention_rules(pre: str, config) -> list[Rule]:
    """Qwen3's attention rules with the query projection twice as tall (per head ``q | gate``):
    one rule fills both the fused q/k/v kernel and the gate kernel from q/k/v_proj."""
    D, H = config.d_model, config.num_heads
    K, E = config.num_kv_heads or H, config.head_dim or config.d_model // H
    rules = attention_rules(pre, D, H, K, E, qk_norm=True)
    qkv = rules[0]

    def load(qg, k, v):
        qg_DHAE = _t(qg).reshape(D, H, 2, E)
        return qkv.load(_t(qg_DHAE[:, :, 0].reshape(D, H * E)), k, v), qg_DHAE[:, :, 1]

    def save(w, gate_DHE):
        q, k, v = qkv.save(w)
        qg_DHAE = np.stack([_t(q).reshape(D, H, E), gate_DHE], axis=2)
        return _t(qg_DHAE.reshape(D, 2 * H * E)), k, v

    joined = Rule(qkv.path, qkv.names, ((2 * H * E, D),) + qkv.shapes[1:], load, save,
                  more_paths=("mixer.attn.gate_DHE",))
    return [joined] + rules[1:]


def _delta_rules(pre: str, config) -> list[Rule]:
    d = config.options["gated_delta"]
    D = config.d_model
    K = d.key_heads or config.num_kv_heads or config.num_heads
    H = d.value_heads or config.num_heads
    E_attn = config.head_dim or config.d_model // config.num_heads
    F, E, W = d.key_dim or E_attn, d.value_dim or E_attn, d.conv_width
    Y, a = H // K, pre + "linear_attn."
    A = 2 * F + 2 * Y * E

    def load_conv(w):
        w_WI = w[:, 0, :].T
        return w_WI[:, :K * F].reshape(W, K, F), w_WI[:, K * F:2 * K * F].reshape(W, K, F), w_WI[:, 2 * K * F:].reshape(W, H, E)

    def save_conv(q_WKF, k_WKF, v_WHE):
        w_WI = np.concatenate([q_WKF.reshape(W, -1), k_WKF.reshape(W, -1), v_WHE.reshape(W, -1)], axis=1)
        return (w_WI.T[:, None, :],)

    vector = lambda path, name, n: Rule(path, (a + name,), ((n,),), lambda w: w, lambda w: (w,))
    return [
        Rule("mixer.in_DKA", (a + "in_proj_qkvz.weight",), ((K * A, D),), lambda w: _t(w).reshape(D, K, A),
             lambda w: (_t(w.reshape(D, K * A)),)),
        Rule("mixer.ba_DKA", (a + "in_proj_ba.weight",), ((2 * H, D),), lambda w: _t(w).reshape(D, K, 2 * Y),
             lambda w: (_t(w.reshape(D, 2 * H)),)),
        Rule("mixer.conv_q_WKF", (a + "conv1d.weight",), ((2 * K * F + H * E, 1, W),), load_conv, save_conv,
             more_paths=("mixer.conv_k_WKF", "mixer.conv_v_WHE")),
        vector("mixer.A_log_H", "A_log", H), vector("mixer.dt_bias_H", "dt_bias", H),
        vector("mixer.norm_E", "norm.weight", E),
        Rule("mixer.o_HED", (a + "out_proj.weight",), ((D, H * E),), lambda w: _t(w).reshape(H, E, D),
             lambda w: (_t(w.reshape(H * E, D)),)),
    ]
