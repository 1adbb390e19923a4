"""Embeddings, positional encodings, normalization and the position-wise feed-forward network.

Shape letters used across the model (one glossary): B batch, S source length, T target length,
L either length, D d_model, H query heads, G key/value heads, R = H / G query heads per group,
K head dim (d_k = d_v), F d_ff, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.model import quant

Array = jax.Array

# Logical names of activation axes; mesh names for them live only in transformer_jax/sharding.py.
ACT_BLD = ("activation_batch", "activation_length", "activation_embed")
ACT_BLF = ("activation_batch", "activation_length", "activation_mlp")

# Collections a layer reports into with Module.sow while training: losses the training step
# adds to its loss, and counts it sums for the logs. reported_sums() totals each name.
AUX_LOSS = "aux_loss"
COUNTS = "counts"
REPORTED = (AUX_LOSS, COUNTS)


def reported_sums(collection: Any) -> dict[str, Array]:
    """Each name sown into one collection, summed over the layers that sowed it."""
    totals: dict[str, Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
        keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
        # run_layers names an nn.scan stack "layers": its values carry a leading layer axis.
        value = jnp.sum(leaf, axis=0) if "layers" in keys[:-1] else leaf
        name = keys[-1]
        totals[name] = totals[name] + value if name in totals else value
    return totals


def dtype_of(name: str) -> Any:
    """The jnp dtype for a config dtype name."""
    return jnp.dtype(name)


def sinusoidal_encoding(positions_BxL: Array, d_model: int) -> Array:
    """The paper's PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...), float32.

    Computed from explicit position ids (not a table slice) so packed rows restart at 0.
    """
    half = d_model // 2
    inv_freq_I = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float32) * 2.0 / d_model)
    angles_BxLxI = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_I
    # Interleave sin/cos on even/odd channels exactly as section 3.5 writes it.
    pe_BxLxIx2 = jnp.stack([jnp.sin(angles_BxLxI), jnp.cos(angles_BxLxI)], axis=-1)
    pe_BxLxD = pe_BxLxIx2.reshape(*angles_BxLxI.shape[:-1], 2 * half)
    if d_model % 2:
        pe_BxLxD = jnp.pad(pe_BxLxD, [(0, 0)] * (pe_BxLxD.ndim - 1) + [(0, 1)])
    return pe_BxLxD


class Embed(nn.Module):
    """A token embedding that can also project back to vocabulary logits (weight tying)."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        # Std D^-0.5 so that the sqrt(D)-scaled input (section 3.4) has unit variance.
        init = nn.initializers.normal(stddev=cfg.d_model**-0.5)
        # int8: one scale per row (per token for the lookup, per output channel for attend).
        self.embedding = quant.weight(
            self, "embedding", init, ("vocab", "embed"), (cfg.vocab_size, cfg.d_model), (1,)
        )

    def _gathered_table(self) -> quant.Weight:
        """The table (float: in the compute dtype), whole along embed (FSDP all-gathers it here).

        Left sharded along embed, the lookup's output would be split along d_model on the same
        mesh axis that splits the batch, and XLA would replicate the activations to fix it.
        """
        if isinstance(self.embedding, quant.Int8Array):
            return quant.Int8Array(
                nn.with_logical_constraint(self.embedding.values, ("vocab", None)),
                self.embedding.scale,
            )
        table_VxD = jnp.asarray(self.embedding, dtype_of(self.config.dtype))
        return nn.with_logical_constraint(table_VxD, ("vocab", None))

    def __call__(self, ids_BxL: Array) -> Array:
        """Look up ids and multiply by sqrt(d_model) (section 3.4), in the compute dtype."""
        cfg = self.config
        table = self._gathered_table()
        if isinstance(table, quant.Int8Array):
            rows = quant.Int8Array(
                jnp.take(table.values, ids_BxL, axis=0), jnp.take(table.scale, ids_BxL, axis=0)
            )
            x_BxLxD = rows.dequantized(dtype_of(cfg.dtype))
        else:
            x_BxLxD = jnp.take(table, ids_BxL, axis=0)
        return x_BxLxD * jnp.asarray(np.sqrt(cfg.d_model), x_BxLxD.dtype)

    def attend(self, y_BxTxD: Array) -> Array:
        """Pre-softmax projection with the shared matrix; float32 logits."""
        table = self._gathered_table()
        if isinstance(table, quant.Int8Array):
            return quant.product("BTD,VD->BTV", y_BxTxD, table, jnp.float32)
        return jnp.einsum("BTD,VD->BTV", y_BxTxD, table, preferred_element_type=jnp.float32).astype(
            jnp.float32
        )


class PositionEmbedding(nn.Module):
    """Adds position information to token embeddings: sinusoidal (paper) or learned (Table 3 E).

    rope and alibi act inside attention (model/positions.py) and none adds nothing: for those
    the embeddings pass through unchanged.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, positions_BxL: Array) -> Array:
        """x + PE(positions)."""
        cfg = self.config
        if cfg.position_encoding not in ("sinusoidal", "learned"):
            return x_BxLxD
        if cfg.position_encoding == "sinusoidal":
            pe_BxLxD = sinusoidal_encoding(positions_BxL, cfg.d_model)
        else:
            table_LxD = self.param(
                "position_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (cfg.max_len, cfg.d_model),
                dtype_of(cfg.param_dtype),
            )
            pe_BxLxD = jnp.take(jnp.asarray(table_LxD), positions_BxL, axis=0)
        return x_BxLxD + pe_BxLxD.astype(x_BxLxD.dtype)


class Norm(nn.Module):
    """LayerNorm (paper) or RMSNorm, with float32 statistics."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        """Normalize over the model dimension."""
        cfg = self.config
        common: dict[str, Any] = {
            "epsilon": cfg.layer_norm_epsilon,
            "dtype": dtype_of(cfg.dtype),
            "param_dtype": dtype_of(cfg.param_dtype),
            "scale_init": nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        }
        if cfg.norm_type == "rmsnorm":
            return nn.RMSNorm(name="rms_norm", **common)(x_BxLxD)
        return nn.LayerNorm(
            name="layer_norm",
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            **common,
        )(x_BxLxD)


def dense_init() -> nn.initializers.Initializer:
    """Glorot-uniform, as tensor2tensor initializes every projection."""
    return nn.initializers.xavier_uniform()


class Dense(nn.Module):
    """x W + b over the last axis (flax's nn.Dense, same parameters), int8 when configured."""

    config: ModelConfig
    features: int
    axes: tuple[str, str]  # the kernel's logical axes (in, out)
    kernel_init: nn.initializers.Initializer = dense_init()
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Project the last axis of x to `features`, in the compute dtype."""
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        shape = (x.shape[-1], self.features)
        kernel = quant.weight(self, "kernel", self.kernel_init, self.axes, shape, (0,))
        if isinstance(kernel, quant.Int8Array):
            batch = "ABCEGHIJ"[: x.ndim - 1]
            y = quant.product(f"{batch}D,DF->{batch}F", x, kernel, dtype)
        else:
            # nn.Dense's own product, so float models compute what they computed before.
            y = jax.lax.dot_general(
                x.astype(dtype), jnp.asarray(kernel, dtype), (((x.ndim - 1,), (0,)), ((), ()))
            )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,),
                dtype_of(cfg.param_dtype),
            )
            y = y + jnp.asarray(bias, dtype)
        return y


def activate(kind: str, h: Array, gate: Array | None) -> Array:
    """The FFN nonlinearity: relu, gelu, swish, or swiglu (silu(gate) * h)."""
    if kind == "relu":
        return nn.relu(h)
    if kind == "gelu":
        return nn.gelu(h)
    if kind == "swish":
        return nn.silu(h)
    assert gate is not None, "swiglu needs its gate projection"
    return nn.silu(gate) * h


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (section 3.3); GELU, swish and SwiGLU as switches."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: Array, valid_BxL: Array | None = None, *, deterministic: bool
    ) -> Array:
        """Apply the two projections with the activation between them.

        valid_BxL is the mixture-of-experts layer's (which routes real tokens only); every
        position goes through the dense FFN.
        """
        cfg = self.config
        up = ("embed", "mlp")
        h_BxLxF = Dense(cfg, cfg.d_ff, up, use_bias=cfg.use_bias, name="wi")(x_BxLxD)
        gate_BxLxF = None
        if cfg.feed_forward == "swiglu":
            gate_BxLxF = Dense(cfg, cfg.d_ff, up, use_bias=cfg.use_bias, name="wi_gate")(x_BxLxD)
        h_BxLxF = activate(cfg.feed_forward, h_BxLxF, gate_BxLxF)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ACT_BLF)
        h_BxLxF = nn.Dropout(cfg.relu_dropout_rate)(h_BxLxF, deterministic=deterministic)
        down = ("mlp", "embed")
        return Dense(cfg, cfg.d_model, down, use_bias=cfg.use_bias, name="wo")(h_BxLxF)
