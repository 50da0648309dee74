"""The device suite: kernel correctness and timings on one accelerator, in one command.

On a GPU (or TPU) machine, from the repository root (under 8 minutes; ``--budget-s`` guards it):

    python benchmarks/device_suite.py --out benchmarks/device_suite_out
    python benchmarks/device_suite.py --sections a,b --budget-s 200      # a subset

and on a CPU, tiny sizes of the same code (CI runs this; Pallas kernels interpret):

    JAX_PLATFORMS=cpu python benchmarks/device_suite.py --smoke --out /tmp/suite

(``python -m benchmarks.device_suite ...`` works the same.) Sections:

  a  correctness, forward and backward (grads of a random-cotangent loss wrt q, k, v), bfloat16
     and float32, against a float32 oracle: ``attention`` with our Pallas kernel native to the
     platform (both, interpreted, on CPU) and ``tokamax``, vs ``impl="reference"``;
     ``linear_attention`` chunked and Pallas vs ``impl="quadratic"``; ``grouped_matmul``
     ragged_dot / tiled / tokamax vs a NumPy float64 reference. Relative error =
     ||got - want|| / ||want|| (over the output, and the worst of the three gradients), checked
     against a dtype tolerance; max abs error reported beside it.
  b  attention forward+backward time, bfloat16: our block-sparse kernel (pallas_gpu / pallas_tpu /
     blockwise on CPU) vs tokamax vs dot_product (cuDNN on GPU) vs xla, masks Causal,
     SlidingWindow(512), BlockCausal(512), T = 4096 and 16384.
  c  linear attention forward+backward: chunked and the native Pallas kernel vs quadratic.
  d  the MoE FFN layer (8 experts, top-2) forward+backward: dropless with grouped matmul
     ragged_dot / tokamax / tiled vs dense dispatch.
  e  a transformer_base bfloat16 training step (tokens/s, MFU) and every model family's decode
     tokens/s at batch 32 after a 2k-token prompt.

Timings: jit, one warm-up call (reported as ``compile_s``), then the median of a few calls, each
blocked until ready. Every cell records a status: ``pass`` / ``FAIL`` (correctness), ``ok``,
``oom: ...``, ``error: ...``, ``unavailable: ...`` (an optional implementation, tokamax, that
this install lacks) or ``skipped: budget``: a cell is only started while its section is within
its share of what is left of ``--budget-s`` (shares in ``SECTION_WEIGHT``), so one slow section
cannot starve the rest. Writes ``OUT/device_suite.json`` (device, jax version, time, every
cell) and ``OUT/device_suite.md`` (a table per section) and prints the markdown. Exit code 1
when a correctness cell fails its tolerance or crashes, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import machine, median, time_fn  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal.generation import causal_variant  # noqa: E402
from glocal.kernels import api as attention_api  # noqa: E402
from glocal.kernels import attention, linear_attention, masks as M  # noqa: E402
from glocal.kernels import gmm  # noqa: E402
from glocal.layers.moe import MoEFFN, MoEOptions  # noqa: E402
from glocal.layers.spec import LayerSpec  # noqa: E402
from glocal.train.metrics import PEAK_FLOPS, peak_flops  # noqa: E402
from glocal.train.step import loss_terms  # noqa: E402

SECTIONS = {
    "a": "correctness vs float32 oracles (forward and backward)",
    "b": "attention forward+backward, bfloat16",
    "c": "linear attention forward+backward",
    "d": "MoE FFN dispatch forward+backward",
    "e": "training step and decode",
}
# Share of the remaining time budget each section may spend (unused time flows to the next).
SECTION_WEIGHT = {"a": 3, "b": 3, "c": 1, "d": 1, "e": 2}
OPTIONAL = "tokamax"  # an implementation this install may lack: "unavailable", never a failure


@dataclasses.dataclass(frozen=True)
class Sizes:
    repeats: int  # timed calls per cell (median reported) after one warm-up call
    interpret: bool  # time Pallas kernels that are not native here in interpret mode (tiny sizes only)
    blocks: tuple[int, int] | None  # block-sparse tiles; None = each kernel's default
    # (a) correctness
    check_attn: tuple[int, int, int, int, int]  # B, T, H, K, E
    check_window: int
    check_masks: tuple[str, ...]  # of "causal", "window"
    check_linear: tuple[int, int, int, int, int, int]  # B, T, H, K, F, E
    check_gmm: tuple[int, int, int, int]  # rows O, D, experts X, I
    # (b) attention timings
    attn_T: tuple[int, ...]
    attn_heads: tuple[int, int, int]  # H, K, E
    attn_window: int  # SlidingWindow size and BlockCausal block
    # (c) linear attention timings
    linear_T: tuple[int, ...]
    linear_heads: tuple[int, int, int, int]  # H, K, F, E
    chunk: int
    # (d) MoE layer
    moe: tuple[int, int, int, int, int, int]  # B, T (B T tokens), D, experts X, top-k, I
    # (e) training and decode
    train: tuple[str, int, int]  # preset, batch, seq
    decode: tuple[str, int, int, int]  # preset, batch, prompt length, decoded tokens


FULL = Sizes(
    repeats=3, interpret=False, blocks=None,
    check_attn=(2, 1024, 4, 2, 128), check_window=256, check_masks=("causal", "window"),
    check_linear=(2, 1024, 4, 2, 16, 64),
    check_gmm=(4096, 1024, 8, 512),
    attn_T=(4096, 16384), attn_heads=(16, 4, 128), attn_window=512,
    linear_T=(4096, 16384), linear_heads=(16, 4, 16, 128), chunk=64,
    moe=(4, 2048, 1024, 8, 2, 2816),
    train=("base", 8, 2048), decode=("base", 32, 2048, 64),
)
SMOKE = Sizes(
    repeats=1, interpret=True, blocks=(32, 32),
    # One mask: a window of 48 over 128 x 128 in 32-tiles has empty, partial and full tiles.
    check_attn=(1, 128, 2, 1, 32), check_window=48, check_masks=("window",),
    check_linear=(1, 64, 2, 1, 8, 16),
    check_gmm=(64, 32, 4, 16),
    attn_T=(256,), attn_heads=(2, 1, 32), attn_window=64,
    linear_T=(256,), linear_heads=(2, 1, 8, 16), chunk=32,
    moe=(2, 32, 32, 4, 2, 64),
    train=("tiny", 2, 64), decode=("tiny", 2, 32, 8),
)

# Relative-error tolerances. float32 on an accelerator: XLA:GPU and Triton run float32 dots
# as TF32 by default (10-bit mantissa), so 1e-4 would flag the default precision, not a bug;
# a wrong tile or a mis-scaled gradient is off by far more than 5e-3. bfloat16 has an 8-bit
# mantissa: the output rounding alone is ~4e-3, gradients accumulate a few of those.
TOLERANCE = {("float32", "cpu"): 1e-4, ("float32", "accel"): 5e-3, ("bfloat16", "cpu"): 3e-2,
             ("bfloat16", "accel"): 3e-2}


class Unavailable(Exception):
    """An optional implementation that this install does not have."""


# -- budget and cells -----------------------------------------------------------------------
class Budget:
    """A global deadline, and per section a share of what is left of it, so that a slow
    section cannot starve the later ones (time a section leaves unused flows onwards)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.section_deadline = self.deadline

    def start_section(self, name: str, remaining: list[str]) -> None:
        left = max(0.0, self.deadline - time.monotonic())
        share = SECTION_WEIGHT[name] / sum(SECTION_WEIGHT[s] for s in remaining)
        self.section_deadline = time.monotonic() + left * share

    def exhausted(self) -> bool:
        return time.monotonic() > self.section_deadline


def one_line(err: BaseException, limit: int = 240) -> str:
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    text = f"{type(err).__name__}: {first}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cell(cells: list, budget: Budget, fields: dict, measure, *, optional: bool = False) -> dict:
    """Run ``measure()`` (a dict of results) into a cell, unless the budget is spent; errors
    become the cell's status (out-of-memory marked as such) and the suite goes on."""
    cell = dict(fields)
    if budget.exhausted():
        cell["status"] = "skipped: budget"
    else:
        t0 = time.perf_counter()
        try:
            cell.update(measure())
            cell.setdefault("status", "ok")
        except Unavailable as e:
            cell["status"] = f"unavailable: {e}"
        except (ImportError, ValueError, NotImplementedError) as e:
            if not optional:
                cell["status"] = f"error: {one_line(e)}"
            else:  # tokamax missing, or refusing these shapes/masks
                cell["status"] = f"unavailable: {one_line(e)}"
        except Exception as e:  # noqa: BLE001 - one cell's failure must not end the suite
            msg = one_line(e)
            oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
            cell["status"] = f"{'oom' if oom else 'error'}: {msg}"
        cell["wall_s"] = round(time.perf_counter() - t0, 2)
    cells.append(cell)
    shown = {k: v for k, v in cell.items() if k != "status"}
    print(f"  [{cell['status'][:60]}] {shown}", flush=True)
    return cell


def time_call(f, *args, repeats: int) -> dict:
    """First call (compile + run, the warm-up) and the median of ``repeats`` timed calls."""
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t0
    t = median(time_fn(lambda: jax.block_until_ready(f(*args)), warmup=0, iters=repeats))
    return {"compile_s": round(first, 2), "ms": round(t * 1e3, 3)}


def require_optional(impl: str, table: tuple, where: str) -> None:
    if impl == OPTIONAL and impl not in table:
        raise Unavailable(f"{where} has no {impl!r} (not added to this checkout)")


def block_kw(impl: str, sz: Sizes) -> dict:
    """The smoke sizes' small tiles for our block-sparse kernels (others take no tiles)."""
    return {"block_sizes": sz.blocks} if sz.blocks and impl in ("blockwise", "pallas_tpu", "pallas_gpu") else {}


def normal(seed: int, shape, dtype, scale: float = 1.0):
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def platform_kind() -> str:
    return "cpu" if jax.default_backend() == "cpu" else "accel"


def native_pallas() -> str | None:
    """Our Pallas backend native to this platform (None on CPU)."""
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())


def out_and_grads(fn):
    """jit of ``(out, grads wrt q, k, v)`` for the loss ``sum(out * ct)``: one forward and
    one backward, the cotangent random so that no gradient term can cancel by symmetry."""
    def run(q, k, v, ct):
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(ct.astype(out.dtype))
    return jax.jit(run)


# -- (a) correctness ------------------------------------------------------------------------
def errors(got, want) -> tuple[float, float]:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want))), float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def verdict(out, grads, out_ref, grads_ref, dtype: str) -> dict:
    fwd_abs, fwd_rel = errors(out, out_ref)
    per_grad = [errors(g, r) for g, r in zip(grads, grads_ref)]
    bwd_abs, bwd_rel = max(a for a, _ in per_grad), max(r for _, r in per_grad)
    tol = TOLERANCE[(dtype, platform_kind())]
    ok = fwd_rel <= tol and bwd_rel <= tol and np.isfinite([fwd_rel, bwd_rel]).all()
    return {"fwd_max_abs": fwd_abs, "fwd_rel": fwd_rel, "bwd_max_abs": bwd_abs, "bwd_rel": bwd_rel,
            "tol": tol, "status": "pass" if ok else "FAIL"}


def check_attention(cells, budget, sz: Sizes):
    B, T, H, K, E = sz.check_attn
    ours = ["pallas_tpu", "pallas_gpu"] if native_pallas() is None else [native_pallas()]
    masks = {"causal": M.Causal(), "window": M.SlidingWindow(sz.check_window)}
    for mask_name in sz.check_masks:
        mask = masks[mask_name]
        for dtype in ("bfloat16", "float32"):
            q_BTHE, ct_BTHE = normal(1, (B, T, H, E), dtype), normal(4, (B, T, H, E), dtype)
            k_BTKE, v_BTKE = normal(2, (B, T, K, E), dtype), normal(3, (B, T, K, E), dtype)
            f32 = [a.astype(jnp.float32) for a in (q_BTHE, k_BTKE, v_BTKE, ct_BTHE)]
            with jax.default_matmul_precision("highest"):  # the oracle: exact float32
                reference = out_and_grads(lambda q, k, v: attention(q, k, v, mask=mask, impl="reference"))
                out_ref, grads_ref = reference(*f32)
            for impl in ours + [OPTIONAL]:
                def measure(impl=impl):
                    require_optional(impl, attention_api.IMPLEMENTATIONS, "glocal.kernels.api.IMPLEMENTATIONS")
                    fn = out_and_grads(lambda q, k, v: attention(q, k, v, mask=mask, impl=impl, **block_kw(impl, sz)))
                    out, grads = fn(q_BTHE, k_BTKE, v_BTKE, ct_BTHE)
                    return verdict(out, grads, out_ref, grads_ref, dtype)
                run_cell(cells, budget, {"kernel": "attention", "impl": impl, "case": mask_name, "dtype": dtype},
                         measure, optional=impl == OPTIONAL)


def check_linear(cells, budget, sz: Sizes):
    B, T, H, K, F, E = sz.check_linear
    impls = ["chunked"] + (["pallas_tpu", "pallas_gpu"] if native_pallas() is None else [native_pallas()])
    for dtype in ("bfloat16", "float32"):
        # q, k at half scale: the Taylor kernel's normaliser stays well away from zero.
        q_BTHF, ct_BTHE = normal(1, (B, T, H, F), dtype, 0.5), normal(4, (B, T, H, E), dtype)
        k_BTKF, v_BTKE = normal(2, (B, T, K, F), dtype, 0.5), normal(3, (B, T, K, E), dtype)
        f32 = [a.astype(jnp.float32) for a in (q_BTHF, k_BTKF, v_BTKE, ct_BTHE)]
        with jax.default_matmul_precision("highest"):
            out_ref, grads_ref = out_and_grads(lambda q, k, v: linear_attention(q, k, v, impl="quadratic"))(*f32)
        for impl in impls:
            def measure(impl=impl):
                fn = out_and_grads(lambda q, k, v: linear_attention(q, k, v, impl=impl, chunk_size=sz.chunk))
                out, grads = fn(q_BTHF, k_BTKF, v_BTKE, ct_BTHE)
                return verdict(out, grads, out_ref, grads_ref, dtype)
            run_cell(cells, budget, {"kernel": "linear_attention", "impl": impl, "case": f"T{T}", "dtype": dtype},
                     measure)


def gmm_reference(x_OD, w_XDI, sizes_X, ct_OI):
    """``out``, ``dx``, ``dw`` of ``sum(grouped_matmul(x, w) * ct)`` in float64 NumPy."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x_OD, w_XDI, ct_OI))
    out, dx, dw = np.zeros(ct.shape), np.zeros(x.shape), np.zeros(w.shape)
    start = 0
    for g, n in enumerate(np.asarray(sizes_X)):
        rows = slice(start, start + int(n))
        out[rows], dx[rows], dw[g] = x[rows] @ w[g], ct[rows] @ w[g].T, x[rows].T @ ct[rows]
        start += int(n)
    return out, (dx, dw)


def check_gmm(cells, budget, sz: Sizes):
    O, D, X, I = sz.check_gmm  # noqa: E741 - the legend's FFN width
    # Uneven groups, one of them empty (an expert no token chose), summing to O.
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, O), X - 2, replace=False))
    sizes_X = np.diff(np.concatenate([[0], cuts, [O]]))
    sizes_X = jnp.asarray(np.insert(sizes_X, X // 2, 0), jnp.int32)
    for dtype in ("bfloat16", "float32"):
        x_OD, w_XDI, ct_OI = normal(1, (O, D), dtype), normal(2, (X, D, I), dtype, D**-0.5), normal(3, (O, I), dtype)
        out_ref, grads_ref = gmm_reference(x_OD, w_XDI, sizes_X, ct_OI)
        for impl in ("ragged_dot", "tiled", OPTIONAL):
            def measure(impl=impl):
                require_optional(impl, gmm.GMM_IMPLS, "glocal.kernels.gmm.GMM_IMPLS")

                @jax.jit
                def run(x, w, ct):
                    out, pull = jax.vjp(lambda x, w: gmm.grouped_matmul(x, w, sizes_X, impl=impl), x, w)
                    return out, pull(ct)
                out, grads = run(x_OD, w_XDI, ct_OI)
                return verdict(out, grads, out_ref, grads_ref, dtype)
            run_cell(cells, budget, {"kernel": "grouped_matmul", "impl": impl, "case": f"O{O} X{X}", "dtype": dtype},
                     measure, optional=impl == OPTIONAL)


def section_a(cells, budget, sz):
    check_attention(cells, budget, sz)
    check_linear(cells, budget, sz)
    check_gmm(cells, budget, sz)


# -- (b) attention timings ------------------------------------------------------------------
def allowed_pairs(mask, T: int) -> int:
    """(query, key) pairs the mask allows, counted in row chunks (never a T x T array)."""
    total, k = 0, np.arange(T)[None, :]
    for start in range(0, T, 1024):
        q = np.arange(start, min(start + 1024, T))[:, None]
        total += int(np.broadcast_to(np.asarray(mask(q, k), bool), (q.shape[0], T)).sum())
    return total


def section_b(cells, budget, sz):
    H, K, E = sz.attn_heads
    w = sz.attn_window
    impls = (native_pallas() or "blockwise", OPTIONAL, "dot_product", "xla")
    masks = {"causal": M.Causal(), f"window{w}": M.SlidingWindow(w), f"blockcausal{w}": M.BlockCausal(w)}
    # "xla" runs last: at 16k its causal and window forms (a dense einsum per 64-query chunk
    # over the keys it can see) compile for minutes, so when the budget runs out it is the
    # baseline that goes, not the kernels under test.
    for xla_pass in (False, True):
        for T in sz.attn_T:
            q_BTHE, ct_BTHE = normal(1, (1, T, H, E), jnp.bfloat16), normal(4, (1, T, H, E), jnp.bfloat16)
            k_BTKE, v_BTKE = normal(2, (1, T, K, E), jnp.bfloat16), normal(3, (1, T, K, E), jnp.bfloat16)
            for mask_name, mask in masks.items():
                # Useful FLOPs: 4 H E per allowed pair forward (QK^T, PV), backward 2.5x that.
                flops = 3.5 * 4 * H * E * allowed_pairs(mask, T)
                for impl in [i for i in impls if (i == "xla") == xla_pass]:
                    def measure(impl=impl, mask=mask, flops=flops, args=(q_BTHE, k_BTKE, v_BTKE, ct_BTHE)):
                        require_optional(impl, attention_api.IMPLEMENTATIONS, "glocal.kernels.api.IMPLEMENTATIONS")
                        kw = block_kw(impl, sz)
                        fn = out_and_grads(lambda q, k, v: attention(q, k, v, mask=mask, impl=impl, **kw))
                        r = time_call(fn, *args, repeats=sz.repeats)
                        return {**r, "tflops": round(flops / (r["ms"] / 1e3) / 1e12, 2)}
                    run_cell(cells, budget, {"mask": mask_name, "T": T, "impl": impl}, measure,
                             optional=impl == OPTIONAL)
            del q_BTHE, k_BTKE, v_BTKE, ct_BTHE
    # The table reads by length, then mask, then implementation.
    order = {name: i for i, name in enumerate(masks)}
    cells.sort(key=lambda c: (c["T"], order[c["mask"]], impls.index(c["impl"])))


# -- (c) linear attention timings -----------------------------------------------------------
def section_c(cells, budget, sz):
    H, K, F, E = sz.linear_heads
    pallas = native_pallas() or "pallas_gpu"
    for T in sz.linear_T:
        q_BTHF, ct_BTHE = normal(1, (1, T, H, F), jnp.bfloat16, 0.5), normal(4, (1, T, H, E), jnp.bfloat16)
        k_BTKF, v_BTKE = normal(2, (1, T, K, F), jnp.bfloat16, 0.5), normal(3, (1, T, K, E), jnp.bfloat16)
        for impl in ("chunked", pallas, "quadratic"):
            note = "interpret mode: not a timing" if impl == pallas and native_pallas() is None else ""

            def measure(impl=impl, note=note):
                if note and not sz.interpret:  # full sizes on a CPU: interpreting would take hours
                    raise Unavailable("no native Pallas backend on this platform")
                fn = out_and_grads(lambda q, k, v: linear_attention(q, k, v, impl=impl, chunk_size=sz.chunk))
                return {**time_call(fn, q_BTHF, k_BTKF, v_BTKE, ct_BTHE, repeats=sz.repeats), "note": note}
            run_cell(cells, budget, {"T": T, "impl": impl}, measure)


# -- (d) MoE dispatch -----------------------------------------------------------------------
def moe_layer(sz: Sizes, moe_impl: str, gmm_impl: str) -> MoEFFN:
    B, T, D, X, k, I = sz.moe  # noqa: E741
    spec = LayerSpec(d_model=D, num_heads=8, d_ff=I, dtype="bfloat16")
    return MoEFFN(spec, MoEOptions(num_experts=X, top_k=k, impl=moe_impl, gmm_impl=gmm_impl), rngs=nnx.Rngs(0))


def section_d(cells, budget, sz):
    B, T, D, X, k, I = sz.moe  # noqa: E741
    x_BTD, ct_BTD = normal(1, (B, T, D), jnp.bfloat16), normal(2, (B, T, D), jnp.float32)
    # Active expert FLOPs (gate, up, down: 3 D x I matmuls per chosen expert), forward + backward.
    flops = 3 * 2 * B * T * k * 3 * D * I
    for moe_impl, gmm_impl in (("dropless", "ragged_dot"), ("dropless", OPTIONAL), ("dropless", "tiled"),
                               ("dense", "auto")):
        def measure(moe_impl=moe_impl, gmm_impl=gmm_impl):
            require_optional(gmm_impl, gmm.GMM_IMPLS, "glocal.kernels.gmm.GMM_IMPLS")
            graphdef, params, rest = nnx.split(moe_layer(sz, moe_impl, gmm_impl), nnx.Param, ...)

            def loss(params, x_BTD):
                y_BTD, aux = nnx.merge(graphdef, params, rest)(x_BTD)
                router = sum(v * w for v, w in aux.values() if w is not None)
                return jnp.sum(y_BTD.astype(jnp.float32) * ct_BTD) + router
            r = time_call(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, x_BTD, repeats=sz.repeats)
            seconds = r["ms"] / 1e3
            return {**r, "tokens_per_s": round(B * T / seconds), "tflops": round(flops / seconds / 1e12, 2)}
        run_cell(cells, budget, {"dispatch": moe_impl, "gmm_impl": gmm_impl if moe_impl == "dropless" else "-",
                                 "tokens": B * T, "D": D, "experts": f"{X} top-{k}", "I": I},
                 measure, optional=gmm_impl == OPTIONAL)


# -- (e) training step and decode -------------------------------------------------------------
def train_step_cell(sz: Sizes) -> dict:
    import optax

    preset, batch, seq = sz.train
    model = gm.build("transformer", preset, dtype="bfloat16", max_seq_len=max(seq, 64))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(3e-4, weight_decay=0.1)

    def step(params, opt_state, batch_d):
        # The trainer's loss (glocal.train.step): token-mean cross-entropy.
        loss_of = lambda p: loss_terms(nnx.merge(graphdef, p), batch_d, batch * seq, 0.0)[0]
        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, model.config.vocab_size, jnp.int32)
    ones = jnp.ones((batch, seq), jnp.int32)
    batch_d = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.cumsum(ones, 1) - 1,
               "segment_ids": ones, "loss_mask": ones.astype(jnp.float32)}
    state = {"p": params, "o": tx.init(params)}

    def run():  # donated buffers: carry the new state into the next call
        state["p"], state["o"], loss = step(state["p"], state["o"], batch_d)
        return loss
    r = time_call(run, repeats=max(sz.repeats, 2))
    tps = batch * seq / (r["ms"] / 1e3)
    fpt = model.flops_per_token(seq)
    peak = peak_flops("bfloat16")
    tabled = any(jax.devices()[0].device_kind.startswith(p) for p in PEAK_FLOPS)
    return {**r, "tokens_per_s": round(tps), "flops_per_token": fpt, "peak_flops": peak,
            "peak_source": "vendor table" if tabled else "measured matmul", "mfu": round(tps * fpt / peak, 4)}


def decode_cell(family: str, sz: Sizes) -> dict:
    preset, B, P, N = sz.decode
    if preset not in gm.list_presets(family):
        raise Unavailable(f"{family} has no {preset!r} preset")
    length = -(-(P + N + 1) // 64) * 64  # prompt + decoded tokens, whole 64s (FIT groups, blocks)
    model = causal_variant(gm.build(family, preset, dtype="bfloat16", param_dtype="bfloat16", max_seq_len=length))
    graphdef, state = nnx.split(model)
    tokens_BP = jax.random.randint(jax.random.key(0), (B, P), 0, model.config.vocab_size, jnp.int32)
    lengths_B = jnp.full((B,), P, jnp.int32)

    @jax.jit
    def prefill(state, tokens_BP):
        m = nnx.merge(graphdef, state)
        logits_BV, cache = m.prefill(tokens_BP, lengths_B, m.init_cache(B, length))
        return jnp.argmax(logits_BV, -1).astype(jnp.int32), cache

    @jax.jit
    def decode_n(state, tok_B, cache):
        # N greedy steps in one program, as glocal.generate runs them (no host sync per token).
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            tok_B, cache = carry
            logits_BV, cache = m.decode(tok_B, cache)
            return jnp.argmax(logits_BV, -1).astype(jnp.int32), cache
        return jax.lax.fori_loop(0, N, body, (tok_B, cache))[0]

    pre = time_call(prefill, state, tokens_BP, repeats=sz.repeats)
    tok_B, cache = prefill(state, tokens_BP)
    dec = time_call(decode_n, state, tok_B, cache, repeats=sz.repeats)
    return {"prefill_ms": pre["ms"], "prefill_tokens_per_s": round(B * P / (pre["ms"] / 1e3)),
            "decode_ms_per_step": round(dec["ms"] / N, 3), "decode_tokens_per_s": round(B * N / (dec["ms"] / 1e3)),
            "compile_s": round(pre["compile_s"] + dec["compile_s"], 2)}


def section_e(cells, budget, sz):
    preset, batch, seq = sz.train
    run_cell(cells, budget, {"run": f"train transformer_{preset} bf16", "batch": f"{batch} x {seq}"},
             lambda: train_step_cell(sz))
    preset, B, P, N = sz.decode
    for family in gm.list_models():
        run_cell(cells, budget, {"run": f"decode {family}_{preset} bf16", "batch": f"{B}, prompt {P}, {N} new"},
                 lambda family=family: decode_cell(family, sz))


# -- report -----------------------------------------------------------------------------------
def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v and (abs(v) < 1e-2 or abs(v) >= 1e6) else f"{v:,.3f}".rstrip("0").rstrip(".")
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "/")


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# glocal device suite: {meta['device_kind']} ({meta['platform']} x{meta['device_count']})", "",
             f"jax {meta['jax']}, {meta['timestamp']}, {'smoke sizes' if meta['smoke'] else 'full sizes'}, "
             f"{meta['elapsed_s']:.0f} s", ""]
    for key, section in report["sections"].items():
        cells = section["cells"]
        lines += [f"## ({key}) {section['title']}", ""]
        if not cells:
            lines += ["(no cells)", ""]
            continue
        cols = [c for c in dict.fromkeys(k for cell in cells for k in cell) if c != "status"] + ["status"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for cell in cells:
            lines.append("| " + " | ".join(fmt(cell.get(c, "")) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def write(report: dict, out: pathlib.Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_suite.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    (out / "device_suite.md").write_text(md + "\n")
    return md


def correctness_failures(report: dict) -> list[dict]:
    cells = report["sections"].get("a", {}).get("cells", [])
    return [c for c in cells if c["status"] == "FAIL" or c["status"].startswith(("error", "oom"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, CI)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "device_suite_out"))
    p.add_argument("--sections", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="cells starting after this many seconds are recorded 'skipped: budget'")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    sz = SMOKE if args.smoke else FULL
    # Random weights and inputs from RngBitGenerator: threefry's HLO is large and an eager model
    # init compiles it once per parameter shape (half the smoke run's decode section on a CPU).
    # The numbers are as random either way; nothing here depends on the bits.
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    dev = jax.devices()[0]
    t0 = time.monotonic()
    report = {"meta": {"device_kind": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
                       "machine": machine(), "jax": jax.__version__, "smoke": args.smoke,
                       "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "budget_s": args.budget_s, "sizes": dataclasses.asdict(sz), "elapsed_s": 0.0},
              "sections": {}}
    print(f"# {machine()}; {'smoke' if args.smoke else 'full'} sizes, sections {','.join(chosen)}", flush=True)
    budget = Budget(args.budget_s)
    out = pathlib.Path(args.out)
    for i, key in enumerate(chosen):
        print(f"## ({key}) {SECTIONS[key]}", flush=True)
        budget.start_section(key, chosen[i:])
        cells = []
        report["sections"][key] = {"title": SECTIONS[key], "cells": cells}
        globals()[f"section_{key}"](cells, budget, sz)
        report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
        write(report, out)  # after every section: a run killed later keeps what it measured
    md = write(report, out)
    print("\n" + md)
    failures = correctness_failures(report)
    for c in failures:
        print(f"correctness: {c['kernel']} impl={c['impl']} {c['case']} {c['dtype']}: {c['status']}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
