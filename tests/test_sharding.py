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

from glocal.sharding import RULE_TABLES, ShardingError, logical_to_spec, make_mesh, mesh_shape


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
