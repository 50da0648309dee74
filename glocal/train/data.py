"""The default corpus: the running Python's own standard-library source.

It is on every machine with Python, needs no network, and suits a byte-level LM. Files are
sorted for determinism; tests, idlelib, lib2to3 and site-packages are skipped. Every 50th
file goes to the validation split. The fingerprint (a hash of the bytes) is logged because
the text differs between Python versions.
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig

import numpy as np

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
DOC_SEPARATOR = 258  # the byte tokenizer's EOS id between files


def default_corpus_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    if not files:
        raise FileNotFoundError(
            f"no .py files found under the standard library at {root}; pass data=PATH to train "
            f"on your own text instead."
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_default_corpus(val_every: int = 50) -> tuple[np.ndarray, np.ndarray, str]:
    """``(train_tokens, val_tokens, fingerprint)`` as uint16 byte ids with EOS between files."""
    train, val = [], []
    digest = hashlib.sha256()
    for i, path in enumerate(default_corpus_files()):
        data = path.read_bytes()
        digest.update(data)
        doc = np.frombuffer(data, np.uint8).astype(np.uint16)
        (val if i % val_every == val_every - 1 else train).extend([doc, np.array([DOC_SEPARATOR], np.uint16)])
    return np.concatenate(train), np.concatenate(val), digest.hexdigest()[:16]


def random_windows(tokens: np.ndarray, batch_size: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``[batch_size, length]`` int32 windows starting at uniformly random offsets."""
    if len(tokens) < length + 1:
        raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one window of {length + 1}.")
    starts = rng.integers(0, len(tokens) - length, size=batch_size)
    return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)
