"""Per-platform defaults: ``remat="auto"`` resolves to the measured choice, explicit values win,
and the resolved policy is the one the traced step actually uses."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import glocal.models as gm
from glocal.configs.base import ConfigError
from glocal.platform_defaults import resolve_remat


def test_auto_resolves_per_platform_and_explicit_values_win():
    assert resolve_remat("auto", "cpu") == "dots"
    assert resolve_remat("auto", "gpu") == "none" and resolve_remat("auto", "tpu") == "none"
    for policy in ("none", "full", "dots", "all_dots"):
        assert resolve_remat(policy, "cpu") == policy
    assert gm.get_config("transformer", "tiny").remat == "auto"
    with pytest.raises(ConfigError, match="remat='sometimes' is not one of"):
        gm.get_config("transformer", "tiny", remat="sometimes")


def _remat_calls(remat):
    """The checkpoint primitives in the traced forward pass and the policy each one carries."""
    model = gm.build("transformer", "tiny", remat=remat)
    graphdef, params = nnx.split(model)
    x = jnp.zeros((1, 8), jnp.int32)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x)[0])

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "checkpoint" or "remat" in eqn.primitive.name:  # remat2 in jax 0.12
                found.append(eqn.params.get("policy"))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr, or a Jaxpr
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(loss)(params).jaxpr)
    return found


def test_the_traced_step_uses_the_resolved_policy():
    expected = resolve_remat("auto")
    auto = _remat_calls("auto")
    if expected == "none":
        assert auto == []
    else:
        assert auto and all(p is not None for p in auto)
        assert [str(p) for p in auto] == [str(p) for p in _remat_calls(expected)]
    assert _remat_calls("none") == []
