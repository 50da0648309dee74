"""Run once per test session (the ``sharded`` fixture of tests/conftest.py) in its own
process: 8 fake CPU devices must be set before JAX starts. Trains the same tiny run on 1
device and on 8 devices under each rule table, restores a sharded checkpoint onto another
mesh, trains the ``tiny`` preset of every registered model family on 1 vs 8 devices
(fsdp_tp) and the MoE preset with its experts split over the expert axis, and prints the
comparison as JSON."""

import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import glocal.models as gm  # noqa: E402
from glocal import workdir as workdirs  # noqa: E402
from glocal.train.trainer import train  # noqa: E402

MESHES = {"dp": {"mesh.data": "8"}, "fsdp": {"mesh.data": "2", "mesh.fsdp": "4"},
          "fsdp_tp": {"mesh.data": "2", "mesh.fsdp": "2", "mesh.tensor": "2"}}


def main(corpus: str, out: str) -> None:
    out = pathlib.Path(out)
    run = {"batch_size": "8", "seq_len": "32", "steps": "3", "eval_batches": "1", "log_every": "1",
           "sample_tokens": "0", "warmup_steps": "1", "checkpoint_every": "0", "data": corpus,
           "tensorboard": "false"}
    loss = lambda r: [h["loss"] for h in r["history"]]
    params = lambda wd: effective_params(workdirs.load_model(wd)[0])
    rel = lambda a, b: max(float(np.linalg.norm(x - y) / (np.linalg.norm(y) + 1e-12)) for x, y in zip(a, b))
    one = train("transformer_tiny", out / "one", {**run, "mesh.data": "1"}, devices=jax.devices()[:1])
    p_one = params(out / "one")
    result = {"devices": jax.device_count(), "one": loss(one)}
    for table, mesh in MESHES.items():
        r = train("transformer_tiny", out / table, {**run, "sharding": table, **mesh})
        result[table] = {"loss": loss(r), "eval_loss": r["eval_loss"], "param_rel_diff": rel(params(out / table), p_one)}
    result["one_eval_loss"] = one["eval_loss"]
    # Restore the fsdp_tp checkpoint onto a different mesh and continue one step; compare
    # with the single-device run continued the same way.
    r_one = train(None, out / "one", {"steps": "4"}, devices=jax.devices()[:1])
    r_moved = train(None, out / "fsdp_tp", {"steps": "4", "mesh.data": "1", "mesh.fsdp": "8",
                                            "mesh.tensor": "1", "sharding": "fsdp"})
    result["moved"] = {"loss": loss(r_moved), "one_loss": loss(r_one)}
    # Every family's tiny preset under the richest table (every parameter and activation
    # name it uses must map cleanly onto the mesh).
    result["models"] = {}
    # (+ Qwen3-Next's preset: Gated DeltaNet, gated attention and a gated shared expert; GPT-OSS's:
    # learned sinks, attention and expert biases, a biased router.)
    for name in [*(f"{family}_tiny" for family in gm.list_models()), "moe_qwen3_next_tiny", "moe_gpt_oss_tiny"]:
        if name == "transformer_tiny":  # trained above under every table (3 steps)
            result["models"][name] = {"one": result["one"], "fsdp_tp": result["fsdp_tp"]["loss"],
                                      "param_rel_diff": result["fsdp_tp"]["param_rel_diff"]}
            continue
        short = {**run, "steps": "2"}  # the losses are the comparison
        a = train(name, out / f"{name}_one", {**short, "mesh.data": "1"}, devices=jax.devices()[:1])
        b = train(name, out / f"{name}_tp", {**short, "sharding": "fsdp_tp", **MESHES["fsdp_tp"]})
        result["models"][name] = {"one": loss(a), "fsdp_tp": loss(b),
                                  "param_rel_diff": rel(params(out / f"{name}_tp"), params(out / f"{name}_one"))}
    # Expert parallelism: the MoE preset's experts split over the expert axis (dropless
    # dispatch through shard_map + all_to_all), against its one-device run above.
    result["expert_parallel"] = {}
    for label, mesh in (("data2_expert4", {"mesh.data": "2", "mesh.expert": "4"}),
                        ("data2_fsdp2_expert2", {"mesh.data": "2", "mesh.fsdp": "2", "mesh.expert": "2"})):
        r = train("moe_tiny", out / f"moe_{label}", {**run, "steps": "2", "sharding": "fsdp", **mesh})
        result["expert_parallel"][label] = {"loss": loss(r), "one": result["models"]["moe_tiny"]["one"],
                                            "param_rel_diff": rel(params(out / f"moe_{label}"),
                                                                  params(out / "moe_tiny_one"))}
    result["hf_sharded"] = hf_sharded_import(out / "hf")
    print("RESULT " + json.dumps(result))


def effective_params(model) -> list:
    """Every parameter as the model uses it: a zero-centred norm's stored offset ``w`` (init 0,
    ``norm="rms_centered"``) as its gain ``1 + w``, so that a relative difference is not taken
    of a value that starts at zero (after two Adam steps ~lr, where float noise in a near-zero
    gradient flips an update's sign)."""
    centred = getattr(model.config, "norm", None) == "rms_centered"
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        name = jax.tree_util.keystr(path)
        is_scale = name.endswith("['scale']") or name.endswith("['scale'].value")
        out.append(np.asarray(x) + (1.0 if centred and is_scale else 0.0))
    return out


def hf_sharded_import(folder: pathlib.Path) -> dict:
    """A Hugging Face folder loaded straight onto a 2 x 2 x 2 mesh (fsdp_tp): every parameter
    placed with the sharding its logical axes name, same logits as on one device."""
    import jax.numpy as jnp
    import glocal.hf
    from glocal import sharding as shd

    model = gm.build("transformer", "tiny", seed=5, vocab_size=97, num_kv_heads=2)
    glocal.hf.save_pretrained(model, folder)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rule_table("fsdp_tp")
    placed = glocal.hf.from_pretrained(folder, mesh=mesh, rules=rules)
    wrong, split = [], 0
    for (path, v), (_, a) in zip(jax.tree_util.tree_flatten_with_path(nnx.state(placed, nnx.Param))[0],
                                 jax.tree_util.tree_flatten_with_path(
                                     nnx.variables(placed, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]):
        want = shd.logical_to_spec(a.get_metadata()["out_sharding"], v.shape, mesh, rules)
        if v.sharding.spec != want or v.sharding.mesh.shape != mesh.shape:
            wrong.append(f"{jax.tree_util.keystr(path)}: {v.sharding.spec} != {want}")
        split += any(s is not None for s in want)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 16)))
    diff = float(np.abs(np.asarray(placed(x)[0]) - np.asarray(model(x)[0])).max())
    return {"wrong": wrong, "split_params": split, "logit_diff": diff}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
