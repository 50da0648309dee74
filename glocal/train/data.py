"""Training data: a source -> one token stream per split -> packed windows -> grain batches.

Sources (``data=`` of ``glocal train``):
  ``default``          the running Python's standard-library source (no network needed;
                       sorted files, tests/idlelib/lib2to3/site-packages skipped, every 50th
                       file held out for validation, fingerprint logged: it varies by version)
  a folder             every non-hidden text file below it, sorted; one document per file
  a text file          one document
  ``*.npy``            a 1-D integer token array (memory-mapped)
  ``*.bin``            raw token ids of ``data_dtype`` (memory-mapped; nanoGPT layout)
  ``*.array_record``   one document per record (UTF-8 text)

Text documents become ``[BOS] tokens [EOS]`` and are concatenated. The stream is cut into
windows of ``seq_len + 1`` tokens at stride ``seq_len`` (inputs and shifted targets); with
``pack=True`` a new segment starts after every EOS, so each window carries segment ids and
positions that restart at document starts (attention stays inside documents) and a loss
mask that drops only the prediction across a boundary.

Batches come from a grain ``MapDataset``: a seeded global shuffle of window indices,
reshuffled each epoch, cut into global batches. Every process builds the same global batch of
indices and reads only the rows its devices hold (``glocal.sharding.process_rows``), so the
data order does not depend on the number of processes. The iterator state is a count of
global batches, saved in every checkpoint (the same in every process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

import grain
import numpy as np

from glocal.errors import UserError

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
VAL_EVERY = 50  # documents: every 50th goes to validation
TOKEN_SUFFIXES = (".npy", ".bin")
RECORD_SUFFIXES = (".array_record", ".arrayrecord")


class DataError(UserError, ValueError):
    """The data source is missing, empty, too short, or holds ids outside the vocabulary."""


@dataclasses.dataclass
class Corpus:
    train: np.ndarray  # 1-D token ids (possibly a read-only memmap)
    val: np.ndarray
    eos_id: int | None  # segment boundary after this id; None = no document structure
    description: str
    fingerprint: str
    # UTF-8 bytes of text the validation split holds (a tail cut through a document counts
    # that document's bytes in proportion to its tokens); None for token arrays.
    val_bytes: float | None = None


# --------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------
def default_corpus_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    if not files:
        raise DataError(f"no .py files found under the standard library at {root}; pass "
                        f"data=PATH to train on your own text instead.")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_text(raw: bytes) -> bool:
    return b"\0" not in raw[:8192]


def _folder_files(root: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in root.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _encode(tokenizer, docs: list[bytes]) -> list[np.ndarray]:
    """``[BOS] tokens [EOS]`` per document (the tokenizer adds no special tokens itself)."""
    if getattr(tokenizer, "name", None) == "byte":  # fast path: the ids are the bytes
        bodies = [np.frombuffer(raw, np.uint8) for raw in docs]
    else:
        texts = [raw.decode("utf-8", errors="replace") for raw in docs]
        batch = getattr(tokenizer, "encode_batch", None)  # (a library's batch call runs in parallel)
        bodies = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    return [np.concatenate([[tokenizer.bos_id], np.asarray(b, np.int32), [tokenizer.eos_id]]).astype(np.int32)
            for b in bodies]


def _documents(path: pathlib.Path | None) -> tuple[list[bytes], str]:
    """Raw documents of a text source and a description."""
    if path is None:
        files = default_corpus_files()
        return [p.read_bytes() for p in files], f"default corpus (Python stdlib, {len(files)} files)"
    if path.is_dir():
        docs = [raw for raw in (p.read_bytes() for p in _folder_files(path)) if raw and _is_text(raw)]
        return docs, f"folder {path} ({len(docs)} text files)"
    if path.suffix in RECORD_SUFFIXES:
        return _records(path)
    raw = path.read_bytes()
    if raw and not _is_text(raw):
        raise DataError(f"{path} looks binary (it contains NUL bytes). Token arrays must end in "
                        f".npy or .bin; text must be UTF-8.")
    return ([raw] if raw else []), f"text file {path}"


def _records(path: pathlib.Path) -> tuple[list[bytes], str]:
    from array_record.python.array_record_module import ArrayRecordReader

    try:  # the reader raises assorted types for a file that is not an array_record
        reader = ArrayRecordReader(str(path))
        try:
            docs = [r for r in reader.read_all() if r]
        finally:
            reader.close()
    except Exception as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise DataError(f"{path} is not a readable .array_record file ({type(e).__name__}: {reason}); "
                        f"write it with array_record's ArrayRecordWriter, or rename a text file so it "
                        f"does not end in {path.suffix}.") from None
    return docs, f"array_record {path} ({len(docs)} records)"


def _token_array(path: pathlib.Path, data_dtype: str) -> np.ndarray:
    if path.suffix == ".npy":
        fix = "save token ids with numpy.save, or rename a text file so it does not end in .npy"
        with path.open("rb") as f:
            if f.read(6) != b"\x93NUMPY":  # the .npy magic string
                raise DataError(f"{path} is not a .npy array file (no .npy header): {fix}.")
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:  # a damaged header, truncated data, ...
            raise DataError(f"{path} is not a readable .npy array ({' '.join(str(e).split())}): "
                            f"{fix}.") from None
    else:
        try:
            dtype = np.dtype(data_dtype)
        except TypeError:
            raise DataError(f"data_dtype={data_dtype!r} is not a numpy dtype (e.g. uint16).") from None
        if not path.stat().st_size:
            raise DataError(f"{path} is empty: it holds no tokens.")
        if path.stat().st_size % dtype.itemsize:
            raise DataError(f"{path} has {path.stat().st_size} bytes, not a whole number of "
                            f"{dtype} tokens; check data_dtype.")
        tokens = np.memmap(path, dtype=dtype, mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path} must hold a 1-D integer token array, got shape {tokens.shape} "
                        f"dtype {tokens.dtype}.")
    return tokens


def _fingerprint(chunks) -> str:
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c if isinstance(c, bytes) else np.ascontiguousarray(c).tobytes())
    return digest.hexdigest()[:16]


def _split_tail(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(tokens) - max(1, int(len(tokens) * fraction))
    return tokens[:cut], tokens[cut:]


def _load_one(spec: str, tokenizer, data_dtype: str, eos_id: int):
    """``(docs_or_None, tokens_or_None, eos, description, fingerprint)`` for one source."""
    if spec == "default":
        path = None
    else:
        path = pathlib.Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"data path {spec!r} does not exist. Pass a text file, a folder of text "
                            f"files, a .npy/.bin token array, an .array_record file, or data=default.")
    try:
        if path is not None and path.is_file() and path.suffix in TOKEN_SUFFIXES:
            tokens = _token_array(path, data_dtype)
            head = [np.asarray(tokens[:1 << 20]), np.asarray(tokens[-(1 << 20):]), str(len(tokens)).encode()]
            return None, tokens, (eos_id if eos_id >= 0 else None), f"token array {path}", _fingerprint(head)
        docs, description = _documents(path)
    except PermissionError as e:
        raise DataError(f"cannot read {e.filename or spec} (permission denied); fix its permissions "
                        f"or pass another data=.") from None
    if not docs:
        raise DataError(f"the corpus {description} is empty: no non-empty text documents found.")
    return docs, None, tokenizer.eos_id, description, _fingerprint(docs)


def load_corpus(spec: str, *, tokenizer, vocab_size: int, val_spec: str = "", val_fraction: float = 0.02,
                data_dtype: str = "uint16", eos_id: int = -1) -> Corpus:
    """Load ``spec`` (and ``val_spec``) into train/validation token streams and check them."""
    docs, tokens, eos, description, fingerprint = _load_one(spec, tokenizer, data_dtype, eos_id)
    val_bytes = None
    if docs is not None:
        encoded = _encode(tokenizer, docs)
        if val_spec or len(encoded) < VAL_EVERY:
            train = np.concatenate(encoded)
            val = None
        else:  # every 50th document is held out, so validation spans the whole corpus
            train = np.concatenate([e for i, e in enumerate(encoded) if i % VAL_EVERY != VAL_EVERY - 1])
            val = np.concatenate([e for i, e in enumerate(encoded) if i % VAL_EVERY == VAL_EVERY - 1])
            val_bytes = float(sum(len(d) for d in docs[VAL_EVERY - 1::VAL_EVERY]))
    else:
        train, val = tokens, None
    if val_spec:
        vdocs, vtokens, _, vdesc, vfp = _load_one(val_spec, tokenizer, data_dtype, eos_id)
        val = np.concatenate(_encode(tokenizer, vdocs)) if vdocs is not None else vtokens
        val_bytes = float(sum(map(len, vdocs))) if vdocs is not None else None
        description += f"; validation: {vdesc}"
        fingerprint += f"+{vfp}"
    elif val is None:
        train, val = _split_tail(train, val_fraction)
        if docs is not None:
            val_bytes = _tail_bytes(docs, [len(e) for e in encoded], len(val))
        description += f" (last {val_fraction:.0%} held out for validation)"
    for name, split in (("training", train), ("validation", val)):
        check_vocab(split, vocab_size, f"{name} data of {description}")
    return Corpus(train=train, val=val, eos_id=eos, description=description, fingerprint=fingerprint,
                  val_bytes=val_bytes)


def _tail_bytes(docs: list[bytes], lengths: list[int], n: int) -> float:
    """UTF-8 bytes under the last ``n`` tokens of the documents' concatenated token streams
    (``lengths`` tokens each): whole documents count in full, the one the cut goes through
    in proportion to its tokens on the tail side."""
    total = 0.0
    for raw, length in zip(reversed(docs), reversed(lengths)):
        take = min(n, length)
        total += len(raw) * take / length
        n -= take
        if not n:
            break
    return total


def tokens_per_byte(corpus: Corpus, tokenizer, pack: bool) -> float | None:
    """Tokens the validation loss is taken over per UTF-8 byte of the validation text, which
    turns bits/token into bits/byte. 1 for the byte tokenizer (bits/token are bits/byte, as
    always reported); None when the bytes are unknown (a token-array validation split).

    Counted like the loss mask of ``Windows`` counts targets: every token but the first,
    less (with packing) the targets after an EOS, i.e. the next document's BOS."""
    if getattr(tokenizer, "name", None) == "byte":
        return 1.0
    if not corpus.val_bytes:
        return None
    val = corpus.val
    targets = len(val) - 1
    if pack and corpus.eos_id is not None:
        targets -= int(np.count_nonzero(np.asarray(val[:-1]) == corpus.eos_id))
    return targets / corpus.val_bytes


def check_vocab(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    if len(tokens) == 0:
        raise DataError(f"the {what} is empty.")
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        where = int(np.argmax(tokens == bad))
        raise DataError(f"token id {bad} (first at position {where:,}) in the {what} is outside the "
                        f"model's vocabulary [0, {vocab_size}). Raise vocab_size, or check data_dtype "
                        f"and that the data was made with this model's tokenizer.")


# --------------------------------------------------------------------------------------
# windows and batches
# --------------------------------------------------------------------------------------
class Windows:
    """Window ``i`` = tokens ``[i*T, i*T + T + 1)``: inputs, targets, segments, positions."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int | None, pack: bool, what: str):
        if len(tokens) < seq_len + 1:
            raise DataError(f"the {what} has {len(tokens):,} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}. Use a smaller seq_len or more data.")
        self.tokens, self.seq_len = tokens, seq_len
        self.eos_id = eos_id if pack else None
        self.num_windows = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        T = self.seq_len
        idx = np.asarray(idx)
        w = np.asarray(self.tokens[(idx.reshape(-1, 1) * T + np.arange(T + 1))], np.int32)
        if self.eos_id is None:
            seg = np.zeros_like(w)
        else:  # a new segment starts right after each EOS
            seg = np.concatenate([np.zeros_like(w[:, :1]), np.cumsum(w[:, :-1] == self.eos_id, axis=1)], 1)
        seg_in, seg_out = seg[:, :-1], seg[:, 1:]
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), seg_in.shape)
        starts = np.where(np.concatenate([np.ones_like(seg_in[:, :1], bool),
                                          seg_in[:, 1:] != seg_in[:, :-1]], 1), pos, 0)
        batch = {
            "inputs": w[:, :-1], "targets": w[:, 1:],
            "positions": (pos - np.maximum.accumulate(starts, axis=1)).astype(np.int32),
            "segment_ids": (seg_in + 1).astype(np.int32),
            "loss_mask": (seg_in == seg_out).astype(np.float32),
        }
        return {k: v.reshape(*idx.shape, T) for k, v in batch.items()}


class _MakeBatch(grain.transforms.Map):
    """Global batch of window indices -> this process's rows, shaped ``[grad_accum, b_local, T]``."""

    def __init__(self, windows: Windows, grad_accum: int, rows: slice):
        self.windows, self.accum, self.rows = windows, grad_accum, rows

    def map(self, idx_B):
        return self.windows.rows(np.asarray(idx_B).reshape(self.accum, -1)[:, self.rows])


def train_iterator(windows: Windows, *, batch_size: int, grad_accum: int, seed: int, rows: slice | None = None,
                   threads: int = 2):
    """An endless, checkpointable grain iterator of this process's training batches:
    ``rows`` of each microbatch (``glocal.sharding.process_rows``; default all). Its state
    (the number of global batches taken) is the same in every process."""
    ds = (grain.MapDataset.range(len(windows)).seed(seed).shuffle().repeat(None)
          .batch(batch_size, drop_remainder=True)
          .map(_MakeBatch(windows, grad_accum, rows or slice(None))))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)))


def eval_batches(windows: Windows, *, batch_size: int, num_batches: int,
                 rows: slice | None = None) -> list[dict[str, np.ndarray]]:
    """The same ``num_batches`` validation batches every time: windows evenly spread over the
    whole split (repeating when it is smaller), ``rows`` of each (default all)."""
    n = batch_size * num_batches
    idx = np.linspace(0, len(windows) - 1, n).round().astype(np.int64).reshape(num_batches, batch_size)
    return [windows.rows(row[rows or slice(None)]) for row in idx]


# --------------------------------------------------------------------------------------
# a run's data
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunData:
    """The data a training config reads, as ``glocal train`` and ``glocal eval`` use it."""

    corpus: Corpus
    tokens_per_byte: float | None  # ``tokens_per_byte``: turns bits/token into bits/byte
    val_batches: list[dict[str, np.ndarray]]  # this process's rows of the fixed validation batches
    train_windows: Windows | None  # (None when only evaluating)


def run_data(tcfg, tokenizer, vocab_size: int, *, rows: slice | None = None, train: bool = True,
             log=None) -> RunData:
    """Load the corpus of ``tcfg`` (a ``TrainConfig``) and cut it into windows; ``log`` (if
    given) hears what was loaded. The validation batches are microbatches of the training
    step, ``eval_batches * grad_accum`` of them, so they are the same in training and eval."""
    corpus = load_corpus(tcfg.data, tokenizer=tokenizer, vocab_size=vocab_size, val_spec=tcfg.val_data,
                         val_fraction=tcfg.val_fraction, data_dtype=tcfg.data_dtype, eos_id=tcfg.eos_id)
    if log is not None:
        log(f"data: {corpus.description}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens, "
            f"fingerprint {corpus.fingerprint}")
    train_windows = Windows(corpus.train, tcfg.seq_len, corpus.eos_id, tcfg.pack, "training split") if train else None
    val_windows = Windows(corpus.val, tcfg.seq_len, corpus.eos_id, tcfg.pack, "validation split")
    batches = eval_batches(val_windows, batch_size=tcfg.batch_size // tcfg.grad_accum,
                           num_batches=tcfg.eval_batches * tcfg.grad_accum, rows=rows)
    return RunData(corpus, tokens_per_byte(corpus, tokenizer, tcfg.pack), batches, train_windows)
