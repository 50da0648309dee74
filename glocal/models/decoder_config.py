"""``DecoderConfig``: the fields every family shares, and the per-kind options table.

A family's config derives from it, adds its shape fields, says which layer kinds it uses
(``used_kinds``) and builds its stacks with ``self.layer(...)`` (the shared ``LayerSpec``) and
``self.kind(mixer, ffn)`` (a ``LayerKind`` carrying those kinds' options). Options belong to
their kinds (``glocal.layers.spec``): ``moe.num_experts=8``, ``window.size=64``,
``linear.feature_dim=16``; the flat names of older configs (``num_experts``,
``sliding_window``, ...) are accepted on input as aliases (``glocal.configs.options``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from glocal.configs import options as kind_options
from glocal.configs.base import ConfigError, ModelConfig, _coerce
from glocal.configs.options import KindSettings
from glocal.kernels import IMPLEMENTATIONS
from glocal.layers.mlp import ACTIVATIONS
from glocal.layers.norms import NORMS
from glocal.layers.rope import RopeScaling, rotary_dim
from glocal.layers.spec import FFNS, KindOptions, LayerKind, LayerSpec
from glocal.layers.stack import REMAT_CHOICES

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    """Fields every family shares (vocabulary, context, layer numerics, output head, run
    options) and ``options``, the options of the kinds its layers use. A family adds its
    shape fields and calls ``require_heads`` for each stack."""

    vocab_size: int = 384
    max_seq_len: int = 256
    ffn: str = "mlp"  # FFN kind of every layer (glocal.layers.FFNS)
    mlp: str = "swiglu"  # dense FFN and expert activation: swiglu | geglu | gelu | relu | swiglu_clamped
    swiglu_alpha: float = 1.702  # swiglu_clamped only: h = (u + 1) g sigmoid(alpha g) (GPT-OSS)
    swiglu_limit: float = 7.0  # swiglu_clamped only: g = min(g, limit), u = clip(u, -limit, limit)
    norm: str = "rms"  # rms | layer | rms_centered (RMSNorm with gain 1 + scale, scale init 0; qk-norm too)
    norm_eps: float = 1e-6
    rope_theta: float | None = 10_000.0  # None: no rotary positions
    rope_scaling: str | None = None  # None | linear | llama3 | yarn (glocal.layers.rope.RopeScaling)
    rope_factor: float = 1.0  # context extension factor of rope_scaling
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_context: int = 8192  # llama3 and yarn: the pre-training context
    rope_beta_fast: float = 32.0  # yarn only: frequencies with more turns over the original context are kept
    rope_beta_slow: float = 1.0  # yarn only: frequencies with fewer turns are divided by rope_factor
    rope_truncate: bool = True  # yarn only: round the blend's bounds to whole frequency pairs
    rope_attention_factor: float | None = None  # yarn only: gain on rotated q and k (None: 0.1 ln(factor) + 1)
    rope_fraction: float = 1.0  # RoPE on the first int(head_dim * rope_fraction) dims of each head (partial rotary)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    attn_out_bias: bool = False  # a bias on the attention output projection (GPT-OSS)
    attn_output_gate: bool = False  # per-head sigmoid gate on the attention output, from the query input (Qwen3-Next)
    attn_softcap: float | None = None  # c * tanh(scores / c) before the softmax
    attn_sinks: bool = False  # learned per-head sink logit in the attention softmax (GPT-OSS)
    logit_softcap: float | None = None  # the same on the output logits
    tie_embeddings: bool = False  # output head = the token embedding table
    attention_impl: str = "auto"
    dtype: str = "float32"  # compute dtype; parameters are param_dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "auto"  # auto: the platform's measured choice (glocal.platform_defaults); none | full | dots | ...
    init_std: float = 0.02
    options: KindSettings = KindSettings()  # per used kind with options: "moe", "window", "linear", ...

    # A family's defaults for kind options, e.g. {"window": {"size": 64}}.
    kind_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self):
        settings = _as_settings(self.options)
        used = self.used_kinds()
        object.__setattr__(self, "options", kind_options.complete(settings, used, self.kind_defaults))
        super().__post_init__()

    # -- which kinds, with which options ----------------------------------------------------
    def used_kinds(self) -> set[str]:
        """Names of the mixer and FFN kinds this config's layers use (families with other
        layer layouts extend it)."""
        return {"global", self.ffn}

    def kind(self, mixer: str, ffn: str | None = None, mask=None) -> LayerKind:
        """A layer of mixer ``mixer`` and FFN ``ffn`` (default: ``self.ffn``) with this config's
        options for both."""
        ffn = self.ffn if ffn is None else ffn
        return LayerKind(mixer, ffn, mask, self.options.get(mixer), self.options.get(ffn))

    def routing_modes(self) -> tuple[str, ...]:
        """``("topk", "threshold")`` when some part routes non-causally in training (expert
        choice): evaluation reports both and decoding uses ``threshold``; empty otherwise."""
        modes = [m for o in self.options.values() for m in o.routing_modes()]
        return tuple(dict.fromkeys(modes))

    def with_routing_mode(self, mode: str):
        """This config with every router that has routing modes set to ``mode``."""
        settings = KindSettings({k: o.with_routing_mode(mode) for k, o in self.options.items()})
        return dataclasses.replace(self, options=settings)

    # -- overrides and JSON ----------------------------------------------------------------
    def replace(self, **overrides: Any):
        """A copy with ``overrides``: the config's fields, ``kind.option`` keys, and the flat
        aliases of older configs (``sliding_window`` = ``window.size``)."""
        plain, sections, explicit = kind_options.split_keys(overrides, set(self.field_names()) - {"options"})
        if sections:
            settings = _as_settings(plain.get("options", self.options))
            plain["options"] = kind_options.apply(settings, sections, self.kind_defaults)
        cfg = super().replace(**plain)
        unused = sorted(explicit - cfg.used_kinds())
        if unused:
            raise ConfigError(f"options of {unused} are set, but no layer of this {type(self).__name__} uses "
                              f"{'that kind' if len(unused) == 1 else 'those kinds'} (its kinds: "
                              f"{sorted(cfg.used_kinds())}); choose the kind first, e.g. ffn=moe or a "
                              f"layer_pattern with its letter.")
        return cfg

    def other_keys(self) -> list[str]:
        return [f"{name}.{field.name}" for name, o in self.options.items() for field in dataclasses.fields(o)]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**out, **self.options.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Reads this form and the flat form older workdirs saved (every option of every kind
        at the top level; those of kinds the model does not use are dropped)."""
        fields = set(cls.field_names()) - {"options"}
        plain, sections, _ = kind_options.split_keys(d, fields)
        unknown = sorted(set(plain) - fields)
        if unknown:
            sections_of = [k for k in unknown if isinstance(plain[k], Mapping)]
            hint = (f" {sections_of} look like the options of kinds that are not registered: import the "
                    f"module that registers them first." if sections_of else "")
            raise ConfigError(f"{cls.__name__} does not know the keys {unknown}.{hint}")
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints[k], k) for k, v in plain.items()}
        return cls(**values, options=kind_options.apply(KindSettings(), sections, cls.kind_defaults))

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        self.require_positive("vocab_size", "max_seq_len")
        for name, allowed in (("mlp", ACTIVATIONS), ("norm", NORMS), ("dtype", DTYPES),
                              ("param_dtype", DTYPES), ("remat", REMAT_CHOICES),
                              ("attention_impl", IMPLEMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.ffn not in FFNS:
            raise ConfigError(f"ffn={self.ffn!r} is not a registered FFN kind; choose one of {sorted(FFNS)}.")
        for name in ("attn_softcap", "logit_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (or None for no cap), got {getattr(self, name)}.")
        if self.mlp == "swiglu_clamped" and not (self.swiglu_alpha > 0 and self.swiglu_limit > 0):
            raise ConfigError(f"swiglu_alpha={self.swiglu_alpha}, swiglu_limit={self.swiglu_limit}: mlp='swiglu_clamped' "
                              f"needs both positive (GPT-OSS: 1.702 and 7.0).")
        if not 0 < self.rope_fraction <= 1:
            raise ConfigError(f"rope_fraction={self.rope_fraction} must be in (0, 1] (the rotated part of each head).")
        if self.rope_fraction != 1 and self.rope_theta is None:
            raise ConfigError("rope_fraction is set but rope_theta=None (no rotary positions); unset one.")
        if self.rope_scaling is not None:
            if self.rope_theta is None:
                raise ConfigError("rope_scaling is set but rope_theta=None (no rotary positions); unset one.")
            if self.rope_scaling == "yarn" and not 0 < self.rope_beta_slow < self.rope_beta_fast:
                raise ConfigError(f"rope_beta_slow={self.rope_beta_slow}, rope_beta_fast={self.rope_beta_fast}: yarn "
                                  f"needs 0 < rope_beta_slow < rope_beta_fast (defaults 1 and 32).")
            factor = self.rope_attention_factor
            if self.rope_scaling == "yarn" and factor is not None and factor <= 0:
                raise ConfigError(f"rope_attention_factor={self.rope_attention_factor} must be positive (or None: "
                                  f"0.1 ln(rope_factor) + 1).")
            try:
                self.rope_scaling_spec()
            except ValueError as e:
                raise ConfigError(f"rope_scaling={self.rope_scaling!r}: {e}") from None
        for options in self.options.values():
            options.validate(self)

    def require_heads(self, width: str, heads: str, kv_heads: str | None = None, head_dim: str | None = None,
                      *, width_value: int | None = None) -> None:
        """Check one stack's attention shape; errors name the fields the user sets.

        ``width_value`` overrides the width when the field defaults from another (FIT's
        ``d_latent=None`` means ``d_model``)."""
        D = getattr(self, width) if width_value is None else width_value
        H = getattr(self, heads)
        K = H if kv_heads is None or getattr(self, kv_heads) is None else getattr(self, kv_heads)
        E = None if head_dim is None else getattr(self, head_dim)
        if H < 1:
            raise ConfigError(f"{heads} must be a positive integer, got {H}.")
        if E is None and D % H:
            divisors = [h for h in range(1, D + 1) if D % h == 0 and h <= 64]
            fix = f" or set {head_dim} explicitly" if head_dim else ""
            raise ConfigError(f"{heads}={H} does not divide {width}={D}. Choose {heads} from {divisors}{fix}.")
        if K < 1 or H % K:
            ok = [k for k in range(1, H + 1) if H % k == 0]
            raise ConfigError(f"{kv_heads}={K} does not divide {heads}={H}. Choose {kv_heads} from {ok}.")
        size = D // H if E is None else E
        what = head_dim if E is not None else f"the head size {width} / {heads}"
        if size < 1 or (self.rope_theta is not None and size % 2):
            raise ConfigError(f"{what} must be even for RoPE (and positive), got {size}.")
        if self.rope_theta is not None and self.rope_fraction != 1:
            try:
                rotary_dim(size, self.rope_fraction)
            except ValueError as e:
                raise ConfigError(f"{e} ({what})") from None

    def rope_scaling_spec(self) -> RopeScaling | None:
        if self.rope_scaling is None:
            return None
        if self.rope_scaling == "yarn":
            return RopeScaling("yarn", self.rope_factor, original_context=self.rope_original_context,
                               beta_fast=self.rope_beta_fast, beta_slow=self.rope_beta_slow, truncate=self.rope_truncate,
                               attention_factor=self.rope_attention_factor)
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                           self.rope_original_context)

    def layer(self, **shape) -> LayerSpec:
        """A ``LayerSpec`` of the given shape with this config's shared layer numerics."""
        return LayerSpec(**shape, mlp=self.mlp, swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
                         attn_out_bias=self.attn_out_bias, norm=self.norm, norm_eps=self.norm_eps,
                         rope_theta=self.rope_theta,
                         rope_scaling=self.rope_scaling_spec(), rope_fraction=self.rope_fraction,
                         qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, attn_output_gate=self.attn_output_gate,
                         attn_softcap=self.attn_softcap, attn_sinks=self.attn_sinks,
                         attention_impl=self.attention_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype)


def _as_settings(value) -> KindSettings:
    """``value`` as a ``KindSettings``, or a ConfigError saying how options are set."""
    if isinstance(value, KindSettings):
        return value
    if isinstance(value, Mapping) and all(isinstance(v, KindOptions) for v in value.values()):
        return KindSettings(value)
    raise ConfigError(f"options={value!r}: set a kind's options as kind.option=value (e.g. moe.num_experts=8), "
                      f"not through the options field.")
