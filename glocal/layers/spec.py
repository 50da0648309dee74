"""What a decoder layer is made of: its shape (``LayerSpec``), its kind (``LayerKind``: a mixer
and an FFN, each a registered name plus that kind's own options), and the registry that makes
kinds pluggable.

A decoder layer is ``norm -> mixer -> residual -> norm -> FFN -> residual``. The *mixer*
moves information between positions (global or sliding-window attention, linear attention,
short convolutions) and owns its decoding cache; the *FFN* transforms each position (a dense
MLP, mixture-of-experts). Adding a kind is one file: its class, its options and its cache,
and one registration::

    @dataclasses.dataclass(frozen=True)
    class MyOptions(KindOptions):
        width: int = 4
        def validate(self, config=None):        # errors name the user's field: my_mixer.width
            if self.width < 1:
                raise self.error("width", "must be positive")

    @register_mixer("my_mixer", letter="m", options=MyOptions)  # letter: layer_pattern="mmg"
    class MyMixer(nnx.Module):
        packs_documents = False  # True only if it honours segment_ids_BT
        bounded_cache = False  # True if its cache does not grow with the sequence (decodes past max_seq_len)
        def __init__(self, spec: LayerSpec, options: MyOptions, *, mask: Mask | None, rngs): ...
        def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None, cache=None,
                     valid_BT=None):  # -> (y_BTD, cache); cache is None when none was given
        def init_cache(self, batch_size: int, max_len: int) -> Cache: ...  # a glocal.layers.Cache
        def score_flops(self, seq_len: int) -> float: ...  # forward FLOPs per position
                                                           # beyond the parameter matmuls

    @register_ffn("my_ffn", options=None)
    class MyFFN(nnx.Module):
        def __init__(self, spec: LayerSpec, options: None, *, rngs: nnx.Rngs): ...
        def __call__(self, x_BTD):  # -> (y_BTD, {name: (loss, weight)}); {} when it has none

Every built-in kind lives in a module of ``glocal.layers`` and registers when
``load_builtin_kinds`` imports the package's modules, so a new file there is picked up with no
edit elsewhere. Every model config then accepts ``my_mixer.width=8`` (the options travel in
the config's ``options`` table and its JSON as a ``"my_mixer"`` section). ``cache`` arrives as
the layer's own cache or as a ``LayerView`` of a cache stacked over layers; write through the
cache's methods that take ``layer=`` so both work.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import pkgutil
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from glocal.configs.base import ConfigError
from glocal.kernels.masks import Mask

if TYPE_CHECKING:
    from glocal.layers.rope import RopeScaling


@dataclasses.dataclass(frozen=True)
class KindOptions:
    """Base of a kind's options: a frozen dataclass validated when built (``validate()``) and
    again against the whole model config (``validate(config)``: checks that need it, such as
    a window no longer than the context). Set by ``kind.field=value`` on any model config."""

    section: ClassVar[str] = ""  # the kind's name, set by the registration

    def __post_init__(self):
        self.validate()

    def validate(self, config: Any = None) -> None:
        pass

    def error(self, field: str, problem: str) -> ConfigError:
        """``ConfigError('window.size=0 must be positive')``: names the field as the user sets it."""
        return ConfigError(f"{self.section}.{field}={getattr(self, field)!r} {problem}")

    def routing_modes(self) -> tuple[str, ...]:
        """The routing modes to report when this kind routes non-causally in training
        (``("topk", "threshold")`` for expert choice); empty when it is causal as trained."""
        return ()

    def with_routing_mode(self, mode: str) -> "KindOptions":
        """These options routed by ``mode`` (only kinds with ``routing_modes()`` change)."""
        return self


@dataclasses.dataclass(frozen=True)
class Kind:
    """A registered mixer or FFN: its class, its options class (None: it has none), its
    pattern letter (mixers) and the flat config keys that older configs used for its options."""

    name: str
    role: str  # "mixer" | "ffn"
    cls: Callable
    options: type[KindOptions] | None = None
    letter: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()  # (flat key, option field), e.g. ("sliding_window", "size")

    def default_options(self) -> KindOptions | None:
        return None if self.options is None else self.options()


KINDS: dict[str, Kind] = {}
MIXERS: dict[str, Callable] = {}  # name -> class, views of KINDS by role
FFNS: dict[str, Callable] = {}
MIXER_LETTERS: dict[str, str] = {}  # one-letter names for layer patterns ("sssg")


def register_mixer(name: str, letter: str | None = None, *, options: type[KindOptions] | None = None,
                   aliases: dict[str, str] | None = None):
    """Class decorator: make a mixer available as ``LayerKind(mixer=name)`` and, with a
    ``letter``, in layer-pattern strings such as the baseline's ``layer_pattern``; ``options``
    is its ``KindOptions`` class; ``aliases`` maps flat config keys of older configs onto its
    option fields (``{"sliding_window": "size"}``)."""
    if letter is not None and (len(letter) != 1 or MIXER_LETTERS.get(letter, name) != name):
        raise ValueError(f"mixer letter {letter!r} must be one character not used by another mixer "
                         f"(taken: {MIXER_LETTERS}).")
    return _register(name, "mixer", options, letter, aliases)


def register_ffn(name: str, *, options: type[KindOptions] | None = None, aliases: dict[str, str] | None = None):
    """Class decorator: make an FFN available as ``LayerKind(ffn=name)`` (see ``register_mixer``)."""
    return _register(name, "ffn", options, None, aliases)


def _register(name: str, role: str, options, letter, aliases):
    def add(cls):
        old = KINDS.get(name)
        if old is not None and old.cls is not cls:
            raise ValueError(f"a kind named {name!r} is already registered ({old.cls.__name__}).")
        if options is not None:
            if not (isinstance(options, type) and issubclass(options, KindOptions)):
                raise TypeError(f"options of kind {name!r} must be a KindOptions dataclass, got {options!r}.")
            options.section = name
        taken = {flat: k.name for k in KINDS.values() if k.name != name for flat, _ in k.aliases}
        for flat in aliases or {}:
            if flat in taken:
                raise ValueError(f"flat key {flat!r} of kind {name!r} is already an alias of {taken[flat]!r}.")
        KINDS[name] = Kind(name, role, cls, options, letter, tuple((aliases or {}).items()))
        (MIXERS if role == "mixer" else FFNS)[name] = cls
        if letter is not None:
            MIXER_LETTERS[letter] = name
        return cls
    return add


def unregister(name: str) -> None:
    """Remove a mixer or FFN kind (tests that register toy kinds clean up with this)."""
    KINDS.pop(name, None)
    MIXERS.pop(name, None)
    FFNS.pop(name, None)
    for letter in [k for k, v in MIXER_LETTERS.items() if v == name]:
        del MIXER_LETTERS[letter]


_BUILTINS_LOADED = []  # set once every module of the package has been imported


def load_builtin_kinds() -> None:
    """Import every module of ``glocal.layers`` so that each built-in kind registers itself
    (a new kind's file needs no import line anywhere). Done once; later calls are free."""
    if _BUILTINS_LOADED:
        return
    here = pathlib.Path(__file__).parent  # this package's folder (no import of the package itself)
    for info in pkgutil.iter_modules([str(here)]):
        importlib.import_module(f"{__package__}.{info.name}")
    _BUILTINS_LOADED.append(True)


def kind(name: str, role: str) -> Kind:
    """The registered kind ``name`` of ``role``; the error lists what is registered."""
    load_builtin_kinds()
    k = KINDS.get(name)
    if k is None or k.role != role:
        names = sorted(n for n, k in KINDS.items() if k.role == role)
        raise ConfigError(f"unknown {role} kind {name!r}; registered: {names}.")
    return k


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The shape and numerics shared by every layer of one stack (a model config builds it).
    What belongs to one kind alone (a window's size, linear attention's features, the
    experts) is that kind's options, in ``LayerKind``."""

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None  # None = num_heads
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 256
    mlp: str = "swiglu"  # activation of the dense FFN (and of experts)
    swiglu_alpha: float = 1.702  # mlp="swiglu_clamped" only (glocal.layers.mlp.activate)
    swiglu_limit: float = 7.0  # mlp="swiglu_clamped" only
    norm: str = "rms"  # rms | layer | rms_centered (gain 1 + scale; also the qk-norm's)
    norm_eps: float = 1e-6
    rope_theta: float | None = 10_000.0  # None: no positions
    rope_scaling: "RopeScaling | None" = None  # longer-context frequency scaling (glocal.layers.rope)
    rope_fraction: float = 1.0  # RoPE on the first int(head_size * rope_fraction) dims of each head
    qk_norm: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    attn_out_bias: bool = False  # a bias o_b_D on the output projection (GPT-OSS)
    attn_output_gate: bool = False  # o * sigmoid(x gate_DHE) per head before o_HED (Qwen3-Next)
    attn_softcap: float | None = None
    attn_sinks: bool = False  # a learned sink logit per query head in the softmax (GPT-OSS)
    attention_impl: str = "auto"
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
    """Which mixer and FFN a layer uses, each with its options (None: the kind's defaults);
    ``mask`` overrides the mixer's default mask (e.g. FIT's chunk-causal latent layers, or
    ``Full()`` for an encoder)."""

    mixer: str = "global"
    ffn: str = "mlp"
    mask: Mask | None = None
    mixer_options: KindOptions | None = None
    ffn_options: KindOptions | None = None

    def build_mixer(self, spec: LayerSpec, *, rngs):
        k = kind(self.mixer, "mixer")
        return k.cls(spec, _options(k, self.mixer_options), mask=self.mask, rngs=rngs)

    def build_ffn(self, spec: LayerSpec, *, rngs):
        k = kind(self.ffn, "ffn")
        return k.cls(spec, _options(k, self.ffn_options), rngs=rngs)


def _options(k: Kind, given: KindOptions | None) -> KindOptions | None:
    if given is None:
        return k.default_options()
    if k.options is None or not isinstance(given, k.options):
        raise TypeError(f"{k.role} kind {k.name!r} takes {k.options and k.options.__name__} options, "
                        f"got {type(given).__name__}.")
    return given
