"""Mixture-of-experts FFN: the ``moe`` FFN kind of the decoder skeleton (any family's layers
can use it with ``ffn="moe"``).

    logits = x W_r (+ b_r) (float32) -> router -> experts(x) -> sum_e combine_e * expert_e(x)
                                                           (+ always-on shared experts)

The shared experts are one dense FFN of width ``shared_experts * d_expert`` (or ``d_shared``);
``shared_gate`` scales its output per token by ``sigmoid(x shared_gate_D1)`` (Qwen3-Next).

Experts are the dense FFN's shape, stored stacked: ``wi_XDAI`` (gate and up fused, as in
``glocal.layers.MLP``) and ``wo_XID``, logical axis ``expert`` first, so an ``expert`` mesh
axis shards them. Its options are ``MoEOptions`` (``moe.num_experts=8`` on any model config).
GPT-OSS options: ``moe.router_bias`` (``router_b_X``, added to the router logits: it changes
both the choice and the combine weights) and ``moe.expert_bias`` (``bi_XAI`` after each
expert's input projection, ``bo_XD`` after its output projection, in every dispatch); the
clamped SwiGLU is the layer's activation (``mlp="swiglu_clamped"``, ``glocal.layers.mlp``).
Dispatch implementations (``moe.impl``; all give the same numbers when
nothing is dropped):

* ``dense``: every expert on every token, masked combine (the reference; X times the FLOPs).
* ``capacity``: per sequence, each expert has ``ceil(k T / X * capacity_factor)`` buffer
  slots filled in token order; assignments that do not fit are dropped (contribute zero;
  the residual carries the token). Scatter into ``[B, X, S, D]`` buffers, no one-hot
  ``[tokens, X, S]`` tensors.
* ``dropless``: the ``B T k`` assignments sorted by expert, two grouped matmuls
  (``glocal.kernels.gmm``: ``jax.lax.ragged_dot`` on GPU/TPU, a tiled scan on CPU, where XLA's
  ragged_dot costs every expert on every row), unsorted and combined. Nothing is dropped.

Routers (``moe.router``, see ``glocal.layers.routing``): ``token_choice`` top-k, and
``expert_choice`` (each expert takes its top-capacity tokens of a sequence: non-causal, so it trains
a causal predictor beside it; ``routing_mode="threshold"`` routes each token to the experts
whose predictor says yes, which is what evaluation and decoding use).

Letters as in the package legend: O rows, the B T tokens flattened (or, in ``_experts_grouped``
and the expert-parallel exchange, the assignments handed to the experts), Z experts chosen per
token (top-k), S an expert's capacity slots.

Auxiliary losses go through the trainer's ``aux`` mechanism ``{name: (loss, weight)}``:
``moe_balance`` (Switch, ``alpha X sum f_e P_e``), ``moe_z`` (router z-loss), ``moe_predictor``
(expert choice), ``moe_bias`` (the selection bias's update, see ``MoEFFN``). Statistics (weight
None: logged, not optimised): ``moe_load`` per expert, ``moe_load_max_over_mean``,
``moe_dropped`` (fraction of assignments), ``moe_entropy``, ``moe_predictor_agreement``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from glocal.kernels.gmm import GMM_IMPLS, grouped_matmul
from glocal.layers import routing
from glocal.layers.mlp import GATED, MLP, activate
from glocal.layers.params import Bias, SelectionBias, as_dtype, fan_in_init, named_param, param
from glocal.layers.spec import KindOptions, LayerSpec, register_ffn
from glocal.sharding import constrain

ROUTERS = ("token_choice", "expert_choice")
ROUTER_WEIGHTS = ("renorm", "softmax")
MOE_IMPLS = ("dense", "capacity", "dropless")
ROUTING_MODES = ("topk", "threshold")


@dataclasses.dataclass(frozen=True)
class MoEOptions(KindOptions):
    """The ``moe`` FFN's experts and router (``moe.<field>`` on a model config)."""

    num_experts: int = 8  # X
    top_k: int = 2  # k (token choice)
    d_expert: int | None = None  # each expert's hidden width; None = the layer's d_ff
    router: str = "token_choice"  # token_choice | expert_choice
    router_weights: str = "renorm"  # renorm: softmax over the k chosen (Mixtral); softmax: full softmax (Switch)
    impl: str = "dropless"  # dense | capacity | dropless
    capacity_factor: float = 1.25  # capacity dispatch; expert choice: T * factor / X tokens per expert
    shared_experts: int = 0  # always-on experts (one dense FFN of shared_experts * d_expert)
    d_shared: int | None = None  # that FFN's hidden width instead of shared_experts * d_expert
    shared_gate: bool = False  # scale the shared output by sigmoid(x shared_gate_D1) per token (Qwen3-Next)
    balance_weight: float = 1e-2  # alpha of the Switch load-balance loss
    z_weight: float = 1e-3  # router z-loss
    bias_rate: float = 0.0  # > 0: auxiliary-loss-free balancing bias, moved +/- rate per step
    predictor_weight: float = 1e-2  # expert choice: BCE of the causal predictor
    routing_mode: str = "topk"  # expert choice: topk (training, non-causal) | threshold (causal)
    gmm_impl: str = "auto"  # dropless grouped matmul: auto | ragged_dot | tiled | tokamax (glocal.kernels.gmm)
    router_bias: bool = False  # a learned bias router_b_X on the router logits (GPT-OSS)
    expert_bias: bool = False  # biases bi_XAI / bo_XD after each expert's two projections (GPT-OSS)

    def validate(self, config=None) -> None:
        for name, allowed in (("router", ROUTERS), ("router_weights", ROUTER_WEIGHTS), ("impl", MOE_IMPLS),
                              ("routing_mode", ROUTING_MODES), ("gmm_impl", GMM_IMPLS)):
            if getattr(self, name) not in allowed:
                raise self.error(name, f"is not one of {allowed}.")
        for name in ("num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise self.error(name, "must be a positive integer.")
        if self.top_k > self.num_experts:
            raise self.error("top_k", f"exceeds moe.num_experts={self.num_experts}: a token cannot pick more "
                                      f"experts than exist. Lower top_k or raise num_experts.")
        if self.d_expert is not None and self.d_expert < 1:
            raise self.error("d_expert", "must be a positive integer (or None for d_ff).")
        if self.capacity_factor <= 0:
            raise self.error("capacity_factor", "must be positive.")
        for name in ("shared_experts", "bias_rate"):
            if getattr(self, name) < 0:
                raise self.error(name, "must be >= 0.")
        if self.d_shared is not None and self.d_shared < 1:
            raise self.error("d_shared", "must be a positive integer (or None for shared_experts * d_expert).")
        for name, value in (("d_shared", self.d_shared is not None), ("shared_gate", self.shared_gate)):
            if value and self.shared_experts < 1:
                raise self.error(name, "needs a shared expert, but moe.shared_experts=0; set moe.shared_experts=1.")

    def routing_modes(self) -> tuple[str, ...]:
        return ROUTING_MODES if self.router == "expert_choice" else ()

    def with_routing_mode(self, mode: str) -> "MoEOptions":
        return dataclasses.replace(self, routing_mode=mode) if self.routing_modes() else self


# The flat config keys of glocal's first configs, each naming one option.
_ALIASES = {"num_experts": "num_experts", "top_k": "top_k", "d_expert": "d_expert", "router": "router",
            "router_weights": "router_weights", "moe_impl": "impl", "capacity_factor": "capacity_factor",
            "shared_experts": "shared_experts", "balance_weight": "balance_weight", "router_z_weight": "z_weight",
            "router_bias_rate": "bias_rate", "predictor_weight": "predictor_weight", "routing_mode": "routing_mode",
            "moe_gmm_impl": "gmm_impl"}


def _expert_parallel_axes(num_experts: int, num_rows: int) -> tuple[str, ...]:
    """The mesh axes that the active rule table shards ``expert`` over (size > 1), when the
    experts and the token rows split evenly across them; ``()`` otherwise (no mesh, or a table
    that replicates experts: the plain dispatch runs and XLA places it)."""
    from glocal.sharding import BATCH_AXES, active_rules, mesh_axes_of

    rules, mesh = active_rules(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return ()
    axes = tuple(a for a in mesh_axes_of("expert", rules) if mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    rows = math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
    if not axes or num_experts % size or num_rows % rows:
        return ()
    return axes


@register_ffn("moe", options=MoEOptions, aliases=_ALIASES)
class MoEFFN(nnx.Module):
    """``X`` routed experts (+ shared experts). Returns ``(y_BTD, aux)``.

    The auxiliary-loss-free selection bias ``select_bias_X`` (when ``bias_rate > 0``) is a parameter
    that only ever receives the surrogate gradient ``rate * sign(load - mean load)`` (the
    ``moe_bias`` term has value 0), and the optimizer steps such parameters with plain SGD of
    rate 1 outside Adam, clipping and weight decay (``glocal.train.optim``): each step moves
    it by exactly ``+/- rate`` toward balance, as in DeepSeek-V3."""

    def __init__(self, spec: LayerSpec, options: MoEOptions, *, rngs: nnx.Rngs):
        m = options
        self.moe = m
        D, X = spec.d_model, m.num_experts
        I = m.d_expert or spec.d_ff  # noqa: E741 - the legend's FFN width
        self.activation, self.dtype = spec.mlp, as_dtype(spec.dtype)
        self.alpha, self.limit = spec.swiglu_alpha, spec.swiglu_limit
        A = 2 if spec.mlp in GATED else 1
        # The router stays float32 whatever the compute dtype (selective precision), small init.
        self.router_DX = param(rngs, fan_in_init(D, 0.1), (D, X), ("embed", None), jnp.float32)
        self.wi_XDAI = param(rngs, fan_in_init(D), (X, D, A, I), ("expert", "embed", None, "mlp"), spec.param_dtype)
        self.wo_XID = param(rngs, fan_in_init(I), (X, I, D), ("expert", "mlp", "embed"), spec.param_dtype)
        if m.bias_rate > 0:
            self.select_bias_X = param(rngs, nnx.initializers.zeros, (X,), (None,), jnp.float32, SelectionBias)
        if m.router == "expert_choice":
            self.predictor_DX = param(rngs, fan_in_init(D, 0.1), (D, X), ("embed", None), jnp.float32)
        self.shared = (MLP(D, m.d_shared or m.shared_experts * I, activation=spec.mlp, dtype=spec.dtype,
                           param_dtype=spec.param_dtype, alpha=self.alpha, limit=self.limit, rngs=rngs)
                       if m.shared_experts else None)
        if m.shared_gate:  # drawn last: the other parameters are those of the ungated layer
            self.shared_gate_D1 = param(rngs, fan_in_init(D), (D, 1), ("embed", None), spec.param_dtype)
        # GPT-OSS biases: zeros made without a key, so no other draw moves.
        if m.router_bias:
            self.router_b_X = named_param(jnp.zeros((X,), jnp.float32), (None,), Bias)
        if m.expert_bias:
            self.bi_XAI = named_param(jnp.zeros((X, A, I), spec.param_dtype), ("expert", None, "mlp"), Bias)
            self.bo_XD = named_param(jnp.zeros((X, D), spec.param_dtype), ("expert", "embed"), Bias)

    def active_params(self) -> float:
        """Parameters one position uses: the router, k experts (expert choice: on average
        ``capacity_factor`` of them), the shared experts (and their gate) and the selection
        predictor (sizes of stacked layers include their repeats)."""
        m = self.moe
        per_expert = (self.wi_XDAI.size + self.wo_XID.size) / m.num_experts
        if m.expert_bias:
            per_expert += (self.bi_XAI.size + self.bo_XD.size) / m.num_experts
        used = m.capacity_factor if m.router == "expert_choice" else m.top_k
        n = self.router_DX.size + used * per_expert
        if m.router_bias:
            n += self.router_b_X.size
        if m.router == "expert_choice":
            n += self.predictor_DX.size
        if self.shared is not None:
            n += sum(x.size for x in jax.tree.leaves(nnx.state(self.shared, nnx.Param)))
        if m.shared_gate:
            n += self.shared_gate_D1.size
        return n

    # -- experts on gathered rows -----------------------------------------------------------
    def _act(self, h_AI):
        return activate(h_AI, self.activation, alpha=self.alpha, limit=self.limit)

    def _biases(self):
        """``(bi [X, A, I], bo [X, D])`` in the compute dtype, or ``(None, None)`` without expert biases."""
        if not self.moe.expert_bias:
            return None, None
        return self.bi_XAI[...].astype(self.dtype), self.bo_XD[...].astype(self.dtype)

    def _experts_dense(self, x_OD):
        """Every expert on every row: ``[X, O, D]``."""
        bi, bo = self._biases()
        h = jnp.einsum("nd,xdai->xnai", x_OD, self.wi_XDAI[...].astype(self.dtype))
        if bi is not None:
            h = h + bi[:, None]
        X, O, A, I = h.shape
        h_XOI = self._act(h.reshape(X * O, A, I)).reshape(X, O, I)
        out = jnp.einsum("xni,xid->xnd", h_XOI, self.wo_XID[...].astype(self.dtype))
        return out if bo is None else out + bo[:, None]

    def _experts_grouped(self, x_OD, group_sizes_X, expert_O=None):
        """Rows sorted by expert (``group_sizes_X`` rows each; ``expert_O`` their experts, needed
        with expert biases): ``[O, D]`` through a grouped matmul."""
        X, D, A, I = self.wi_XDAI.shape
        bi, bo = self._biases()
        gmm = functools.partial(grouped_matmul, impl=self.moe.gmm_impl)
        h = gmm(x_OD, self.wi_XDAI[...].astype(self.dtype).reshape(X, D, A * I), group_sizes_X).reshape(-1, A, I)
        if bi is not None:
            h = h + bi[expert_O]
        out = gmm(self._act(h), self.wo_XID[...].astype(self.dtype), group_sizes_X)
        return out if bo is None else out + bo[expert_O]

    def _experts_buffers(self, buf_BXSD):
        """Per-expert buffers ``[B, X, S, D]`` -> outputs of the same shape."""
        bi, bo = self._biases()
        h = jnp.einsum("bxyd,xdai->bxyai", buf_BXSD, self.wi_XDAI[...].astype(self.dtype))
        if bi is not None:
            h = h + bi[None, :, None]
        B, X, S, A, I = h.shape
        h = self._act(h.reshape(B * X * S, A, I)).reshape(B, X, S, I)
        out = jnp.einsum("bxyi,xid->bxyd", h, self.wo_XID[...].astype(self.dtype))
        return out if bo is None else out + bo[None, :, None]

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, x_BTD):
        m = self.moe
        B, T, D = x_BTD.shape
        x_BTD = x_BTD.astype(self.dtype)
        logits_BTX = jnp.einsum("btd,dx->btx", x_BTD.astype(jnp.float32), self.router_DX[...])
        if m.router_bias:
            logits_BTX = logits_BTX + self.router_b_X[...]
        if m.router == "expert_choice":
            y_BTD, aux = self._expert_choice(x_BTD, logits_BTX)
        else:
            y_BTD, aux = self._token_choice(x_BTD, logits_BTX)
        if self.shared is not None:
            y_BTD = y_BTD + self._shared(x_BTD)
        aux["moe_z"] = (routing.z_loss(logits_BTX.reshape(B * T, -1)), m.z_weight)
        return constrain(y_BTD.astype(x_BTD.dtype), ("batch", None, None)), aux

    def _shared(self, x_BTD):
        """The shared experts' output, times ``sigmoid(x shared_gate_D1)`` (float32) when gated."""
        s_BTD = self.shared(x_BTD)
        if not self.moe.shared_gate:
            return s_BTD
        B, T, D = x_BTD.shape
        logit_O1 = x_BTD.reshape(B * T, D).astype(jnp.float32) @ self.shared_gate_D1[...].astype(jnp.float32)
        return (s_BTD.astype(jnp.float32) * jax.nn.sigmoid(logit_O1).reshape(B, T, 1)).astype(s_BTD.dtype)

    def _token_choice(self, x_BTD, logits_BTX):
        m = self.moe
        B, T, D = x_BTD.shape
        X, Z, O = m.num_experts, m.top_k, B * T
        bias = self.select_bias_X[...] if m.bias_rate > 0 else None
        idx_OZ, w_OZ, probs_OX = routing.token_choice(logits_BTX.reshape(O, X), Z, m.router_weights, bias)
        load_X = routing.expert_load(idx_OZ, X)
        x_OD = x_BTD.reshape(O, D)
        dropped = jnp.zeros((), jnp.float32)
        if m.impl == "dense":
            c_OX = jnp.zeros((O, X), jnp.float32).at[jnp.arange(O)[:, None], idx_OZ].add(w_OZ)
            y_OD = jnp.einsum("nx,xnd->nd", c_OX.astype(self.dtype), self._experts_dense(x_OD))
        elif m.impl == "capacity":
            y_OD, dropped = self._capacity(x_BTD, idx_OZ.reshape(B, T, Z), w_OZ.reshape(B, T, Z))
        else:
            y_OD = self._dropless(x_OD, idx_OZ, w_OZ)
        aux = {
            "moe_balance": (routing.balance_loss(probs_OX, idx_OZ), m.balance_weight),
            "moe_load": (load_X, None),
            "moe_load_max_over_mean": (jnp.max(load_X) * X, None),
            "moe_dropped": (dropped, None),
            "moe_entropy": (routing.entropy(probs_OX), None),
        }
        if bias is not None:
            step = jax.lax.stop_gradient(m.bias_rate * routing.bias_update_direction(load_X))
            aux["moe_bias"] = (jnp.sum((self.select_bias_X[...] - jax.lax.stop_gradient(self.select_bias_X[...])) * step), 1.0)
        return y_OD.reshape(B, T, D), aux

    def _dropless(self, x_OD, idx_OZ, w_OZ):
        axes = _expert_parallel_axes(self.moe.num_experts, x_OD.shape[0])
        if axes:
            return self._dropless_expert_parallel(x_OD, idx_OZ, w_OZ, axes)
        O, Z = idx_OZ.shape
        X = self.moe.num_experts
        assigned_expert = idx_OZ.reshape(-1)
        order = jnp.argsort(assigned_expert, stable=True)
        row_token = (jnp.arange(O * Z) // Z)[order]
        group_sizes_X = jnp.zeros((X,), jnp.int32).at[assigned_expert].add(1)
        out_rows = self._experts_grouped(x_OD[row_token], group_sizes_X, assigned_expert[order])
        out_rows = out_rows * w_OZ.reshape(-1)[order][:, None].astype(out_rows.dtype)
        return jnp.zeros_like(x_OD).at[row_token].add(out_rows)

    def _dropless_expert_parallel(self, x_OD, idx_OZ, w_OZ, axes):
        """Dropless dispatch with the experts split over the ``axes`` mesh axes (E_p shards of
        X / E_p experts): inside ``shard_map`` each device sorts its tokens' assignments by
        destination shard, one ``all_to_all`` sends them (padded to a static ``n k`` rows per
        destination, so nothing can overflow), the shard runs a grouped matmul over its own
        experts only (padding rows belong to no group and are skipped), and a second
        ``all_to_all`` returns the outputs. Expert weights enter sharded over ``axes`` alone:
        fsdp / tensor shards are gathered at the boundary, like any FSDP layer."""
        from jax.sharding import PartitionSpec as P

        from glocal.sharding import BATCH_AXES

        mesh = jax.sharding.get_abstract_mesh()
        E_p = math.prod(mesh.shape[a] for a in axes)
        X, D = self.moe.num_experts, x_OD.shape[1]
        XL = X // E_p  # experts per shard
        _, _, A, I = self.wi_XDAI.shape
        wi = self.wi_XDAI[...].astype(self.dtype).reshape(X, D, A * I)
        wo = self.wo_XID[...].astype(self.dtype)
        biases = tuple(b for b in self._biases() if b is not None)  # (bi, bo) with expert biases
        gmm = functools.partial(grouped_matmul, impl=self.moe.gmm_impl)
        exchange = functools.partial(jax.lax.all_to_all, axis_name=axes, split_axis=0, concat_axis=0)

        def local(x, idx, w, wi, wo, *biases):
            n, Z = idx.shape
            O = n * Z
            expert = idx.reshape(-1)
            order = jnp.argsort(expert, stable=True)
            expert, token, weight = expert[order], (jnp.arange(O) // Z)[order], w.reshape(-1)[order]
            dest = expert // XL
            counts = jnp.zeros((E_p,), jnp.int32).at[dest].add(1)
            rank = jnp.arange(O) - (jnp.cumsum(counts) - counts)[dest]
            send_x = jnp.zeros((E_p, O, D), x.dtype).at[dest, rank].set(x[token])
            send_e = jnp.full((E_p, O), XL, jnp.int32).at[dest, rank].set(expert % XL)  # XL: padding
            recv_x, recv_e = exchange(send_x), exchange(send_e)
            flat_e = recv_e.reshape(-1)
            order2 = jnp.argsort(flat_e, stable=True)  # padding (XL) sorts last: past every group
            sizes = jnp.zeros((XL,), jnp.int32).at[flat_e].add(1, mode="drop")
            h = gmm(recv_x.reshape(-1, D)[order2], wi, sizes).reshape(-1, A, I)
            row_e = jnp.minimum(flat_e[order2], XL - 1)  # (padding rows: any expert; never read back)
            if biases:
                h = h + biases[0][row_e]
            out = gmm(self._act(h), wo, sizes)
            if biases:
                out = out + biases[1][row_e]
            back = exchange(jnp.zeros_like(out).at[order2].set(out).reshape(E_p, O, D))
            y = back[dest, rank] * weight[:, None].astype(back.dtype)
            return jnp.zeros_like(x).at[token].add(y)

        rows = P(BATCH_AXES, None)
        bias_specs = (P(axes, None, None), P(axes, None)) if biases else ()
        return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, P(axes, None, None), P(axes, None, None),
                                                         *bias_specs),
                             out_specs=rows)(x_OD, idx_OZ, w_OZ, wi, wo, *biases)

    def _capacity(self, x_BTD, idx_BTZ, w_BTZ):
        m = self.moe
        B, T, D = x_BTD.shape
        X, Z = m.num_experts, m.top_k
        S = routing.capacity(T, Z, X, m.capacity_factor)
        slot_BTZ, keep_BTZ = routing.capacity_slots(idx_BTZ, X, S)
        slot_BTZ = jnp.where(keep_BTZ, slot_BTZ, S)  # dropped assignments land in a spare slot
        b = jnp.arange(B)[:, None, None]
        buf = jnp.zeros((B, X, S + 1, D), x_BTD.dtype).at[b, idx_BTZ, slot_BTZ].set(
            jnp.broadcast_to(x_BTD[:, :, None], (B, T, Z, D)))
        out_BXSD = self._experts_buffers(buf[:, :, :S])
        out_BXSD = jnp.pad(out_BXSD, ((0, 0), (0, 0), (0, 1), (0, 0)))  # the spare slot reads zeros
        y_BTZD = out_BXSD[b, idx_BTZ, slot_BTZ] * (w_BTZ * keep_BTZ)[..., None].astype(out_BXSD.dtype)
        return y_BTZD.sum(2).reshape(B * T, D), 1.0 - jnp.mean(keep_BTZ.astype(jnp.float32))

    def _expert_choice(self, x_BTD, logits_BTX):
        m = self.moe
        B, T, D = x_BTD.shape
        X = m.num_experts
        probs_BTX = jax.nn.softmax(logits_BTX, axis=-1)
        # The causal predictor reads detached activations: it learns the membership without
        # pulling the trunk toward being easy to predict.
        pred_BTX = jnp.einsum("btd,dx->btx", jax.lax.stop_gradient(x_BTD).astype(jnp.float32), self.predictor_DX[...])
        aux = {"moe_entropy": (routing.entropy(probs_BTX.reshape(B * T, X)), None)}
        if m.routing_mode == "threshold":
            # Causal: a token goes to every expert whose predictor fires (possibly none).
            c_BTX = probs_BTX * (pred_BTX > 0)
            y = jnp.einsum("nx,xnd->nd", c_BTX.reshape(B * T, X).astype(self.dtype),
                           self._experts_dense(x_BTD.reshape(B * T, D)))
            load_X = jnp.sum(c_BTX > 0, axis=(0, 1)) / jnp.maximum(jnp.sum(c_BTX > 0), 1)
            aux.update(moe_load=(load_X.astype(jnp.float32), None),
                       moe_load_max_over_mean=(jnp.max(load_X) * X, None))
            return y.reshape(B, T, D), aux
        S = min(T, routing.capacity(T, 1, X, m.capacity_factor))
        tok_BXS, gate_BXS, member_BTX = routing.expert_choice(logits_BTX, S)
        b = jnp.arange(B)[:, None, None]
        out_BXSD = self._experts_buffers(x_BTD[b, tok_BXS])
        out_BXSD = out_BXSD * gate_BXS[..., None].astype(out_BXSD.dtype)
        y_BTD = jnp.zeros_like(x_BTD).at[b, tok_BXS].add(out_BXSD)
        aux.update(
            moe_predictor=(routing.predictor_loss(pred_BTX, member_BTX), m.predictor_weight),
            moe_predictor_agreement=(jnp.mean(((pred_BTX > 0) == (member_BTX > 0)).astype(jnp.float32)), None),
            moe_load=(jnp.full((X,), 1.0 / X, jnp.float32), None),
            moe_load_max_over_mean=(jnp.ones((), jnp.float32), None),
        )
        return y_BTD, aux
