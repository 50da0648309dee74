"""Tokenizers: a tiny interface and the byte-level default.

Any object with ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_id``, ``eos_id`` and ``pad_id`` works everywhere a tokenizer is taken; optional
extras: ``eos_ids`` (every id that ends a generation), ``encode_batch(texts)`` (many
documents at once), ``fingerprint`` (equal for tokenizers that give the same ids) and
``save(folder)`` (copy its files, so ``kind:folder`` loads it again). Other kinds plug in
with ``register_tokenizer`` and are then selected by ``get_tokenizer("kind:arg")``; ``hf``
(a local Hugging Face ``tokenizer.json``, ``glocal.hf.tokenizer``) is built in.

Dependencies point one way at import time: ``glocal.hf.tokenizer`` imports this module (for
``TokenizerError``), as any plug-in kind would; this module names it only inside ``_hf``,
so importing it loads neither ``glocal.hf`` nor the ``tokenizers`` library.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Protocol, Sequence

from glocal.errors import TokenizerError


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
    eos_ids = (258,)
    name = fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Specials are dropped; a multi-byte character cut in half decodes as U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _hf(arg: str) -> Tokenizer:
    from glocal.hf.tokenizer import HFTokenizer  # (glocal.hf and the tokenizers library: only when used)

    return HFTokenizer(arg)


_FACTORIES: dict[str, Callable[[str], Tokenizer]] = {"byte": lambda _arg: ByteTokenizer(), "hf": _hf}
_PATH_KINDS = {"hf"}  # kinds whose argument is a path (resolved against ``base``)


def register_tokenizer(kind: str, factory: Callable[[str], Tokenizer], *, path: bool = False) -> None:
    """Make ``get_tokenizer(f"{kind}:{arg}")`` call ``factory(arg)``; ``path=True`` says the
    argument is a file or folder, so a relative one is resolved against ``base``."""
    _FACTORIES[kind] = factory
    (_PATH_KINDS.add if path else _PATH_KINDS.discard)(kind)


def get_tokenizer(spec: str | None = "byte", base=None) -> Tokenizer:
    """``"byte"`` (default) or ``"<kind>:<argument>"`` for a registered kind. A relative path
    argument is taken relative to ``base`` when given: a workdir's model.json records its own
    copy of a tokenizer as ``hf:tokenizer``, i.e. ``WORKDIR/tokenizer``. The tokenizer's
    ``name`` is ``spec`` as given."""
    spec = spec or "byte"
    kind, _, arg = spec.partition(":")
    if kind not in _FACTORIES:
        raise TokenizerError(f"unknown tokenizer {kind!r} in {spec!r}; registered kinds: {sorted(_FACTORIES)} "
                             f"(e.g. byte, or hf:DIR for a folder holding a Hugging Face tokenizer.json).")
    if kind in _PATH_KINDS and not arg:
        raise TokenizerError(f"tokenizer {spec!r} names no path; use {kind}:PATH.")
    if kind in _PATH_KINDS and base is not None and not pathlib.Path(arg).expanduser().is_absolute():
        tokenizer = _FACTORIES[kind](str(pathlib.Path(base) / arg))
        tokenizer.name = spec
        return tokenizer
    return _FACTORIES[kind](arg)


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Every id that ends a generation: ``eos_ids`` where the tokenizer has them, else EOS."""
    return [int(i) for i in (getattr(tokenizer, "eos_ids", None) or [tokenizer.eos_id])]


def decode_continuation(tokenizer: Tokenizer, prompt: Sequence[int], new: Sequence[int]) -> str:
    """The text that ``new`` adds after ``prompt``: decoded together and the prompt's text
    cut off, since tokenizers that drop a word's leading space at the start of a text
    (SentencePiece-style) would lose it decoding ``new`` alone."""
    before, text = tokenizer.decode(prompt), tokenizer.decode(list(prompt) + list(new))
    return text[len(before):] if text.startswith(before) else tokenizer.decode(new)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` give the same ids (same ``fingerprint``; without one, same name)."""
    key = lambda t: getattr(t, "fingerprint", None) or getattr(t, "name", None) or id(t)
    return key(a) == key(b)
