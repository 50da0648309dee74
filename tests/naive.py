"""Independent references written as plain NumPy loops (no shared code with glocal)."""

import numpy as np


def attention_loops(q, k, v, allowed, scale=None, softcap=None):
    """q [B,T,H,E], k/v [B,S,K,E], allowed [B,T,S] -> [B,T,H,E], one query at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, E = q.shape
    K = k.shape[2]
    scale = E**-0.5 if scale is None else scale
    out = np.zeros((B, T, H, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            for t in range(T):
                idx = [s for s in range(k.shape[1]) if allowed[b, t, s]]
                if not idx:
                    continue
                logits = np.array([q[b, t, h] @ k[b, s, kh] for s in idx]) * scale
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[b, t, h] = sum(wi * v[b, s, kh] for wi, s in zip(w, idx))
    return out


def rope_complex(x, positions, theta=10_000.0):
    """Rotate pairs (x[i], x[i + E/2]) as complex numbers by pos * theta^(-2i/E)."""
    x = np.asarray(x, np.float64)
    E = x.shape[-1]
    z = x[..., : E // 2] + 1j * x[..., E // 2 :]
    freq = theta ** (-np.arange(E // 2) * 2.0 / E)
    rot = np.exp(1j * np.asarray(positions, np.float64)[..., None, None] * freq)
    z = z * rot
    return np.concatenate([z.real, z.imag], axis=-1)
