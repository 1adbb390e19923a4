"""Mixture-of-experts feed-forward layers (GShard, Switch Transformer, ST-MoE).

Routing, in float32 whatever the compute dtype: probabilities = softmax(x W_router) over the
E experts; each real token picks the k experts with the highest probability (ties: the lower
index). Gates: with k = 1 the chosen probability itself (Switch); with k >= 2 the chosen
probabilities renormalized to sum to 1 (GShard's top-2 rule; the second expert is always used,
GShard's random second-expert dispatch is not applied). Padding tokens are never routed.

Capacity (dispatch "einsum"): a group is one row of the batch, and each expert has
C = min(L, ceil(k x L x capacity_factor / E)) slots per row of L tokens. In the encoder,
slots go first to every token's first choice in row order, then to every token's second
choice, and so on (GShard). In the decoder they go token by token in row order (token t's
choices, best first, before token t + 1's), so whether a choice is dropped depends only on
the tokens before it: teacher-forced training stays causal. A choice whose expert is already
full is dropped: the token gets nothing from that expert (its
other choices still count, with their gates unchanged); a token with every choice dropped
gets 0 from the layer and the residual connection carries it. Dropped choices are counted in
the `counts` collection (and in the training logs).

Dropless (dispatch "ragged"): the tokens' choices are sorted by expert and the two expert
matmuls run as grouped matmuls (jax.lax.ragged_dot) over exactly the tokens each expert got.
Nothing is dropped, and the result equals the einsum dispatch whenever that drops nothing.

Auxiliary losses, already multiplied by their config coefficients, are sown into the
`aux_loss` collection; the training step adds whatever that collection holds (summed over
layers) to the loss. Load balancing (Switch eq. 4): E x sum_e f_e P_e, where f_e is the fraction
of real tokens whose first choice is e and P_e the mean router probability of e (1 under
uniform routing). Router z-loss (ST-MoE eq. 5): the mean over real tokens of
logsumexp(router logits)^2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from transformer_jax.config import ModelConfig
from transformer_jax.model import quant
from transformer_jax.model.layers import ACT_BLD, AUX_LOSS, COUNTS, activate, dtype_of

Array = jax.Array

# Dispatched activations [E experts, B rows, C slots, D or F]: experts over the 'expert' mesh
# axis, rows over the remaining row axes (the move from ACT_BLD is the all-to-all).
ACT_EBCD = ("activation_exp", "activation_batch_no_exp", None, "activation_embed")
ACT_EBCF = ("activation_exp", "activation_batch_no_exp", None, "activation_mlp")
# The same buffers while still with their rows' devices (every expert, rows split as ACT_BLD).
ACT_EBCD_ROWS = (None, "activation_batch", None, "activation_embed")


class Routes(NamedTuple):
    """Each token's k choices: expert, gate, buffer slot, and whether the choice is served."""

    expert_BxLxK: Array  # int32 expert index
    gate_BxLxK: Array  # float32 combine weight
    slot_BxLxK: Array  # int32 position in the expert's row buffer (-1: not routed)
    kept_BxLxK: Array  # bool: a real token's choice within the expert's capacity


def capacity(length: int, k: int, experts: int, factor: float) -> int:
    """Slots per expert for a row of `length` tokens: ceil(k L factor / E), within [1, L]."""
    return max(1, min(length, math.ceil(k * length * factor / experts)))


def route(
    logits_BxLxE: Array, valid_BxL: Array, k: int, slots: int, causal: bool = False
) -> tuple[Routes, dict[str, Array], dict[str, Array]]:
    """Top-k routing with per-row capacity; (routes, unweighted aux losses, routing counts).

    Slots go by choice rank, then row order (GShard), or with causal=True (the decoder) by
    row order, then choice rank, so that no token's drops depend on the tokens after it.
    """
    logits_BxLxE = logits_BxLxE.astype(jnp.float32)
    batch, length, experts = logits_BxLxE.shape
    probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
    top_BxLxK, expert_BxLxK = jax.lax.top_k(probs_BxLxE, k)
    gate_BxLxK = top_BxLxK if k == 1 else top_BxLxK / jnp.sum(top_BxLxK, -1, keepdims=True)
    real_BxL = valid_BxL.astype(jnp.int32)
    chosen_BxLxKxE = jax.nn.one_hot(expert_BxLxK, experts, dtype=jnp.int32)
    chosen_BxLxKxE = chosen_BxLxKxE * real_BxL[:, :, None, None]
    # Slots in priority order: the running count of earlier claims on the same expert.
    if causal:
        ordered_BxLKxE = chosen_BxLxKxE.reshape(batch, length * k, experts)
    else:
        ordered_BxLKxE = chosen_BxLxKxE.transpose(0, 2, 1, 3).reshape(batch, k * length, experts)
    taken_BxLKxE = jnp.cumsum(ordered_BxLKxE, axis=1)
    slot_BxLK = jnp.sum(taken_BxLKxE * ordered_BxLKxE, axis=-1) - 1
    if causal:
        slot_BxLxK = slot_BxLK.reshape(batch, length, k)
    else:
        slot_BxLxK = slot_BxLK.reshape(batch, k, length).transpose(0, 2, 1)
    routed_BxLxK = jnp.broadcast_to(valid_BxL[:, :, None], slot_BxLxK.shape)
    kept_BxLxK = routed_BxLxK & (slot_BxLxK < slots)

    real = jnp.maximum(jnp.sum(real_BxL), 1).astype(jnp.float32)
    real_BxLx1 = real_BxL[:, :, None].astype(jnp.float32)
    mean_prob_E = jnp.sum(probs_BxLxE * real_BxLx1, axis=(0, 1)) / real
    first_choice_E = jnp.sum(chosen_BxLxKxE[:, :, 0, :], axis=(0, 1)) / real
    z_BxL = jax.nn.logsumexp(logits_BxLxE, axis=-1)
    losses = {
        "load_balance": experts * jnp.sum(first_choice_E * mean_prob_E),
        "router_z": jnp.sum(jnp.square(z_BxL) * real_BxL) / real,
    }
    routed = jnp.sum(routed_BxLxK).astype(jnp.float32)
    counts = {
        "expert_load": jnp.sum(chosen_BxLxKxE, axis=(0, 1, 2)).astype(jnp.float32),
        "routed": routed,
        "dropped": routed - jnp.sum(kept_BxLxK).astype(jnp.float32),
    }
    routes = Routes(expert_BxLxK.astype(jnp.int32), gate_BxLxK, slot_BxLxK, kept_BxLxK)
    return routes, losses, counts


class MoEFeedForward(nn.Module):
    """E expert FFNs and a float32 router in place of one FFN (see the module docstring).

    causal: the decoder's layer; capacity slots then go in row order (see route()).
    """

    config: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(
        self, x_BxLxD: Array, valid_BxL: Array | None = None, *, deterministic: bool
    ) -> Array:
        """Route each real token to its k experts and sum their outputs weighted by the gates."""
        cfg = self.config
        experts, k = cfg.moe_num_experts, cfg.moe_experts_per_token
        d, f = cfg.d_model, cfg.expert_d_ff
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        if valid_BxL is None:
            valid_BxL = jnp.ones(x_BxLxD.shape[:2], bool)
        # Switch's router initialization: a small truncated normal (scale 0.1, fan-in).
        router_init = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
        router_DxE = self.param(
            "router",
            nn.with_logical_partitioning(router_init, ("embed", None)),
            (d, experts),
            jnp.float32,  # routing is float32 whatever param_dtype is
        )
        logits_BxLxE = jnp.einsum(
            "BLD,DE->BLE",
            x_BxLxD.astype(jnp.float32),
            jnp.asarray(router_DxE, jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        factor = cfg.moe_eval_capacity_factor if deterministic else cfg.moe_capacity_factor
        slots = capacity(x_BxLxD.shape[1], k, experts, factor)
        routes, losses, counts = route(logits_BxLxE, valid_BxL, k, slots, self.causal)
        if cfg.moe_dispatch == "ragged":
            # Dropless: every routed choice is served.
            counts["dropped"] = jnp.zeros_like(counts["dropped"])
        self.sow(AUX_LOSS, "moe_load_balance", cfg.moe_load_balance_loss * losses["load_balance"])
        self.sow(AUX_LOSS, "moe_router_z", cfg.moe_router_z_loss * losses["router_z"])
        for name, value in counts.items():
            self.sow(COUNTS, f"moe_{name}", value)

        weights = self._expert_weights(experts, d, f, param_dtype)
        weights = {
            name: w if isinstance(w, quant.Int8Array) else jnp.asarray(w, dtype)
            for name, w in weights.items()
        }
        if cfg.moe_dispatch == "ragged":
            y_BxLxD = self._ragged(x_BxLxD, valid_BxL, routes, weights)
        else:
            y_BxLxD = self._einsum(x_BxLxD, routes, slots, weights, deterministic)
        return nn.with_logical_constraint(y_BxLxD, ACT_BLD)

    def _expert_weights(self, experts: int, d: int, f: int, param_dtype: Any) -> dict[str, Any]:
        cfg = self.config
        # Glorot-uniform per expert, as the dense FFN (fans from the last two axes).
        init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))

        def param(name: str, initializer: Any, axes: tuple[str, ...], shape: tuple[int, ...]):
            return self.param(
                name, nn.with_logical_partitioning(initializer, axes), shape, param_dtype
            )

        def matrix(name: str, axes: tuple[str, ...], shape: tuple[int, ...]) -> quant.Weight:
            # int8: one scale per expert and output channel (axis 1 is the contracted one).
            return quant.weight(self, name, init, axes, shape, (1,))

        weights: dict[str, Any] = {
            "wi": matrix("wi", ("exp", "embed", "mlp"), (experts, d, f)),
            "wo": matrix("wo", ("exp", "mlp", "embed"), (experts, f, d)),
        }
        if cfg.expert_feed_forward == "swiglu":
            weights["wi_gate"] = matrix("wi_gate", ("exp", "embed", "mlp"), (experts, d, f))
        if cfg.use_bias:
            zeros = nn.initializers.zeros
            weights["wi_bias"] = param("wi_bias", zeros, ("exp", "mlp"), (experts, f))
            weights["wo_bias"] = param("wo_bias", zeros, ("exp", "embed"), (experts, d))
            if "wi_gate" in weights:
                weights["wi_gate_bias"] = param("wi_gate_bias", zeros, ("exp", "mlp"), (experts, f))
        return weights

    def _einsum(
        self,
        x_BxLxD: Array,
        routes: Routes,
        slots: int,
        w: dict[str, Array],
        deterministic: bool,
    ) -> Array:
        """GShard dispatch: one-hot [B, L, E, C] tensors move tokens into fixed-size buffers."""
        cfg = self.config
        dtype = x_BxLxD.dtype
        experts = cfg.moe_num_experts
        kept_BxLxK = routes.kept_BxLxK
        expert_BxLxKxE = jax.nn.one_hot(routes.expert_BxLxK, experts, dtype=jnp.float32)
        # A dropped choice's slot is past the buffer: one_hot gives it an all-zero row.
        slot_BxLxKxC = jax.nn.one_hot(
            jnp.where(kept_BxLxK, routes.slot_BxLxK, slots), slots, dtype=jnp.float32
        )
        dispatch_BxLxExC = jnp.einsum("BLKE,BLKC->BLEC", expert_BxLxKxE, slot_BxLxKxC)
        combine_BxLxExC = jnp.einsum(
            "BLKE,BLKC->BLEC", expert_BxLxKxE * routes.gate_BxLxK[..., None], slot_BxLxKxC
        )
        x_ExBxCxD = jnp.einsum("BLEC,BLD->EBCD", dispatch_BxLxExC.astype(dtype), x_BxLxD)
        # Filled where the rows are, then moved to the experts' devices: the two constraints
        # make the move one all-to-all (left to itself, XLA all-gathers the tokens instead).
        x_ExBxCxD = nn.with_logical_constraint(x_ExBxCxD, ACT_EBCD_ROWS)
        x_ExBxCxD = nn.with_logical_constraint(x_ExBxCxD, ACT_EBCD)

        def bias(name: str) -> Array:
            return w[name][:, None, None, :] if name in w else jnp.zeros((), dtype)

        h_ExBxCxF = quant.product("EBCD,EDF->EBCF", x_ExBxCxD, w["wi"], dtype) + bias("wi_bias")
        gate_ExBxCxF = None
        if "wi_gate" in w:
            gate_ExBxCxF = quant.product("EBCD,EDF->EBCF", x_ExBxCxD, w["wi_gate"], dtype)
            gate_ExBxCxF = gate_ExBxCxF + bias("wi_gate_bias")
        h_ExBxCxF = activate(cfg.expert_feed_forward, h_ExBxCxF, gate_ExBxCxF)
        h_ExBxCxF = nn.with_logical_constraint(h_ExBxCxF, ACT_EBCF)
        h_ExBxCxF = nn.Dropout(cfg.relu_dropout_rate)(h_ExBxCxF, deterministic=deterministic)
        y_ExBxCxD = quant.product("EBCF,EFD->EBCD", h_ExBxCxF, w["wo"], dtype) + bias("wo_bias")
        y_ExBxCxD = nn.with_logical_constraint(y_ExBxCxD, ACT_EBCD)
        y_ExBxCxD = nn.with_logical_constraint(y_ExBxCxD, ACT_EBCD_ROWS)  # back: all-to-all
        return jnp.einsum("BLEC,EBCD->BLD", combine_BxLxExC.astype(dtype), y_ExBxCxD)

    def _ragged(
        self,
        x_BxLxD: Array,
        valid_BxL: Array,
        routes: Routes,
        w: dict[str, Array],
    ) -> Array:
        """Dropless: choices sorted by expert, grouped matmuls through jax.lax.ragged_dot.

        Under a mesh each device sorts its own rows (shard_map over the row axes) with every
        expert's weights gathered: a global sort would gather the whole batch on every device.
        """
        experts, k = self.config.moe_num_experts, self.config.moe_experts_per_token
        kind = self.config.expert_feed_forward
        names = sorted(w)

        def local(
            x_BxLxD: Array, valid_BxL: Array, expert_BxLxK: Array, gate_BxLxK: Array, *weights
        ) -> Array:
            wl = dict(zip(names, weights, strict=True))
            batch, length, d = x_BxLxD.shape
            expert_M = expert_BxLxK.reshape(-1)  # M = B x L x k choices, token-major
            routed_M = jnp.repeat(valid_BxL.reshape(-1), k)
            # Padding's choices sort last, past every group: no expert computes them.
            key_M = jnp.where(routed_M, expert_M, experts)
            order_M = jnp.argsort(key_M, stable=True)
            token_M = order_M // k
            sorted_routed_M = routed_M[order_M]
            group_sizes_E = jnp.sum(jax.nn.one_hot(key_M, experts, dtype=jnp.int32), axis=0)
            sorted_expert_M = jnp.minimum(key_M[order_M], experts - 1)
            x_NxD = x_BxLxD.reshape(batch * length, d)
            x_MxD = jnp.take(x_NxD, token_M, axis=0)

            def grouped(lhs: Array, name: str) -> Array:
                out = _ragged_product(lhs, wl[name], group_sizes_E, sorted_expert_M)
                if f"{name}_bias" in wl:
                    out = out + jnp.take(wl[f"{name}_bias"], sorted_expert_M, axis=0)
                # Rows past the groups (padding) are left to the backend: zero them here.
                return jnp.where(sorted_routed_M[:, None], out, 0)

            h_MxF = grouped(x_MxD, "wi")
            gate_MxF = grouped(x_MxD, "wi_gate") if "wi_gate" in wl else None
            y_MxD = grouped(activate(kind, h_MxF, gate_MxF), "wo")
            gate_M = jnp.where(sorted_routed_M, gate_BxLxK.reshape(-1)[order_M], 0.0)
            weighted_MxD = y_MxD * gate_M[:, None].astype(y_MxD.dtype)
            y_NxD = jnp.zeros_like(x_NxD).at[token_M].add(weighted_MxD)
            return y_NxD.reshape(batch, length, d)

        args = (x_BxLxD, valid_BxL, routes.expert_BxLxK, routes.gate_BxLxK)
        weights = [w[name] for name in names]
        mesh = jax.sharding.get_abstract_mesh()
        spec = None if mesh.empty or mesh.size == 1 else nn.logical_to_mesh_axes(ACT_BLD)
        axes = None if spec is None else spec[0]
        row_axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(mesh.shape[axis] for axis in row_axes)
        # One row per device at least (initialization traces a single row): else whole.
        if shards == 1 or x_BxLxD.shape[0] % shards:
            return local(*args, *weights)
        rows = P(axes)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(rows,) * len(args) + (P(),) * len(weights),
            out_specs=rows,
            check_vma=False,
        )(*args, *weights)


def _ragged_product(
    lhs_MxD: Array, w: quant.Weight, group_sizes_E: Array, expert_M: Array
) -> Array:
    """jax.lax.ragged_dot; an Int8Array multiplies in int8 with int32 sums (model/quant.py)."""
    if not isinstance(w, quant.Int8Array):
        return jax.lax.ragged_dot(lhs_MxD, w, group_sizes_E)
    lhs_q, lhs_scale_Mx1 = quant.quantize_rows(lhs_MxD, [1])
    out = jax.lax.ragged_dot(lhs_q, w.values, group_sizes_E, preferred_element_type=jnp.int32)
    # Each row's expert's channel scales ([E, 1, F] -> that row's [F]).
    scale_MxF = jnp.take(w.scale[:, 0, :], expert_M, axis=0)
    return (out.astype(jnp.float32) * lhs_scale_Mx1 * scale_MxF).astype(lhs_MxD.dtype)


def routing_summary(counts: Mapping[str, Any]) -> dict[str, float]:
    """Dropped fraction and per-expert load (1.0 = an even share) from summed routing counts."""
    if "moe_routed" not in counts:
        return {}
    load_E = np.asarray(counts["moe_expert_load"], np.float64)
    share_E = load_E / max(load_E.sum(), 1.0) * len(load_E)
    summary = {
        "moe/dropped_fraction": float(counts["moe_dropped"])
        / max(float(counts["moe_routed"]), 1.0),
        "moe/max_load": float(share_E.max()),
    }
    summary.update({f"moe/load/expert_{e}": float(v) for e, v in enumerate(share_E)})
    return summary


def active_parameters(config: ModelConfig, params: Mapping[str, Any]) -> int:
    """Parameters one token uses: all of them less the (E - k) / E unchosen share of experts."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
        size = int(np.prod(leaf.shape))
        if "moe" in keys and keys[-1] != "router":
            size = size * config.moe_experts_per_token // config.moe_num_experts
        total += size
    return total
