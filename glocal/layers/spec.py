"""What a decoder layer is made of: its shape (``LayerSpec``) and its kind (``LayerKind``),
plus the two registries that make mixers and FFNs pluggable.

A decoder layer is ``norm -> mixer -> residual -> norm -> FFN -> residual``. The *mixer*
moves information between positions (global attention, sliding-window attention; linear
attention and short convolutions plug in the same way) and owns its decoding cache; the
*FFN* transforms each position (a dense MLP; mixture-of-experts plugs in the same way).
Adding a kind is one class and one registration::

    @register_mixer("my_mixer", letter="m")  # letter: usable in layer_pattern="mmg"
    class MyMixer(nnx.Module):
        def __init__(self, spec: LayerSpec, *, mask: Mask | None, rngs: nnx.Rngs): ...
        def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None,
                     valid_BT=None):  # -> (y_BTD, cache); cache is None when none was given
        def init_cache(self, batch_size: int, max_len: int) -> Cache: ...  # a glocal.layers.Cache
        def cache_nbytes(self, batch_size: int, length: int) -> int: ...
        def score_flops(self, seq_len: int) -> float: ...  # forward FLOPs per position
                                                           # beyond the parameter matmuls

    @register_ffn("my_ffn")
    class MyFFN(nnx.Module):
        def __init__(self, spec: LayerSpec, *, rngs: nnx.Rngs): ...
        def __call__(self, x_BTD):  # -> y_BTD, or (y_BTD, {name: (loss, weight)}) for aux losses

``cache`` arrives as the layer's own cache or as a ``LayerView`` of a cache stacked over
layers; write through the cache's methods that take ``layer=`` so both work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dataclasses
from typing import Callable

from glocal.kernels.masks import Mask

MIXERS: dict[str, Callable] = {}
FFNS: dict[str, Callable] = {}
MIXER_LETTERS: dict[str, str] = {}  # one-letter names for layer patterns ("sssg")


def register_mixer(name: str, letter: str | None = None):
    """Class decorator: make a mixer available as ``LayerKind(mixer=name)`` and, with a
    ``letter``, in layer-pattern strings such as the baseline's ``layer_pattern``."""
    if letter is not None:
        if len(letter) != 1 or MIXER_LETTERS.get(letter, name) != name:
            raise ValueError(f"mixer letter {letter!r} must be one character not used by another mixer "
                             f"(taken: {MIXER_LETTERS}).")
        MIXER_LETTERS[letter] = name
    return _register(MIXERS, "mixer", name)


def unregister(name: str) -> None:
    """Remove a mixer or FFN kind (tests that register toy kinds clean up with this)."""
    MIXERS.pop(name, None)
    FFNS.pop(name, None)
    for letter in [k for k, v in MIXER_LETTERS.items() if v == name]:
        del MIXER_LETTERS[letter]


def register_ffn(name: str):
    """Class decorator: make an FFN available as ``LayerKind(ffn=name)``."""
    return _register(FFNS, "ffn", name)


def _register(table: dict, what: str, name: str):
    def add(cls):
        if name in table and table[name] is not cls:
            raise ValueError(f"a {what} named {name!r} is already registered ({table[name].__name__}).")
        table[name] = cls
        return cls
    return add

if TYPE_CHECKING:
    from glocal.layers.moe import MoESpec
    from glocal.layers.rope import RopeScaling


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The shape and numerics shared by every layer of one stack (a model config builds it)."""

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None  # None = num_heads
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 256
    mlp: str = "swiglu"  # activation of the dense FFN
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope_theta: float | None = 10_000.0  # None: no positions
    rope_scaling: "RopeScaling | None" = None  # longer-context frequency scaling (glocal.layers.rope)
    qk_norm: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    attn_softcap: float | None = None
    sliding_window: int | None = None  # tokens a "window" mixer sees, the query included
    feature_dim: int = 16  # F: q/k features per head of a "linear" mixer
    feature_map: str = "taylor"  # taylor | elu | relu ("linear" mixer)
    conv_width: int = 3  # W: taps of a "conv" mixer's causal depthwise convolution
    conv_expand: int = 2  # a "conv" mixer's inner width / d_model
    linear_impl: str = "auto"  # a "linear" mixer's kernel: auto | quadratic | chunked | pallas_tpu | pallas_gpu
    linear_chunk_size: int = 64  # its chunk length (chunked and Pallas forms)
    attention_impl: str = "auto"
    moe: "MoESpec | None" = None  # a "moe" FFN's experts and router (glocal.layers.moe.MoESpec)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """Which mixer and FFN a layer uses; ``mask`` overrides the mixer's default mask (e.g.
    FIT's chunk-causal latent layers, or ``Full()`` for an encoder)."""

    mixer: str = "global"
    ffn: str = "mlp"
    mask: Mask | None = None

    def check(self) -> None:
        for name, table, what in ((self.mixer, MIXERS, "mixer"), (self.ffn, FFNS, "ffn")):
            if name not in table:
                raise ValueError(f"unknown {what} kind {name!r}; registered: {sorted(table)}.")
