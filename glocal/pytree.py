"""Names of pytree paths, shared by checkpoints (glocal's own and the Hugging Face interop)."""

from __future__ import annotations


def path_name(path, sep: str = "/") -> str:
    """A pytree key path as names (dict keys, attributes, indices) joined by ``sep``; the
    ``value`` attribute of an nnx Variable is left out (``embed/table_VD``)."""
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(str(getattr(key, attr)))
                break
    return sep.join(part for part in out if part != "value")
