"""Cross-platform lowering, on a CPU host: every accelerator kernel we own (and tokamax's,
where installed), forward and backward, and a training step and a generation program of every
registered family, traced here and lowered for ``tpu`` and for ``cuda``.

The contract is the plain one: ``jax.jit(f).trace(...).lower(lowering_platforms=(p,))`` of a
function that calls ``impl="pallas_tpu"`` contains the Mosaic custom call, with no flag or
context of ours; a kernel that fell back to the interpreter or to XLA fails here. (The only
context is ``cross_lowering``: JAX itself needs a description of the target device to lower
Mosaic kernels, and on jax >= 0.12 Triton ones, on a host without that device.)

What this does not check: Mosaic's and Triton's own compilers (they run only on the device),
and run time. The families run in a subprocess with 4 fake CPU devices (data 1 x fsdp 2 x
tensor 2, ``fsdp_tp`` rules), where the kernels run per shard (``glocal.sharding.per_shard``;
XLA cannot partition a Mosaic call) and must give the same values and gradients as one device.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from glocal import kernels
from glocal.kernels import masks
from glocal.kernels.gmm import grouped_matmul
from glocal.kernels.platforms import cross_lowering

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The custom call each platform's kernels lower to (Mosaic TPU; Pallas Triton / tokamax Triton).
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
OUR_IMPL = {"tpu": "pallas_tpu", "cuda": "pallas_gpu"}

MASKS = [masks.Causal(), masks.SlidingWindow(48), masks.BlockCausal(64), masks.BlockDiagonal(64),
         masks.ChunkCausal(64), masks.GlobalTokens(8) | masks.SlidingWindow(32), masks.PrefixLM(40),
         masks.Full(), masks.Causal() & masks.SlidingWindow(100)]


def lowered_text(fn, args, platform, mesh=None):
    with cross_lowering(platform, mesh=mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def attention_loss(impl, mask, segments=False, softcap=None):
    def loss(q, k, v):
        seg = (jnp.arange(q.shape[1]) >= q.shape[1] // 3).astype(jnp.int32)[None].repeat(q.shape[0], 0)
        out = kernels.attention(q, k, v, mask=mask, impl=impl, softcap=softcap, segment_ids=seg if segments else None)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_block_sparse_attention_lowers_to_the_hardware_kernel(platform, mask):
    """Forward, dQ and dK/dV: three kernel calls, none interpreted (no interpreter loop)."""
    args = (sds((2, 256, 4, 64)), sds((2, 256, 2, 64)), sds((2, 256, 2, 64)))
    text = lowered_text(attention_loss(OUR_IMPL[platform], mask, segments=True), args, platform)
    assert text.count(CUSTOM_CALL[platform]) == 3, text.count(CUSTOM_CALL[platform])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_attention_kernels_lower_with_softcap_float32_and_long_rows(platform):
    args = (sds((1, 512, 8, 128), jnp.float32), sds((1, 384, 8, 128), jnp.float32), sds((1, 384, 8, 128), jnp.float32))
    text = lowered_text(attention_loss(OUR_IMPL[platform], masks.Full(), softcap=30.0), args, platform)
    assert text.count(CUSTOM_CALL[platform]) == 3


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("H", [4, 6])
def test_block_sparse_attention_with_sinks_lowers_to_the_hardware_kernel(platform, H):
    """Learned sinks ``[H]`` (SMEM on TPU; H = 6 is no power of two for Triton): the forward
    kernel takes them, dQ and dK/dV are unchanged, their gradient is plain JAX; still
    three kernel calls, with segments and a soft-cap."""
    def loss(q, k, v, sinks):
        seg = (jnp.arange(q.shape[1]) >= q.shape[1] // 3).astype(jnp.int32)[None].repeat(q.shape[0], 0)
        out = kernels.attention(q, k, v, mask=masks.SlidingWindow(48), impl=OUR_IMPL[platform], softcap=30.0,
                                segment_ids=seg, sinks=sinks)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    args = (sds((2, 256, H, 64)), sds((2, 256, 2, 64)), sds((2, 256, 2, 64)), sds((H,), jnp.float32))
    text = lowered_text(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), args, platform)
    assert text.count(CUSTOM_CALL[platform]) == 3, text.count(CUSTOM_CALL[platform])


def test_cpu_lowering_interprets_and_a_kernel_never_falls_back_on_another_accelerator():
    args = (sds((1, 128, 2, 64)), sds((1, 128, 2, 64)), sds((1, 128, 2, 64)))
    cpu = jax.jit(attention_loss("pallas_tpu", masks.Causal())).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert "tpu_custom_call" not in cpu and "stablehlo.while" in cpu  # the interpreter's grid loop
    with pytest.raises(Exception, match="cuda"):  # a TPU kernel lowered for a GPU is an error
        lowered_text(attention_loss("pallas_tpu", masks.Causal()), args, "cuda")


def test_triton_kernel_pads_sizes_triton_cannot_take():
    """Triton tiles are powers of two >= 16: T = 17 and E = 48 are zero-padded (Block
    Transformer's block decoder runs on 17 block vectors), lowered, and still exact."""
    args = (sds((2, 17, 4, 48)), sds((2, 17, 2, 48)), sds((2, 17, 2, 48)))
    text = lowered_text(attention_loss("pallas_gpu", masks.Causal(), segments=True), args, "cuda")
    assert text.count(CUSTOM_CALL["cuda"]) == 3
    x = [jax.random.normal(jax.random.key(i), a.shape, jnp.float32) for i, a in enumerate(args)]
    got, ref = (jax.jit(attention_loss(impl, masks.Causal(), segments=True))(*x) for impl in ("pallas_gpu", "reference"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("fmap", ["taylor", "elu"])
def test_chunked_linear_attention_lowers_to_the_hardware_kernel(platform, fmap):
    """The forward and the backward kernel, with an initial state and the final state used."""
    def loss(q, k, v, S0, z0):
        o, (S, z) = kernels.linear_attention(q, k, v, feature_map=fmap, impl=OUR_IMPL[platform], chunk_size=64,
                                             initial_state=(S0, z0), return_state=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S) + jnp.sum(z)
    D = 153 if fmap == "taylor" else 16  # the public state's feature size (symmetric Taylor)
    args = (sds((2, 256, 4, 16)), sds((2, 256, 2, 16)), sds((2, 256, 2, 64)),
            sds((2, 2, D, 64), jnp.float32), sds((2, 2, D), jnp.float32))
    text = lowered_text(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), args, platform)
    assert text.count(CUSTOM_CALL[platform]) == 2


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_grouped_matmul_auto_lowers_ragged_dot_for_accelerators(platform):
    """Our grouped matmul has no Pallas form: on TPU/GPU ``auto`` is XLA's ragged_dot (chosen
    at lowering, so a CPU host lowering for TPU does not get the CPU tiled scan)."""
    def loss(x, w, sizes):
        return jnp.sum(grouped_matmul(x, w, sizes).astype(jnp.float32))
    args = (sds((512, 256)), sds((4, 256, 256)), jax.ShapeDtypeStruct((4,), jnp.int32))
    text = lowered_text(jax.grad(loss, argnums=(0, 1)), args, platform)
    assert "ragged_dot" in text and "stablehlo.while" not in text


# -- tokamax (the optional extra; the Python >= 3.12 stack) -------------------------------------
def _tokamax():
    return pytest.importorskip("tokamax", reason="tokamax is not installed (the Python >= 3.12 stack has it)")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("mask", [masks.Causal(), masks.SlidingWindow(48), masks.BlockCausal(64)], ids=repr)
def test_tokamax_attention_lowers_to_its_kernel(platform, mask):
    _tokamax()
    args = (sds((2, 256, 4, 64)), sds((2, 256, 2, 64)), sds((2, 256, 2, 64)))
    text = lowered_text(attention_loss("tokamax", mask), args, platform)
    assert text.count(CUSTOM_CALL[platform]) >= 2  # forward and backward kernels


def test_tokamax_grouped_matmul_lowers_to_mosaic_for_tpu():
    _tokamax()
    def loss(x, w, sizes):
        return jnp.sum(grouped_matmul(x, w, sizes, impl="tokamax").astype(jnp.float32))
    args = (sds((512, 256)), sds((4, 256, 256)), jax.ShapeDtypeStruct((4,), jnp.int32))
    text = lowered_text(jax.grad(loss, argnums=(0, 1)), args, "tpu")
    assert text.count("tpu_custom_call") >= 2  # the forward and the backward products


def test_tokamax_grouped_matmul_for_cuda_cannot_be_lowered_without_a_gpu():
    """tokamax's GPU grouped matmul (Mosaic GPU) asks the *physical* GPU for its compute
    capability while tracing, so it cannot be lowered from a CPU host: checked here so that
    this test fails (and gets turned into a lowering check) the day it can."""
    _tokamax()
    args = (sds((512, 256)), sds((4, 256, 256)), jax.ShapeDtypeStruct((4,), jnp.int32))
    with pytest.raises(NotImplementedError, match="Unsupported GPU architecture"):
        lowered_text(lambda x, w, s: grouped_matmul(x, w, s, impl="tokamax"), args, "cuda")


# -- every registered family, sharded, in a subprocess with 4 fake devices --------------------
@pytest.fixture(scope="module")
def families():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "lowering_check.py")], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[0][len("RESULT "):])


def test_every_family_lowers_a_training_step_and_decoding_for_tpu_and_cuda(families):
    import glocal.models as gm

    assert set(families["lowered"]) == {*gm.list_models(), "moe:qwen3_next_tiny", "moe:gpt_oss_tiny"}
    for name, per_platform in families["lowered"].items():
        for platform, found in per_platform.items():
            assert found["train_kernel_calls"] > 0, (name, platform, found)  # the kernels, not XLA
            assert found["decode_lowered"], (name, platform)


def test_kernels_under_a_mesh_run_per_shard_with_the_values_of_one_device(families):
    for name, err in families["sharded_vs_one_device"].items():
        assert err < 1e-5, (name, err)
