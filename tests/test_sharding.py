"""Sharded training on 8 fake CPU devices equals one device, for every rule table.

The fake devices must exist before JAX starts, so the comparison runs in a subprocess
(tests/sharded_check.py, the session fixture ``sharded`` in tests/conftest.py, also read by
tests/test_conformance.py) and reports JSON. Tolerance: float32 reductions run in a
different order when split across devices, so losses agree to 1e-5 relative and the
parameters after 3 AdamW steps to 1e-5 relative L2 per tensor (measured: ~5e-8).
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import glocal.models as gm
from glocal.sharding import (LOGICAL_NAMES, MESH_AXES, RULE_TABLES, ShardingError, logical_to_spec, make_mesh,
                             mesh_shape, variable_shardings)
from glocal.train.config import TrainConfig
from glocal.train.optim import make_optimizer
from glocal.train.trainer import _opt_shardings


@pytest.mark.parametrize("name", ["fit_tiny", "block_tiny"])
def test_global_local_models_shard_like_one_device(sharded, name):
    r = sharded["models"][name]
    np.testing.assert_allclose(r["fsdp_tp"], r["one"], rtol=1e-5)
    assert r["param_rel_diff"] < 1e-5


@pytest.mark.parametrize("table", sorted(RULE_TABLES))
def test_eight_device_step_equals_one_device(sharded, table):
    assert sharded["devices"] == 8
    r = sharded[table]
    np.testing.assert_allclose(r["loss"], sharded["one"], rtol=1e-5)
    assert r["param_rel_diff"] < 1e-5
    assert r["eval_loss"] == pytest.approx(sharded["one_eval_loss"], rel=1e-5)
    assert sharded["one"][-1] < sharded["one"][0]  # the steps did something


def test_restore_onto_a_different_mesh_continues_identically(sharded):
    np.testing.assert_allclose(sharded["moved"]["loss"], sharded["moved"]["one_loss"], rtol=1e-5)


def test_mesh_shapes_and_specs():
    assert mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    with pytest.raises(ShardingError, match="only one mesh axis may be -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ShardingError, match="does not divide 8"):
        mesh_shape({"data": -1, "tensor": 3}, 8)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    # size-1 axes are dropped, so every table gives fully replicated specs on one device
    assert tuple(logical_to_spec(("embed", "mlp"), (64, 128), mesh, RULE_TABLES["fsdp_tp"])) == (None, None)


def test_logical_to_spec_skips_axes_that_do_not_divide():
    class FakeMesh:  # logical_to_spec only reads axis sizes
        shape = {"data": 2, "fsdp": 4, "expert": 1, "tensor": 2}

    rules = RULE_TABLES["fsdp_tp"]
    spec = lambda names, shape: tuple(logical_to_spec(names, shape, FakeMesh, rules))
    assert spec(("embed", "mlp"), (64, 256)) == ("fsdp", "tensor")
    assert spec(("vocab", "embed"), (259, 64)) == (None, "fsdp")  # 259 is odd: vocab unsharded
    assert spec(("batch", None), (8, 5)) == (("data", "fsdp"), None)
    assert spec(("batch", None), (2, 5)) == ("data", None)  # fsdp would not divide 2 / 2
    assert spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16)) == (None, "fsdp", "tensor", None)


class FakeMesh:  # logical_to_spec only reads axis sizes
    shape = {"data": 2, "fsdp": 4, "expert": 2, "tensor": 2}


def test_unknown_logical_name_is_an_error():
    for rules in RULE_TABLES.values():
        with pytest.raises(ShardingError, match="'embd' is not in sharding rule table"):
            logical_to_spec(("embd", "mlp"), (64, 256), FakeMesh, rules)
    # positional None stays allowed: an unsharded dimension
    assert tuple(logical_to_spec((None, "mlp"), (64, 256), FakeMesh, RULE_TABLES["fsdp_tp"])) == (None, "tensor")


def test_every_table_lists_every_name_and_experts_use_the_expert_axis():
    for name, rules in RULE_TABLES.items():
        assert [n for n, _ in rules] == list(LOGICAL_NAMES), name
        for _, target in rules:
            targets = (target,) if isinstance(target, str) else target or ()
            assert set(targets) <= set(MESH_AXES)
    for name in ("fsdp", "fsdp_tp"):
        assert tuple(logical_to_spec(("expert", "embed", "mlp"), (4, 64, 256), FakeMesh,
                                     RULE_TABLES[name]))[0] == "expert"


def _abstract_params(family):
    model = nnx.eval_shape(lambda: gm.build(family, "tiny"))
    return nnx.split(model, nnx.Param, ...)[1]


@pytest.mark.parametrize("family", gm.list_models())
def test_every_parameter_name_of_every_model_resolves_under_every_table(family):
    variables = jax.tree.leaves(_abstract_params(family), is_leaf=lambda x: isinstance(x, nnx.Variable))
    names = {n for v in variables for n in v.get_metadata().get("out_sharding") or ()}
    assert names - {None} <= set(LOGICAL_NAMES), names
    for rules in RULE_TABLES.values():
        for v in variables:  # raises ShardingError on a name the table does not list
            logical_to_spec(v.get_metadata().get("out_sharding") or (), v.shape, FakeMesh, rules)


def test_adam_state_takes_exactly_its_parameters_sharding():
    mesh = AbstractMesh((2, 2, 1, 2), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    params = _abstract_params("transformer")
    param_sh = variable_shardings(params, mesh, RULE_TABLES["fsdp_tp"])
    tx = make_optimizer(TrainConfig(weight_decay=0.1, grad_clip=1.0), params)  # clipping + masked decay
    opt_sh = _opt_shardings(jax.eval_shape(tx.init, params), param_sh, mesh)
    want = [s.spec for s in jax.tree.leaves(param_sh)]
    assert any(spec != P(*[None] * len(spec)) for spec in want)  # the check is not vacuous
    adam = opt_sh[1][0]
    for moment in (adam.mu, adam.nu):
        assert [s.spec for s in jax.tree.leaves(moment)] == want
    rest = [(jax.tree_util.keystr(path), s) for path, s in jax.tree_util.tree_flatten_with_path(opt_sh)[0]
            if not jax.tree_util.keystr(path).startswith(("[1][0].mu", "[1][0].nu"))]
    assert [k for k, _ in rest] == ["[1][0].count", "[1][2].count"]  # Adam's and the schedule's
    assert all(isinstance(s, NamedSharding) and s.spec == P() for _, s in rest)
