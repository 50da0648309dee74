"""A Hugging Face ``tokenizer.json``, loaded with the ``tokenizers`` library (no network).

``get_tokenizer("hf:DIR")`` reads ``DIR/tokenizer.json`` (or ``hf:FILE`` a tokenizer.json
file itself, with its sidecar files looked up beside it). BOS, EOS and PAD come from the
first of these that names them, each id on its own:

  1. ``generation_config.json``  ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``
  2. ``config.json``             the same keys
  3. ``tokenizer_config.json``   ``bos_token`` / ``eos_token`` / ``pad_token`` (a string or
                                 ``{"content": ...}``, mapped through the vocabulary)
  4. ``special_tokens_map.json`` the same
  5. well-known token strings in the vocabulary (``<s>``/``</s>``, ``<|endoftext|>``, ...)

``eos_token_id`` may be a list (chat models stop on several): the first is ``eos_id``, all
are ``eos_ids``. An id outside the vocabulary (old configs write ``"pad_token_id": -1``) or
a token string not in it counts as not named. With no BOS anywhere, BOS is EOS (GPT-2 style: one separator token); with
no PAD, PAD is EOS; with no EOS the load fails, naming the files it read.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from typing import Sequence

from glocal.errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
# Files that make up a Hugging Face tokenizer (whichever exist); a workdir keeps a copy of
# them. config.json is among them because it may be where the BOS/EOS ids are written.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "config.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja")
_ID_FILES = ("generation_config.json", "config.json")
_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_WELL_KNOWN = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("hf: tokenizers need the `tokenizers` library, which is not installed; "
                             "pip install 'glocal[hf]' (or pip install tokenizers).") from None
    return tokenizers


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} could not be read as JSON ({e}); fix or remove it.") from None
    return value if isinstance(value, dict) else {}


class HFTokenizer:
    """``encode`` adds no special tokens (the data pipeline adds BOS/EOS itself); ``decode``
    drops them."""

    def __init__(self, path):
        given = pathlib.Path(path).expanduser()
        if not given.exists():
            raise TokenizerError(f"tokenizer path {given} does not exist; pass hf:DIR with a folder holding a "
                                 f"Hugging Face {TOKENIZER_FILE} (e.g. a downloaded model folder), or hf:FILE "
                                 f"with the {TOKENIZER_FILE} file itself.")
        self.file = given / TOKENIZER_FILE if given.is_dir() else given
        self.folder = self.file.parent
        if not self.file.is_file():
            raise TokenizerError(f"{given} holds no {TOKENIZER_FILE}; hf:DIR needs a Hugging Face fast-tokenizer "
                                 f"file there (save one with tokenizer.save_pretrained(DIR), or pass hf:FILE).")
        tokenizers = _import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.file))
        except Exception as e:  # the Rust library raises plain Exceptions for a malformed file
            raise TokenizerError(f"{self.file} is not a readable Hugging Face tokenizer file "
                                 f"({' '.join(str(e).split())[:200]}).") from None
        self.name = f"hf:{path}"
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Added tokens may sit above the base vocabulary with gaps: the size is the top id + 1.
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self.sources: dict[str, str] = {}  # "bos"/"eos"/"pad" -> where the id came from
        ids = {k: self._special(k) for k in ("bos", "eos", "pad")}
        if ids["eos"] is None:
            looked = ", ".join(_ID_FILES + _TOKEN_FILES)
            raise TokenizerError(
                f"no EOS token found for {self.file}: none of {looked} in {self.folder} names one and the vocabulary "
                f"has none of {', '.join(_WELL_KNOWN['eos'])}. Add a generation_config.json with "
                f'{{"eos_token_id": ID}} (and "bos_token_id") beside it.')
        self.eos_ids = tuple(ids["eos"])
        self.eos_id = self.eos_ids[0]
        if ids["bos"] is None:
            ids["bos"], self.sources["bos"] = [self.eos_id], "EOS (no BOS found)"
        if ids["pad"] is None:
            ids["pad"], self.sources["pad"] = [self.eos_id], "EOS (no PAD found)"
        self.bos_id, self.pad_id = ids["bos"][0], ids["pad"][0]
        digest = hashlib.sha256(self.file.read_bytes())
        digest.update(json.dumps([self.bos_id, self.eos_ids, self.pad_id]).encode())
        # Two tokenizers with the same fingerprint map text to the same ids.
        self.fingerprint = f"hf:{digest.hexdigest()[:16]}"

    def _special(self, kind: str) -> list[int] | None:
        """The id(s) of BOS/EOS/PAD from the first source that names one (module docstring)."""
        for name in _ID_FILES:
            path = self.folder / name
            value = _read_json(path).get(f"{kind}_token_id") if path.is_file() else None
            ids = [value] if isinstance(value, int) else value if isinstance(value, list) else []
            if ids and all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
                self.sources[kind] = f"{name} {kind}_token_id"
                return ids
        for name in _TOKEN_FILES:
            path = self.folder / name
            token = _read_json(path).get(f"{kind}_token") if path.is_file() else None
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self._tok.token_to_id(token) is not None:
                self.sources[kind] = f"{name} {kind}_token {token!r}"
                return [self._tok.token_to_id(token)]
        for token in _WELL_KNOWN[kind]:
            if self._tok.token_to_id(token) is not None:
                self.sources[kind] = f"the vocabulary's {token!r}"
                return [self._tok.token_to_id(token)]
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A generation prompt as Hugging Face encodes one: with the tokenizer's own special
        tokens (a Llama tokenizer prepends BOS; a Qwen one adds nothing)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many documents at once (the library encodes them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def files(self) -> list[pathlib.Path]:
        """The files this tokenizer is made of (its tokenizer.json first)."""
        return [self.file] + [self.folder / n for n in TOKENIZER_FILES[1:] if (self.folder / n).is_file()]

    def save(self, folder) -> None:
        """Copy the tokenizer's files into ``folder`` (the tokenizer file as tokenizer.json), so
        ``hf:folder`` loads the same tokenizer."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for src in self.files():
            dst = folder / (TOKENIZER_FILE if src == self.file else src.name)
            if not (dst.exists() and dst.samefile(src)):
                shutil.copyfile(src, dst)
