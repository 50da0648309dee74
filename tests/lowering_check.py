"""Run by tests/test_lowering.py in its own process (fake devices must exist before JAX
starts): on 4 fake CPU devices (data 1 x fsdp 2 x tensor 2, ``fsdp_tp`` rules), lowers the
training step and the generation program of every registered family's ``tiny`` preset in
bf16, with our Pallas kernels selected, for ``tpu`` and ``cuda``; and checks that the kernels,
run per shard under that mesh (interpreted here), equal one device, forward and gradients.
Prints ``RESULT <json>``."""

import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import glocal  # noqa: E402,F401  (first: XLA flags)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import glocal.models as gm  # noqa: E402
from glocal import kernels, sharding as shd  # noqa: E402
from glocal.generation import _generate_program  # noqa: E402
from glocal.kernels import masks  # noqa: E402
from glocal.kernels.platforms import cross_lowering  # noqa: E402
from glocal.train import trainer  # noqa: E402
from glocal.train.config import TrainConfig  # noqa: E402

CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
OUR_IMPL = {"tpu": "pallas_tpu", "cuda": "pallas_gpu"}
TCFG = TrainConfig(mesh_data=1, mesh_fsdp=2, mesh_tensor=2, sharding="fsdp_tp", batch_size=2, seq_len=64)


def lower_family(name: str, platform: str, preset: str = "tiny") -> dict:
    overrides = {"dtype": "bfloat16", "attention_impl": OUR_IMPL[platform]}
    if "linear_impl" in {f for f in gm.config_class(name).__dataclass_fields__}:
        overrides["linear_impl"] = OUR_IMPL[platform]
    mcfg = gm.get_config(name, preset, **overrides)
    setup = trainer.build_setup(mcfg, TCFG, devices=jax.devices()[:4])
    A, b, T = 1, TCFG.batch_size, TCFG.seq_len
    batch = {k: jax.ShapeDtypeStruct((A, b, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=setup.batch_sh)
             for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    params = trainer._with_shardings(setup.abstract_params, setup.param_sh)
    opt = trainer._with_shardings(jax.eval_shape(setup.init_opt, params), setup.opt_sh)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: gm.build_from_config(mcfg)))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    with jax.set_mesh(setup.mesh), shd.use_rules(setup.rules), cross_lowering(platform, mesh=setup.mesh):
        train = setup.train_step.trace(params, opt, batch).lower(lowering_platforms=(platform,)).as_text()
        args = (state, jax.ShapeDtypeStruct((b, 16), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32), jnp.int32(4),
                jnp.array([1], jnp.int32), jax.random.key(0), jnp.float32(1.0))
        decode = _generate_program.trace(graphdef, *args, cache_len=64, out_len=8, temperature=0.0,
                                         top_k=0).lower(lowering_platforms=(platform,)).as_text()
    return {"train_kernel_calls": train.count(CUSTOM_CALL[platform]), "decode_lowered": "stablehlo.while" in decode}


def sharded_vs_one_device() -> dict:
    """Max |difference| of outputs and gradients, per shard on the mesh vs one device,
    relative to the largest one-device value of each."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "expert": 1, "tensor": 2}, jax.devices()[:4])
    rules = shd.rule_table("fsdp_tp")
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    out = {}
    # (per_shard is the same for both backends: the TPU kernels stand for both, plus one GPU case)
    cases = {"attention_pallas_tpu_K2": ("pallas_tpu", 2), "attention_pallas_tpu_K1": ("pallas_tpu", 1),
             "attention_pallas_gpu_K2": ("pallas_gpu", 2)}
    for case, (impl, K) in cases.items():
        q, k, v = r(2, 64, 4, 16), r(2, 64, K, 16), r(2, 64, K, 16)
        seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 44], 2, 0), jnp.int32)
        f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(kernels.attention(
            q, k, v, mask=masks.Causal(), impl=impl, segment_ids=seg, block_sizes=(16, 16)))), argnums=(0, 1, 2)))
        out[case] = _compare(f, (q, k, v), mesh, rules, P(shd.BATCH_AXES, None, "tensor", None))
    # Learned sinks [H]: split over heads with the queries, their gradient summed over batch shards.
    for impl in ("pallas_tpu", "pallas_gpu"):
        q, k, v, s = r(2, 64, 4, 16), r(2, 64, 2, 16), r(2, 64, 2, 16), r(4)
        f = jax.jit(jax.value_and_grad(lambda q, k, v, s: jnp.sum(jnp.sin(kernels.attention(
            q, k, v, mask=masks.SlidingWindow(24), impl=impl, sinks=s, block_sizes=(16, 16)))), argnums=(0, 1, 2, 3)))
        out[f"attention_{impl}_sinks"] = _compare(f, (q, k, v, s), mesh, rules, P(shd.BATCH_AXES, None, "tensor", None))
    for impl in ("pallas_tpu",):
        q, k, v = r(2, 64, 4, 8) * 0.5, r(2, 64, 2, 8) * 0.5, r(2, 64, 2, 8)
        f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(kernels.linear_attention(
            q, k, v, impl=impl, chunk_size=16))), argnums=(0, 1, 2)))
        out[f"linear_{impl}"] = _compare(f, (q, k, v), mesh, rules, P(shd.BATCH_AXES, None, "tensor", None))
    return out


def _compare(f, args, mesh, rules, spec) -> float:
    one = f(*args)
    with jax.set_mesh(mesh), shd.use_rules(rules):
        placed = [jax.device_put(a, NamedSharding(mesh, P() if a.ndim < 3 else spec if a.shape[2] % 2 == 0
                                                  else P(shd.BATCH_AXES)))
                  for a in args]
        many = f(*placed)
    return max(float(jnp.max(jnp.abs(a - jnp.asarray(b)))) / float(jnp.max(jnp.abs(a)))
               for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))


def main() -> None:
    lowered = {name: {p: lower_family(name, p) for p in ("tpu", "cuda")} for name in gm.list_models()}
    # Gated DeltaNet (pure JAX) inside Qwen3-Next's layout, next to the Pallas attention of its global layer.
    lowered["moe:qwen3_next_tiny"] = {p: lower_family("moe", p, "qwen3_next_tiny") for p in ("tpu", "cuda")}
    # GPT-OSS's layout: learned sinks in our Pallas kernels, window + global layers, biased experts.
    lowered["moe:gpt_oss_tiny"] = {p: lower_family("moe", p, "gpt_oss_tiny") for p in ("tpu", "cuda")}
    print("RESULT " + json.dumps({"lowered": lowered, "sharded_vs_one_device": sharded_vs_one_device()}))


if __name__ == "__main__":
    main()
