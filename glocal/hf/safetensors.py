"""Reading and writing safetensors files with numpy alone (no torch, no copy on read).

The format is tiny: an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the byte
buffer that follows the header; ``"__metadata__"`` holds string metadata), then the bytes.
Reading memory-maps the file, so a tensor costs nothing until it is used and a model is
never held twice in host memory; bfloat16 comes back as ``ml_dtypes.bfloat16``.

A checkpoint folder holds ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (``{"metadata": {"total_size": n}, "weight_map": {name:
file}}``); ``CheckpointReader`` reads either, ``write_checkpoint`` writes either.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from glocal.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # a header larger than this is not a safetensors file


class SafetensorsError(UserError, ValueError):
    """A checkpoint file or folder that cannot be read (missing, truncated, not safetensors)."""


def dtype_name(dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors; cast to float32 or bfloat16.") from None


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; ``get(name)`` is a read-only view."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path} is too short ({size} bytes) to be a safetensors file.")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise SafetensorsError(f"{self.path} is not a safetensors file (header length {n} does "
                                           f"not fit its {size} bytes); it may be truncated or another format.")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise SafetensorsError(f"{self.path} has a corrupt safetensors header ({e}).") from None
                if not isinstance(header, dict) or not all(
                        k == "__metadata__" or _valid_entry(v) for k, v in header.items()):
                    raise SafetensorsError(f"{self.path} has a corrupt safetensors header (each entry needs a dtype, "
                                           f"a shape and two non-negative data offsets).")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise SafetensorsError(f"cannot read {self.path}: {e.strerror or e}.") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header, self._start, self._size = header, 8 + n, size

    def keys(self) -> list[str]:
        return list(self.header)

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        entry = self.header[name]
        if entry["dtype"] not in _DTYPES:
            raise SafetensorsError(f"tensor {name!r} in {self.path} has dtype {entry['dtype']}, which glocal "
                                   f"does not read (supported: {sorted(_DTYPES)}).")
        return tuple(entry["shape"]), _DTYPES[entry["dtype"]]

    def get(self, name: str) -> np.ndarray:
        shape, dtype = self.info(name)
        begin, end = self.header[name]["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or self._start + end > self._size:
            raise SafetensorsError(f"tensor {name!r} in {self.path} does not fit the file (offsets {begin}..{end} "
                                   f"for shape {list(shape)} {entry_dtype(self.header[name])}); the file is "
                                   f"truncated or corrupt.")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self._start + begin).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the pages of ``name`` from this process's memory (after it was copied): the
        file stays in the OS page cache, but the loader's resident size does not grow by the
        whole checkpoint. Reading it again just maps the pages back."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self.header[name]["data_offsets"]
        page = mmap.PAGESIZE
        lo = (self._start + begin + page - 1) // page * page  # whole pages inside the tensor only
        hi = (self._start + end) // page * page
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(entry.get("dtype"), str) and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets) and offsets[0] <= offsets[1])


def entry_dtype(entry: dict) -> str:
    return str(entry.get("dtype"))


class CheckpointReader:
    """The tensors of a checkpoint folder (single file or sharded index), by name."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        self._files: dict[str, SafetensorsFile] = {}
        if index.is_file() and single.is_file():  # loaders disagree on which wins: refuse to guess
            raise SafetensorsError(f"{self.folder} holds both {SINGLE_FILE} and {INDEX_FILE}; remove the one that is "
                                   f"not current (transformers would read {SINGLE_FILE}).")
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}).") from None
            self.where = dict(weight_map)
            for file in sorted(set(self.where.values())):
                if not (self.folder / file).is_file():
                    raise SafetensorsError(f"{index} lists shard {file}, which is missing from {self.folder}.")
        elif single.is_file():
            self.where = dict.fromkeys(self._file(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            found = sorted(p.name for p in self.folder.glob("*.safetensors"))
            hint = (f" (found {', '.join(found[:3])} but no {INDEX_FILE} to tie them together)" if found
                    else " (.bin / .pt checkpoints are not read: convert them to safetensors first)")
            raise SafetensorsError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}.")

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self.folder / file)
        return self._files[file]

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _holder(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise KeyError(name)
        file = self._file(self.where[name])
        if name not in file.header:
            raise SafetensorsError(f"the index says {name!r} is in {file.path.name}, but that file does not hold it.")
        return file

    def info(self, name: str):
        return self._holder(name).info(name)

    def get(self, name: str) -> np.ndarray:
        return self._holder(name).get(name)

    def release(self, name: str) -> None:
        self._file(self.where[name]).release(name)

    def dtypes(self) -> set[str]:
        return {str(self.info(n)[1]) for n in self.where}


def write_file(path, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
               metadata: dict[str, str] | None = None) -> int:
    """Write one file from ``(name, shape, dtype, make)`` entries; ``make()`` produces each
    tensor only when its bytes are written, so one tensor at a time is in memory. Returns
    the bytes of tensor data."""
    # Wider dtypes first: with no gaps allowed between tensors, that keeps every tensor aligned
    # to its element size (a single-dtype file keeps its order).
    tensors = sorted(tensors, key=lambda t: -np.dtype(t[2]).itemsize)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in tensors:
            value = np.ascontiguousarray(make(), dtype=dtype)
            if value.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {value.shape}, planned {tuple(shape)}.")
            f.write(value.tobytes())
    os.replace(tmp, path)  # a crash never leaves a half-written file under the real name
    return offset


def write_checkpoint(folder, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                     *, max_shard_bytes: int = 2 << 30, metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``model.safetensors``, or shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own) named ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. Returns the file names written."""
    tensors = list(tensors)
    shards, size = [[]], 0
    for t in tensors:
        n = int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    folder = pathlib.Path(folder)
    metadata = {"format": "pt", **(metadata or {})}  # "pt": what transformers expects to find
    if len(shards) == 1:
        write_file(folder / SINGLE_FILE, shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(write_file(folder / name, shard, metadata) for name, shard in zip(names, shards))
    index = {"metadata": {"total_size": total}, "weight_map": {t[0]: name for name, s in zip(names, shards) for t in s}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_FILE]
