"""Mixture-of-experts (glocal.layers.moe, glocal.layers.routing, glocal.kernels.gmm) against
independent references: a NumPy loop over tokens and their chosen experts (forward), the same
loop in jax.numpy for gradients, NumPy formulas for the router losses; dropping order with
exact counts; causality; a one-expert MoE equal to the dense MLP; the selection bias and its
update. (The conformance suite runs `moe` too: causality, decode == teacher forcing,
generation, cache bytes, FLOPs, 8 devices == 1.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glocal.models as gm
from glocal.kernels.gmm import grouped_matmul
from glocal.layers import LayerSpec, MLP
from glocal.layers import routing
from glocal.layers.moe import MoEFFN, MoEOptions
from tests.lm_checks import assert_causal

RNG = np.random.default_rng(13)


def make(**moe):
    spec = LayerSpec(d_model=8, num_heads=2, d_ff=12)
    layer = MoEFFN(spec, MoEOptions(**{"num_experts": 4, "top_k": 2, **moe}), rngs=nnx.Rngs(0))
    # A router with a spread of logits, so the top-k choices are clear-cut.
    layer.router_DX[...] = jnp.asarray(RNG.normal(size=layer.router_DX.shape), jnp.float32)
    return layer


def weights(layer):
    return {k: np.asarray(getattr(layer, k)[...], np.float64) for k in ("router_DX", "wi_XDAI", "wo_XID")}


def silu(a):
    return a / (1 + np.exp(-a))


def softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def loop_np(w, x_BTD, k, convention="renorm", bias=None, capacity=None):
    """Token by token: its top-k experts (by logits + bias), combine weights, the experts'
    SwiGLU outputs. ``capacity``: per row, slots per expert in token order (token-major,
    then rank); an assignment that does not fit adds nothing. Also returns the kept mask."""
    x = np.asarray(x_BTD, np.float64)
    B, T, D = x.shape
    y = np.zeros_like(x)
    kept = np.ones((B, T, k), bool)
    for b in range(B):
        used = np.zeros(w["router_DX"].shape[1], int)
        for t in range(T):
            logits = x[b, t] @ w["router_DX"]
            sel = logits + (0 if bias is None else bias)
            idx = np.argsort(-sel, kind="stable")[:k]
            comb = softmax(logits[idx]) if convention == "renorm" else softmax(logits)[idx]
            for j, e in enumerate(idx):
                if capacity is not None:
                    if used[e] >= capacity:
                        kept[b, t, j] = False
                        continue
                    used[e] += 1
                h = np.einsum("d,dai->ai", x[b, t], w["wi_XDAI"][e])
                y[b, t] += comb[j] * ((silu(h[0]) * h[1]) @ w["wo_XID"][e])
    return y, kept


@pytest.mark.parametrize("impl", ["dense", "capacity", "dropless"])
@pytest.mark.parametrize("convention", ["renorm", "softmax"])
def test_dispatch_matches_the_token_loop(impl, convention):
    layer = make(impl=impl, router_weights=convention, capacity_factor=4.0)  # 4.0: nothing dropped
    x = jnp.asarray(RNG.normal(size=(2, 7, 8)), jnp.float32)
    y, aux = layer(x)
    want, _ = loop_np(weights(layer), x, 2, convention)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert float(aux["moe_dropped"][0]) == 0.0


def test_gradients_of_every_dispatch_match_a_jnp_loop():
    """Gradients w.r.t. the input, the experts and the router (through the combine weights),
    against autodiff of a per-token loop with the same (fixed) expert choices."""
    layer = make(impl="dense")
    x = jnp.asarray(RNG.normal(size=(2, 5, 8)), jnp.float32)
    g = jnp.asarray(RNG.normal(size=(2, 5, 8)), jnp.float32)
    logits = np.asarray(x, np.float64) @ weights(layer)["router_DX"]
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :2]

    def loop(x, router, wi, wo):
        out = []
        for b in range(2):
            for t in range(5):
                l = x[b, t] @ router
                comb = jax.nn.softmax(l[idx[b, t]])
                h = jnp.einsum("d,xdai->xai", x[b, t], wi[idx[b, t]])
                out.append(jnp.einsum("x,xi,xid->d", comb, jax.nn.silu(h[:, 0]) * h[:, 1], wo[idx[b, t]]))
        return jnp.sum(jnp.stack(out).reshape(2, 5, 8) * g)

    params = (x, layer.router_DX[...], layer.wi_XDAI[...], layer.wo_XID[...])
    want = jax.grad(loop, argnums=(0, 1, 2, 3))(*params)
    for impl in ("dense", "capacity", "dropless"):
        lay = make(impl=impl, capacity_factor=4.0)
        lay.router_DX[...], lay.wi_XDAI[...], lay.wo_XID[...] = params[1:]
        graph, state = nnx.split(lay)
        dx, dstate = jax.grad(lambda x, s: jnp.sum(nnx.merge(graph, s)(x)[0] * g), argnums=(0, 1))(x, state)
        got = (dx, dstate["router_DX"][...], dstate["wi_XDAI"][...], dstate["wo_XID"][...])
        for name, a, b in zip(("x", "router", "wi", "wo"), got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{impl}: d{name}")


def test_capacity_with_a_large_factor_equals_dropless():
    x = jnp.asarray(RNG.normal(size=(3, 16, 8)), jnp.float32)
    a, b = make(impl="capacity", capacity_factor=8.0), make(impl="dropless")
    b.router_DX[...], b.wi_XDAI[...], b.wo_XID[...] = a.router_DX[...], a.wi_XDAI[...], a.wo_XID[...]
    np.testing.assert_allclose(a(x)[0], b(x)[0], rtol=1e-5, atol=1e-6)


def test_capacity_drops_later_tokens_first_with_exact_counts():
    # Every token prefers expert 0, then expert 1: with C slots per expert and row, tokens
    # 0..C-1 keep both choices and every later token loses both.
    layer = make(impl="capacity", capacity_factor=1.0, top_k=2)
    T = 10
    C = routing.capacity(T, 2, 4, 1.0)
    assert C == 5
    layer.router_DX[...] = jnp.zeros((8, 4)).at[0].set(jnp.asarray([3.0, 2.0, -1.0, -2.0]))
    x = jnp.asarray(np.abs(RNG.normal(size=(2, T, 8))) + 0.1, jnp.float32)  # x[..., 0] > 0: the order holds
    y, aux = layer(x)
    want, kept = loop_np(weights(layer), x, 2, capacity=C)
    assert kept[:, :C].all() and not kept[:, C:].any()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y[:, C:]), 0.0)
    np.testing.assert_allclose(float(aux["moe_dropped"][0]), (T - C) / T)
    slot, keep = routing.capacity_slots(jnp.asarray(np.tile([[0, 1]], (1, T, 1))), 4, C)
    np.testing.assert_array_equal(slot[0, :, 0], np.arange(T))
    np.testing.assert_array_equal(keep[0, :, 1], np.arange(T) < C)


def test_router_losses_against_numpy():
    logits = RNG.normal(size=(50, 4)).astype(np.float32)
    idx, comb, probs = routing.token_choice(jnp.asarray(logits), 2, "softmax")
    p = softmax(logits.astype(np.float64))
    top = np.argsort(-logits, -1, kind="stable")[:, :2]
    np.testing.assert_array_equal(idx, top)
    np.testing.assert_allclose(comb, np.take_along_axis(p, top, -1), rtol=1e-5)
    _, comb_r, _ = routing.token_choice(jnp.asarray(logits), 2, "renorm")
    np.testing.assert_allclose(comb_r, softmax(np.take_along_axis(logits, top, -1)), rtol=1e-5)
    f = np.bincount(top.ravel(), minlength=4) / top.size
    np.testing.assert_allclose(routing.balance_loss(probs, idx), 4 * np.sum(f * p.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(routing.z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=1e-5)
    # Perfect balance (each expert chosen equally often, uniform probabilities): exactly 1, so
    # the weighted loss is alpha.
    uniform = jnp.zeros((8, 4))
    idx_bal = jnp.asarray(np.arange(8)[:, None] % 4)
    assert float(routing.balance_loss(jax.nn.softmax(uniform), idx_bal)) == pytest.approx(1.0)


def test_selection_bias_changes_selection_not_combine_weights():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0]])
    idx0, w0, _ = routing.token_choice(logits, 2, "softmax")
    idx1, w1, _ = routing.token_choice(logits, 2, "softmax", bias_X=jnp.asarray([0.0, -5.0, 0.0, 5.0]))
    assert idx0.tolist() == [[0, 1]] and idx1.tolist() == [[3, 0]]
    p = softmax(np.asarray(logits, np.float64))[0]
    np.testing.assert_allclose(w1[0], p[[3, 0]], rtol=1e-5)  # the unbiased probabilities of the chosen
    np.testing.assert_allclose(w0[0], p[[0, 1]], rtol=1e-5)


def test_one_expert_moe_equals_the_dense_mlp():
    layer = make(num_experts=1, top_k=1, impl="dropless")
    mlp = MLP(8, 12, rngs=nnx.Rngs(1))
    mlp.wi_DAI[...], mlp.wo_ID[...] = layer.wi_XDAI[...][0], layer.wo_XID[...][0]
    x = jnp.asarray(RNG.normal(size=(2, 6, 8)), jnp.float32)
    np.testing.assert_allclose(layer(x)[0], mlp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["capacity", "dropless"])
def test_token_choice_moe_is_causal(impl):
    model = gm.build("moe", "tiny", seed=2, moe_impl=impl, capacity_factor=1.0)
    x = jnp.asarray(RNG.integers(0, 256, (2, 24)), jnp.int32)
    assert_causal(model, x, (0, 5, 11, 23))


def test_grouped_matmul_matches_a_loop_with_empty_groups():
    sizes = np.array([5, 0, 9, 0, 3])
    x = RNG.normal(size=(17, 6)).astype(np.float32)
    w = RNG.normal(size=(5, 6, 4)).astype(np.float32)
    ct = RNG.normal(size=(17, 4)).astype(np.float32)
    groups = np.repeat(np.arange(5), sizes)
    want = np.stack([x[r].astype(np.float64) @ w[groups[r]] for r in range(17)])
    dw_want = np.zeros_like(w, np.float64)
    for r in range(17):
        dw_want[groups[r]] += np.outer(x[r], ct[r])
    for impl, tile in (("ragged_dot", None), ("tiled", None), ("tiled", 2), ("tiled", 8)):
        f = lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes), impl=impl, tile=tile)
        np.testing.assert_allclose(f(x, w), want, rtol=1e-5, atol=1e-5, err_msg=impl)
        dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w) * ct), argnums=(0, 1))(x, w)
        np.testing.assert_allclose(dx, np.einsum("rn,rdn->rd", ct, w[groups]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dw, dw_want, rtol=1e-5, atol=1e-5)


def _one_step(model, tcfg, batch_size=2, T=16, seed=0):
    from glocal.train.optim import make_optimizer
    from glocal.train.step import make_train_step

    graph, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(tcfg, params)
    x = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (1, batch_size, T + 1)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, batch_size, T))
    batch = {"inputs": x[..., :-1], "targets": x[..., 1:], "positions": pos,
             "segment_ids": jnp.zeros_like(pos), "loss_mask": jnp.ones((1, batch_size, T), jnp.float32)}
    step = jax.jit(make_train_step(lambda p: nnx.merge(graph, p), tx))
    new, _, metrics = step(params, tx.init(params), batch)
    return params, new, metrics


def test_selection_bias_moves_by_exactly_the_rate_toward_balance():
    from glocal.train.config import TrainConfig

    rate = 0.01
    model = gm.build("moe", "tiny", seed=4, router_bias_rate=rate)
    old, new, metrics = _one_step(model, TrainConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=1e-3))
    ffn = lambda p: p["decoder"]["stacks"][1]["units"]["layers"][1]["ffn"]
    load = np.array([float(metrics[f"moe_load/l0/{e}"]) for e in range(4)])
    step = np.asarray(ffn(new)["select_bias_X"][...] - ffn(old)["select_bias_X"][...])[0]
    np.testing.assert_allclose(step, -rate * np.sign(load - load.mean()), atol=1e-7)  # busy experts go down
    assert float(metrics["aux/moe_bias"]) == 0.0  # the surrogate adds nothing to the loss
    # The other parameters took an Adam step (clipping did not shrink the bias's step).
    assert np.abs(np.asarray(ffn(new)["router_DX"][...] - ffn(old)["router_DX"][...])).max() > 1e-4


def test_statistics_are_logged_per_layer_and_not_optimised():
    from glocal.train.config import TrainConfig

    model = gm.build("moe", "tiny", seed=5, moe_impl="capacity", capacity_factor=0.5)
    _, _, metrics = _one_step(model, TrainConfig())
    loads = [float(metrics[f"moe_load/l0/{e}"]) for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["moe_load_max_over_mean/l0"]) == pytest.approx(4 * max(loads), rel=1e-5)
    assert 0.0 < float(metrics["moe_dropped/l0"]) < 1.0  # half the slots: some dropped
    assert 0.0 < float(metrics["moe_entropy"]) <= np.log(4) + 1e-6
    assert {"aux/moe_balance", "aux/moe_z"} <= set(metrics) and "aux/moe_load" not in metrics


def test_expert_choice_picks_exactly_C_tokens_per_expert_in_position_order():
    logits = jnp.asarray(RNG.normal(size=(2, 12, 4)), jnp.float32)
    C = routing.capacity(12, 1, 4, 2.0)
    tok, gate, member = routing.expert_choice(logits, C)
    p = softmax(np.asarray(logits, np.float64))
    for b in range(2):
        for e in range(4):
            want = np.sort(np.argsort(-p[b, :, e], kind="stable")[:C])
            np.testing.assert_array_equal(tok[b, e], want)
            np.testing.assert_allclose(gate[b, e], p[b, want, e], rtol=1e-5)
    np.testing.assert_array_equal(member.sum(1), C)  # every expert exactly C tokens


def test_expert_choice_layer_matches_a_loop_and_threshold_mode_is_causal():
    layer = make(router="expert_choice", capacity_factor=2.0)
    x = jnp.asarray(RNG.normal(size=(2, 10, 8)), jnp.float32)
    y, aux = layer(x)
    w = weights(layer)
    p = softmax(np.asarray(x, np.float64) @ w["router_DX"])
    want = np.zeros((2, 10, 8))
    C = routing.capacity(10, 1, 4, 2.0)
    for b in range(2):
        for e in range(4):
            for t in np.argsort(-p[b, :, e], kind="stable")[:C]:
                h = np.einsum("d,dai->ai", np.asarray(x[b, t], np.float64), w["wi_XDAI"][e])
                want[b, t] += p[b, t, e] * ((silu(h[0]) * h[1]) @ w["wo_XID"][e])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert {"moe_predictor", "moe_predictor_agreement"} <= set(aux)
    model = gm.build("moe", "tiny", seed=6, router="expert_choice", routing_mode="threshold", capacity_factor=2.0)
    # A predictor that fires for some tokens and not others (its init is near zero).
    ffn = model.decoder.stacks[1].units.layers[1].ffn
    ffn.predictor_DX[...] = jnp.asarray(RNG.normal(size=ffn.predictor_DX.shape), jnp.float32)
    assert_causal(model, jnp.asarray(RNG.integers(0, 256, (2, 20)), jnp.int32), (0, 9, 19))
    topk = gm.build("moe", "tiny", seed=6, router="expert_choice", capacity_factor=2.0)
    x = jnp.asarray(RNG.integers(0, 256, (1, 20)), jnp.int32)
    base = topk(x)[0]
    changed = topk(x.at[:, 19].set((x[:, 19] + 1) % 256))[0]
    assert np.abs(np.asarray(changed[:, :19] - base[:, :19])).max() > 0  # top-k routing sees the future


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
def test_grouped_matmul_rows_past_the_groups_are_zero(impl):
    x = RNG.normal(size=(12, 3)).astype(np.float32)
    w = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    sizes = jnp.asarray([4, 3])  # rows 7..11 belong to no group
    out = grouped_matmul(x, w, sizes, impl=impl, tile=2)
    np.testing.assert_allclose(out[:4], x[:4] @ w[0], rtol=1e-5)
    np.testing.assert_allclose(out[4:7], x[4:7] @ w[1], rtol=1e-5)
    np.testing.assert_array_equal(out[7:], 0.0)
    dx, dw = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, impl=impl, tile=2) ** 2), (0, 1))(x, w)
    np.testing.assert_array_equal(dx[7:], 0.0)
    np.testing.assert_allclose(dw[1], 2 * x[4:7].T @ (x[4:7] @ w[1]), rtol=1e-4)


@pytest.mark.parametrize("mesh", ["data2_expert4", "data2_fsdp2_expert2"])
def test_expert_parallel_training_equals_one_device(sharded, mesh):
    """moe_tiny (dropless) with its experts split over the expert mesh axis (shard_map +
    all_to_all; tests/sharded_check.py) trains like the one-device run."""
    r = sharded["expert_parallel"][mesh]
    np.testing.assert_allclose(r["loss"], r["one"], rtol=1e-5)
    assert r["param_rel_diff"] < 1e-4


def test_expert_parallel_dispatch_is_used_under_an_expert_mesh():
    """In-process check that the dispatch really goes through all_to_all (a mesh of one device
    per axis would silently take the plain path: this needs the 8-device subprocess)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp
        from flax import nnx
        import glocal.models as gm
        from glocal import sharding as shd
        model = gm.build("moe", "tiny", seed=3)
        graph, params = nnx.split(model, nnx.Param)
        mesh = shd.make_mesh(shd.mesh_shape({"expert": 4}, 4))
        with jax.set_mesh(mesh), shd.use_rules(shd.rule_table("fsdp")):
            text = jax.jit(lambda p, x: nnx.merge(graph, p)(x)[0]).lower(params, jnp.zeros((4, 8), jnp.int32)).as_text()
        print("ALL_TO_ALL", text.count("all_to_all"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ALL_TO_ALL" in out.stdout, out.stderr[-2000:]
    assert int(out.stdout.split("ALL_TO_ALL")[1]) >= 2  # dispatch and return


def test_expert_choice_run_evaluates_under_both_routings(tmp_path):
    """Train a few steps with expert choice, then `glocal eval`: both routing modes' losses
    and their agreement are reported; generation decodes with the causal rule."""
    import glocal
    from glocal import workdir as workdirs
    from glocal.train.evaluate import evaluate_workdir
    from glocal.train.trainer import train
    from tests.test_data import make_folder

    run = {"batch_size": "4", "seq_len": "32", "eval_batches": "1", "log_every": "1", "sample_tokens": "0",
           "steps": "3", "checkpoint_every": "0", "tensorboard": "false", "data": str(make_folder(tmp_path / "c")),
           "router": "expert_choice", "capacity_factor": "2.0"}
    out = train("moe_tiny", tmp_path / "wd", run)
    assert out["history"][-1]["moe_predictor_agreement"] > 0
    lines = []
    r = evaluate_workdir(tmp_path / "wd", log=lines.append)
    assert {"eval_loss_topk", "eval_loss_threshold"} <= set(r) and 0.0 <= r["routing_agreement"] <= 1.0
    assert np.isfinite(r["eval_loss_threshold"]) and any("routing_mode=threshold (causal)" in s for s in lines)
    model, _ = workdirs.load_model(tmp_path / "wd")
    assert model.config.options["moe"].routing_mode == "topk"
    from glocal.generation import causal_variant
    assert causal_variant(model).config.options["moe"].routing_mode == "threshold"
    assert len(glocal.generate(model, [[1, 2, 3]], 4)[0]) == 4


def test_shared_experts_add_a_dense_ffn_to_the_routed_output():
    spec = LayerSpec(d_model=8, num_heads=2, d_ff=12)
    layer = MoEFFN(spec, MoEOptions(num_experts=4, top_k=2, shared_experts=2), rngs=nnx.Rngs(3))
    assert layer.shared.wi_DAI.shape == (8, 2, 24)  # 2 experts' width, always on
    x = jnp.asarray(RNG.normal(size=(2, 5, 8)), jnp.float32)
    routed, _ = loop_np(weights(layer), x, 2)
    np.testing.assert_allclose(layer(x)[0], routed + np.asarray(layer.shared(x), np.float64), rtol=1e-4, atol=1e-5)
