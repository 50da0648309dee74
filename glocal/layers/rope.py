"""Rotary position embedding with explicit positions.

Positions are an argument, not implied by array index, so grouped models (FIT groups,
Block Transformer blocks) and caches can re-index tokens freely. Convention: the head
dimension is split in halves ``(x1, x2)`` and pair ``(x1[i], x2[i])`` is rotated by angle
``pos * f_i`` with ``f_i = theta ** (-2i / E)`` (the "rotate-half" layout used by Llama
checkpoints). Partial rotary (``rotary_dim=rd < E``, Qwen3-Next, GPT-NeoX) rotates only
``x[..., :rd]`` with that layout inside it (pairs ``(i, i + rd/2)``, ``f_i = theta ** (-2i / rd)``)
and passes ``x[..., rd:]`` through. ``RopeScaling`` rescales the frequencies for longer contexts:

* ``linear`` (position interpolation): every ``f_i / factor``.
* ``llama3`` (Llama 3.1): wavelengths ``2 pi / f_i`` longer than ``original_context /
  low_freq_factor`` are divided by ``factor``, shorter than ``original_context /
  high_freq_factor`` kept, and the band between blended linearly in
  ``original_context / wavelength``.
* ``yarn`` (YaRN, GPT-OSS, long-context Qwen): NTK-by-parts. With ``L0 = original_context`` and
  rotary dim ``d``, the pair index completing ``r`` turns over ``L0`` is
  ``c(r) = d ln(L0 / (2 pi r)) / (2 ln theta)``; pairs below ``c(beta_fast)`` keep ``f_i``, pairs
  above ``c(beta_slow)`` get ``f_i / factor``, and a linear ramp blends between them (``truncate``
  rounds the two bounds outwards first). The rotated part is also multiplied by
  ``attention_factor`` (given, else ``0.1 ln(factor) + 1``, or with ``mscale`` and
  ``mscale_all_dim`` the ratio of those two forms), so attention logits grow by its square.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    kind: str  # linear | llama3 | yarn
    factor: float
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_context: int = 8192  # llama3, yarn: the pre-training context
    beta_fast: float = 32.0  # yarn: pairs with more than beta_fast turns over original_context keep f_i
    beta_slow: float = 1.0  # yarn: pairs with fewer than beta_slow turns get f_i / factor
    truncate: bool = True  # yarn: round the ramp's bounds outwards to whole pairs
    # The rotated part's gain: 1 unless yarn; yarn's None is resolved here from factor (and mscale).
    attention_factor: float | None = None
    mscale: float | None = None  # yarn: with mscale_all_dim, the gain is mscale(factor, m) / mscale(factor, m_all)
    mscale_all_dim: float | None = None

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope scaling {self.kind!r}; choose one of {ROPE_SCALINGS}.")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}.")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}.")
        if self.kind != "yarn":
            if self.attention_factor not in (None, 1.0):
                raise ValueError(f"attention_factor={self.attention_factor} is a yarn option ({self.kind} scaling "
                                 f"keeps the rotated part's norm).")
            object.__setattr__(self, "attention_factor", 1.0)
            return
        if self.original_context < 1:
            raise ValueError(f"yarn rope scaling needs original_context >= 1, got {self.original_context}.")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"yarn rope scaling needs 0 < beta_slow < beta_fast, got {self.beta_slow} and "
                             f"{self.beta_fast}.")
        if self.attention_factor is None:
            mscale = lambda m: 1.0 if self.factor <= 1 else 0.1 * m * math.log(self.factor) + 1.0
            both = self.mscale and self.mscale_all_dim  # (transformers: either one unset or 0 -> the plain form)
            gain = mscale(self.mscale) / mscale(self.mscale_all_dim) if both else mscale(1.0)
            object.__setattr__(self, "attention_factor", float(gain))
        if self.attention_factor <= 0:
            raise ValueError(f"yarn attention_factor must be positive, got {self.attention_factor}.")

    def yarn_ramp(self, dim: int, theta: float) -> np.ndarray:
        """``[dim / 2]`` float64: 0 where a pair keeps its frequency, 1 where it is divided by factor."""
        turns = lambda r: dim * math.log(self.original_context / (2 * math.pi * r)) / (2 * math.log(theta))
        low, high = turns(self.beta_fast), turns(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        return np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)

    def apply(self, inv_freq, *, dim: int, theta: float):
        """Scaled ``inv_freq [dim / 2]`` of a rotary dim ``dim`` and base ``theta``."""
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "yarn":
            ramp = self.yarn_ramp(dim, theta)
            return inv_freq * jnp.asarray((1 - ramp) + ramp / self.factor, jnp.float32)
        wavelength = 2 * math.pi / inv_freq
        smooth = (self.original_context / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        low = wavelength > self.original_context / self.low_freq_factor
        high = wavelength < self.original_context / self.high_freq_factor
        return jnp.where(low, inv_freq / self.factor, jnp.where(high, inv_freq, blended))


def rope_angles(positions_BT, head_dim: int, theta: float = 10_000.0, scaling: RopeScaling | None = None):
    """``[B, T, E/2]`` rotation angles in float32 (one per rotated pair)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq, dim=head_dim, theta=theta)
    return positions_BT.astype(jnp.float32)[..., None] * inv_freq


def rotary_dim(head_dim: int, fraction: float) -> int:
    """The rotated part of a head of ``head_dim`` for a rotary ``fraction`` (as transformers'
    ``partial_rotary_factor``: ``int(head_dim * fraction)``); ValueError unless even and >= 2."""
    rd = int(head_dim * fraction)
    if rd < 2 or rd % 2:
        raise ValueError(f"rope_fraction={fraction} rotates int({head_dim} * {fraction}) = {rd} dims of a "
                         f"{head_dim}-dim head; that must be an even number >= 2.")
    return rd


def apply_rope(x_BTHE, positions_BT, *, theta: float = 10_000.0, scaling: RopeScaling | None = None,
               rotary_dim: int | None = None):
    """Rotate ``x [B, T, H, E]`` by ``positions [B, T]`` (or ``[T]``); returns x's dtype.
    ``rotary_dim``: rotate only the first that many dims (None: all E); YaRN's
    ``scaling.attention_factor`` multiplies the rotated dims only."""
    if positions_BT.ndim == 1:
        positions_BT = positions_BT[None]
    E = x_BTHE.shape[-1]
    if rotary_dim is not None and rotary_dim != E:
        if not 0 < rotary_dim < E:
            raise ValueError(f"rotary_dim={rotary_dim} must be in (0, head_dim={E}].")
        rotated = apply_rope(x_BTHE[..., :rotary_dim], positions_BT, theta=theta, scaling=scaling)
        return jnp.concatenate([rotated, x_BTHE[..., rotary_dim:]], axis=-1)
    angles = rope_angles(positions_BT, E, theta, scaling)[:, :, None, :]  # [B, T, 1, E/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    gain = 1.0 if scaling is None else scaling.attention_factor
    if gain != 1.0:  # YaRN: scales the rotated output (cos and sin alike)
        sin, cos = sin * gain, cos * gain
    x = x_BTHE.astype(jnp.float32)
    x1, x2 = x[..., : E // 2], x[..., E // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTHE.dtype)
