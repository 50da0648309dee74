"""Multi-query associative recall (MQAR): the synthetic recall task of the Based paper, after
the zoology benchmark's specification.

A sequence of length L starts with D key-value pairs ``k1 v1 k2 v2 ...`` (keys drawn without
replacement from ``[1, V/2)``, values from ``[V/2, V)``); each key then reappears exactly once in
the rest of the sequence, at an even offset whose distance from the start of the query region
follows a power law (``p(i) ~ i^(alpha - 1)``, most queries come early), and is followed by its
value. Every other position of the query region holds a uniformly random token. A model is
scored only where the input is a re-appearing key: the target there is that key's value; all
other targets are ``IGNORE``. Needs ``4 D <= L``.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def mqar(num_examples: int, seq_len: int, num_pairs: int, *, vocab_size: int = 8192, alpha: float = 0.01,
         seed: int = 0) -> dict[str, np.ndarray]:
    """``{"inputs", "targets"}``: int32 ``[num_examples, seq_len]``; targets are ``IGNORE``
    except at the D query positions of each row."""
    L, D, V = seq_len, num_pairs, vocab_size
    if 4 * D > L:
        raise ValueError(f"MQAR needs 4 * num_pairs <= seq_len (pairs, then room to query each key); got "
                         f"num_pairs={D}, seq_len={L}.")
    if D > V // 2 - 1:
        raise ValueError(f"num_pairs={D} needs at least {D} keys and values: raise vocab_size to at least "
                         f"{2 * D + 2}.")
    rng = np.random.default_rng(seed)
    N, slots = num_examples, (L - 2 * D) // 2  # even offsets of the query region where a key (and its value) fit
    rows = np.arange(N)[:, None]
    # Keys and values without replacement, per row: the first D of a random permutation.
    keys = 1 + rng.permuted(np.broadcast_to(np.arange(V // 2 - 1), (N, V // 2 - 1)), axis=1)[:, :D]
    values = V // 2 + rng.permuted(np.broadcast_to(np.arange(V - V // 2), (N, V - V // 2)), axis=1)[:, :D]
    # Query slots without replacement with p(i) ~ i^(alpha - 1): the D largest of log p + Gumbel
    # noise (the Gumbel top-k trick: the same law as drawing one slot at a time from what is left).
    log_p = (alpha - 1) * np.log(np.arange(1, slots + 1, dtype=np.float64))
    where = 2 * D + 2 * np.argsort(-(log_p + rng.gumbel(size=(N, slots))), axis=1)[:, :D]
    seq = rng.integers(1, V, size=(N, L + 1))  # filler: uniform random tokens
    seq[:, 0:2 * D:2], seq[:, 1:2 * D:2] = keys, values
    seq[rows, where], seq[rows, where + 1] = keys, values
    targets = np.full((N, L), IGNORE, np.int64)
    targets[rows, where] = values
    return {"inputs": seq[:, :L].astype(np.int32), "targets": targets.astype(np.int32)}
