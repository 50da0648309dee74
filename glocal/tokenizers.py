"""Tokenizers: a tiny interface and the byte-level default.

Any object with ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_id``, ``eos_id`` and ``pad_id`` works everywhere a tokenizer is taken. Other kinds
(a local SentencePiece or Hugging Face tokenizer file) plug in with ``register_tokenizer``
and are then selected by ``get_tokenizer("kind:path")``.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; specials follow: pad 256, bos 257, eos 258."""

    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Specials are dropped; a multi-byte character cut in half decodes as U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


_FACTORIES: dict[str, Callable[[str], Tokenizer]] = {"byte": lambda _arg: ByteTokenizer()}


def register_tokenizer(kind: str, factory: Callable[[str], Tokenizer]) -> None:
    """Make ``get_tokenizer(f"{kind}:{arg}")`` call ``factory(arg)``."""
    _FACTORIES[kind] = factory


def get_tokenizer(spec: str | None = "byte") -> Tokenizer:
    """``"byte"`` (default) or ``"<kind>:<argument>"`` for a registered kind."""
    spec = spec or "byte"
    kind, _, arg = spec.partition(":")
    if kind not in _FACTORIES:
        raise ValueError(f"unknown tokenizer {kind!r}; registered kinds: {sorted(_FACTORIES)}.")
    return _FACTORIES[kind](arg)
