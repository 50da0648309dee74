"""Hugging Face tensor names and layouts <-> glocal parameters, one rule per parameter.

Hugging Face stores ``nn.Linear`` weights as ``[out, in]``; glocal stores kernels as
``[in, out...]`` with named axes, and stacks each layer kind's parameters over a leading
``layers`` axis (``glocal.layers.DecoderStack``). A ``Rule`` converts one glocal parameter
slice (one layer) to its HF tensors and back; the transposes and reshapes are exact, so
import -> export -> import is bitwise. Layouts (letters as in ``glocal/__init__.py``:
Y = H / K query heads per kv head, X experts):

    q_proj [H E, D]  k_proj / v_proj [K E, D]  -> qkv_DKAE [D, K, Y + 2, E]
        (query head h = k Y + y reads kv head k in both: transformers' repeat_kv)
    q_proj.bias [H E], k/v_proj.bias [K E]     -> qkv_b_KAE [K, Y + 2, E]   (Qwen2)
    o_proj [D, H E]                            -> o_HED [H, E, D]
    gate_proj, up_proj [I, D]                  -> wi_DAI [D, 2, I]   (A: gate, up)
    down_proj [D, I]                           -> wo_ID [I, D]
    Mixtral gate [X, D]                        -> router_DX [D, X]
    experts.{x}.w1 (gate), w3 (up) [I, D]      -> wi_XDAI [X, D, 2, I]
    experts.{x}.w2 (down) [D, I]               -> wo_XID [X, I, D]
    (transformers 5's fused experts.gate_up_proj [X, 2 I, D] / down_proj [X, D, I] are
    read too; exports use the per-expert names every transformers version reads)
    embed_tokens [V, D] -> table_VD; lm_head [V, D] -> w_DV [D, V]; norms -> scale
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from glocal.errors import UserError

Shape = tuple[int, ...]
# Tensors a checkpoint may hold that carry no weights (old Llama exports saved RoPE tables).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Heads beside the language model that transformers skips too (Qwen3-Next's multi-token prediction).
IGNORED_PREFIXES = ("mtp.",)


class HFWeightsError(UserError, ValueError):
    """A checkpoint whose tensors do not match its config (missing, extra, wrong shape)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One glocal parameter (``path``: attributes from the owning module) <-> HF tensors
    ``names`` of ``shapes``. ``load`` maps the HF arrays to the glocal slice, ``save`` back."""

    path: str
    names: tuple[str, ...]
    shapes: tuple[Shape, ...]
    load: Callable[..., np.ndarray]
    save: Callable[..., tuple[np.ndarray, ...]]
    # Further glocal parameters the same HF tensors hold (Qwen3-Next's q_proj: queries and
    # gates): ``load`` then returns one array per path and ``save`` takes one per path.
    more_paths: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path, *self.more_paths)

    def views(self) -> list["Rule"]:
        """One single-parameter rule per path (loading fills one parameter at a time)."""
        if not self.more_paths:
            return [self]
        return [dataclasses.replace(self, path=p, more_paths=(), load=lambda *t, j=j: self.load(*t)[j])
                for j, p in enumerate(self.paths)]


def _t(w: np.ndarray) -> np.ndarray:
    return np.swapaxes(w, -1, -2)


def attention_rules(pre: str, D: int, H: int, K: int, E: int, qk_norm: bool, qkv_bias: bool = False) -> list[Rule]:
    Y = H // K

    def load_qkv(q, k, v):
        return np.concatenate([_t(q).reshape(D, K, Y, E), _t(k).reshape(D, K, 1, E), _t(v).reshape(D, K, 1, E)], 2)

    def save_qkv(w):
        return _t(w[:, :, :Y].reshape(D, H * E)), _t(w[:, :, Y].reshape(D, K * E)), _t(w[:, :, Y + 1].reshape(D, K * E))

    a = pre + "self_attn."
    rules = [
        Rule("mixer.attn.qkv_DKAE", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
             ((H * E, D), (K * E, D), (K * E, D)), load_qkv, save_qkv),
        Rule("mixer.attn.o_HED", (a + "o_proj.weight",), ((D, H * E),),
             lambda o: _t(o).reshape(H, E, D), lambda w: (_t(w.reshape(H * E, D)),)),
        norm_rule("mixer_norm.scale", pre + "input_layernorm.weight", D),
        norm_rule("ffn_norm.scale", pre + "post_attention_layernorm.weight", D),
    ]
    if qkv_bias:
        rules.append(Rule(
            "mixer.attn.qkv_b_KAE", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), ((H * E,), (K * E,), (K * E,)),
            lambda q, k, v: np.concatenate([q.reshape(K, Y, E), k.reshape(K, 1, E), v.reshape(K, 1, E)], 1),
            lambda b: (b[:, :Y].reshape(H * E), b[:, Y].reshape(K * E), b[:, Y + 1].reshape(K * E))))
    if qk_norm:
        rules += [norm_rule("mixer.attn.q_norm.scale", a + "q_norm.weight", E),
                  norm_rule("mixer.attn.k_norm.scale", a + "k_norm.weight", E)]
    return rules


def norm_rule(path: str, name: str, dim: int) -> Rule:
    return Rule(path, (name,), ((dim,),), lambda w: w, lambda w: (w,))


def mlp_rules(pre: str, D: int, I: int) -> list[Rule]:  # noqa: E741 - I is the legend's FFN width
    m = pre + "mlp."
    return [
        Rule("ffn.wi_DAI", (m + "gate_proj.weight", m + "up_proj.weight"), ((I, D), (I, D)),
             lambda g, u: np.stack([_t(g), _t(u)], axis=1), lambda w: (_t(w[:, 0]), _t(w[:, 1]))),
        Rule("ffn.wo_ID", (m + "down_proj.weight",), ((D, I),), lambda d: _t(d), lambda w: (_t(w),)),
    ]


def mixtral_rules(pre: str, D: int, I: int, X: int, fused: bool = False, *, block: str = "block_sparse_moe.",  # noqa: E741
                  expert_names: tuple[str, str, str] = ("w1", "w3", "w2")) -> list[Rule]:
    """Router and experts; ``block`` and ``expert_names`` (gate, up, down) name the per-expert
    tensors (Mixtral's; Qwen3-Next stores ``mlp.experts.{x}.gate_proj`` / ``up_proj`` / ``down_proj``)."""
    m = pre + block
    gate, up, down = (f"{n}.weight" for n in expert_names)
    router = Rule("ffn.router_DX", (m + "gate.weight",), ((X, D),), lambda g: _t(g), lambda w: (_t(w),))
    if fused:  # transformers 5 in memory: mlp.gate, mlp.experts.gate_up_proj [X, 2I, D] (gate rows first)
        f = pre + "mlp."
        return [
            dataclasses.replace(router, names=(f + "gate.weight",)),
            Rule("ffn.wi_XDAI", (f + "experts.gate_up_proj",), ((X, 2 * I, D),),
                 lambda gu: np.moveaxis(gu.reshape(X, 2, I, D), 3, 1),
                 lambda w: (np.moveaxis(w, 1, 3).reshape(X, 2 * I, D),)),
            Rule("ffn.wo_XID", (f + "experts.down_proj",), ((X, D, I),), lambda d: _t(d), lambda w: (_t(w),)),
        ]
    e = [f"{m}experts.{x}." for x in range(X)]
    return [
        router,
        Rule("ffn.wi_XDAI", tuple(p + w for p in e for w in (gate, up)), ((I, D),) * (2 * X),
             lambda *gu: np.stack([np.stack([_t(gu[2 * x]), _t(gu[2 * x + 1])], axis=1) for x in range(X)]),
             lambda w: tuple(_t(w[x, :, a]) for x in range(X) for a in (0, 1))),
        Rule("ffn.wo_XID", tuple(p + down for p in e), ((D, I),) * X,
             lambda *d: np.stack([_t(t) for t in d]), lambda w: tuple(_t(w[x]) for x in range(X))),
    ]


def layer_rules(config, i: int, *, fused_experts: bool = False) -> list[Rule]:
    """Every rule of decoder layer ``i`` (attention, norms, dense or Mixtral FFN)."""
    pre = f"model.layers.{i}."
    H = config.num_heads
    K = config.num_kv_heads or H
    E = config.head_dim or config.d_model // H
    rules = attention_rules(pre, config.d_model, H, K, E, config.qk_norm, config.qkv_bias)
    if "moe" in config.options:
        m = config.options["moe"]
        return rules + mixtral_rules(pre, config.d_model, m.d_expert or config.d_ff, m.num_experts, fused_experts)
    return rules + mlp_rules(pre, config.d_model, config.d_ff)


def top_rules(config) -> list[Rule]:
    """The embedding, the final norm and (untied) the output head."""
    V, D = config.vocab_size, config.d_model
    rules = [Rule("embed.table_VD", ("model.embed_tokens.weight",), ((V, D),), lambda w: w, lambda w: (w,)),
             norm_rule("final_norm.scale", "model.norm.weight", D)]
    if not config.tie_embeddings:
        rules.append(Rule("head.w_DV", ("lm_head.weight",), ((V, D),), lambda w: _t(w), lambda w: (_t(w),)))
    return rules


def decoder_layers(model) -> list[tuple[object, int]]:
    """``(stacked layer module, index along its layers axis)`` for every decoder layer in
    order: layer ``i`` of a stack is repeat ``i // P``, pattern slot ``i % P``."""
    from glocal.layers.decoder import DecoderChain

    stacks = list(model.decoder.stacks) if isinstance(model.decoder, DecoderChain) else [model.decoder]
    return [(stack.units.layers[p], r) for stack in stacks for r in range(stack.repeats)
            for p in range(len(stack.pattern))]


def variable(module, path: str):
    for attr in path.split("."):
        module = getattr(module, attr)
    return module
