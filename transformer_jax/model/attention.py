"""Scaled dot-product and multi-head attention (section 3.2), with masks and a KV cache."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.model.layers import dtype_of

Array = jax.Array

ACT_BLHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

# The decoding cache's leaves that hold one row per decoded sequence: the self-attention keys and
# values appended step by step. Everything else in the cache is shared by the rows that decode
# the same source (the cross-attention memory, projected once) or is a step counter, so a beam
# search that reorders its hypotheses gathers these leaves only.
CACHED_KEY, CACHED_VALUE = "cached_key", "cached_value"
PER_ROW_CACHE = frozenset({CACHED_KEY, CACHED_VALUE})


def make_attention_mask(
    q_valid_BxT: Array,
    k_valid_BxS: Array,
    q_segment_BxT: Array | None = None,
    k_segment_BxS: Array | None = None,
    causal: bool = False,
) -> Array:
    """Boolean [B, 1, T, S] mask: both positions real, same packed segment, and causal if asked."""
    mask_BxTxS = q_valid_BxT[:, :, None] & k_valid_BxS[:, None, :]
    if q_segment_BxT is not None and k_segment_BxS is not None:
        mask_BxTxS &= q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :]
    if causal:
        T, S = q_valid_BxT.shape[1], k_valid_BxS.shape[1]
        # Row index comparison is right for packed rows too: segments are contiguous.
        mask_BxTxS &= jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
    return mask_BxTxS[:, None, :, :]


def einsum_attention(
    query_BxTxHxK: Array,
    key_BxSxGxK: Array,
    value_BxSxGxK: Array,
    mask_Bx1xTxS: Array | None,
    *,
    dropout_fn: Any = None,
) -> tuple[Array, Array]:
    """softmax(Q K^T / sqrt(d_k)) V, spelled out; returns (output, probabilities [B,H,T,S])."""
    B, T, H, K = query_BxTxHxK.shape
    G = key_BxSxGxK.shape[2]
    R = H // G
    # Scale the query, not the scores, so the product stays in range in bfloat16.
    query_BxTxHxK = query_BxTxHxK * jnp.asarray(1.0 / np.sqrt(K), query_BxTxHxK.dtype)
    query_BxTxGxRxK = query_BxTxHxK.reshape(B, T, G, R, K)
    scores_BxGxRxTxS = jnp.einsum(
        "BTGRK,BSGK->BGRTS",
        query_BxTxGxRxK,
        key_BxSxGxK,
        preferred_element_type=jnp.float32,
    )
    if mask_Bx1xTxS is not None:
        scores_BxGxRxTxS = jnp.where(
            mask_Bx1xTxS[:, :, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min
        )
    # Softmax in float32 whatever the compute dtype: bf16 exponentials lose the tail.
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS.astype(jnp.float32), axis=-1)
    probs_BxHxTxS = probs_BxGxRxTxS.reshape(B, H, T, -1)
    if dropout_fn is not None:
        probs_BxGxRxTxS = dropout_fn(probs_BxGxRxTxS)
    out_BxTxGxRxK = jnp.einsum(
        "BGRTS,BSGK->BTGRK", probs_BxGxRxTxS.astype(value_BxSxGxK.dtype), value_BxSxGxK
    )
    return out_BxTxGxRxK.reshape(B, T, H, K), probs_BxHxTxS


def fused_attention(
    query_BxTxHxK: Array, key_BxSxGxK: Array, value_BxSxGxK: Array, mask_Bx1xTxS: Array | None
) -> Array:
    """The same computation through jax.nn.dot_product_attention (cuDNN flash kernel on GPU)."""
    return jax.nn.dot_product_attention(
        query_BxTxHxK, key_BxSxGxK, value_BxSxGxK, mask=mask_Bx1xTxS, implementation=None
    )


class HeadProjection(nn.Module):
    """x W + b into heads: [B, L, D] -> [B, L, heads, K] (one of W^Q, W^K, W^V, all heads)."""

    config: ModelConfig
    heads: int

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        """Project and split into heads."""
        cfg = self.config
        # 3-D kernel with fan-in D and fan-out heads*K: the same Glorot range as one D x D matrix.
        init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        kernel_DxNxK = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
            (cfg.d_model, self.heads, cfg.head_dim),
            dtype_of(cfg.param_dtype),
        )
        dtype = dtype_of(cfg.dtype)
        y_BxLxNxK = jnp.einsum(
            "BLD,DNK->BLNK", x_BxLxD.astype(dtype), jnp.asarray(kernel_DxNxK, dtype)
        )
        if cfg.use_bias:
            bias_NxK = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                (self.heads, cfg.head_dim),
                dtype_of(cfg.param_dtype),
            )
            y_BxLxNxK = y_BxLxNxK + jnp.asarray(bias_NxK, dtype)
        return y_BxLxNxK


class OutputProjection(nn.Module):
    """Concat(head_1..head_h) W^O + b: [B, T, H, K] -> [B, T, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxHxK: Array) -> Array:
        """Merge heads back into the model dimension."""
        cfg = self.config
        init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        kernel_HxKxD = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
            (cfg.num_heads, cfg.head_dim, cfg.d_model),
            dtype_of(cfg.param_dtype),
        )
        dtype = dtype_of(cfg.dtype)
        y_BxTxD = jnp.einsum(
            "BTHK,HKD->BTD", x_BxTxHxK.astype(dtype), jnp.asarray(kernel_HxKxD, dtype)
        )
        if cfg.use_bias:
            bias_D = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (cfg.d_model,),
                dtype_of(cfg.param_dtype),
            )
            y_BxTxD = y_BxTxD + jnp.asarray(bias_D, dtype)
        return y_BxTxD


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O with per-head projections (section 3.2.2).

    With decode=True it keeps a cache: self-attention appends one step's key/value per call;
    cross-attention projects the encoder output once, on the first (cache-creating) call.
    """

    config: ModelConfig
    is_cross_attention: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxTxD: Array,
        memory_BxSxD: Array,
        mask_Bx1xTxS: Array | None,
        *,
        deterministic: bool,
        decode: bool = False,
    ) -> Array:
        """Attend from x to memory (memory is x itself for self-attention)."""
        cfg = self.config
        H, G = cfg.num_heads, cfg.kv_heads

        def projection(heads: int, name: str) -> HeadProjection:
            return HeadProjection(cfg, heads=heads, name=name)

        query_BxTxHxK = nn.with_logical_constraint(projection(H, "query")(x_BxTxD), ACT_BLHK)

        if decode and self.is_cross_attention:
            key_BxSxGxK, value_BxSxGxK = self._cached_memory(
                projection(G, "key"), projection(G, "value"), memory_BxSxD
            )
        else:
            key_BxSxGxK = projection(G, "key")(memory_BxSxD)
            value_BxSxGxK = projection(G, "value")(memory_BxSxD)
            if decode:
                key_BxSxGxK, value_BxSxGxK, mask_Bx1xTxS = self._append_to_cache(
                    key_BxSxGxK, value_BxSxGxK, mask_Bx1xTxS
                )
        key_BxSxGxK = nn.with_logical_constraint(key_BxSxGxK, ACT_BLHK)
        value_BxSxGxK = nn.with_logical_constraint(value_BxSxGxK, ACT_BLHK)

        if cfg.attention_impl == "dot_product":
            out_BxTxHxK = fused_attention(query_BxTxHxK, key_BxSxGxK, value_BxSxGxK, mask_Bx1xTxS)
        else:
            dropout_fn = None
            if cfg.attention_dropout_rate > 0 and not deterministic:
                dropout = nn.Dropout(cfg.attention_dropout_rate)

                def dropout_fn(p: Array) -> Array:
                    return dropout(p, deterministic=False)

            out_BxTxHxK, probs_BxHxTxS = einsum_attention(
                query_BxTxHxK, key_BxSxGxK, value_BxSxGxK, mask_Bx1xTxS, dropout_fn=dropout_fn
            )
            # Kept only when the caller asks for mutable=["intermediates"] (attention plots).
            self.sow("intermediates", "attention_weights", probs_BxHxTxS)

        out_BxTxHxK = nn.with_logical_constraint(out_BxTxHxK, ACT_BLHK)
        return OutputProjection(cfg, name="out")(out_BxTxHxK)

    def _cached_memory(
        self, key_proj: HeadProjection, value_proj: HeadProjection, memory_BxSxD: Array
    ) -> tuple[Array, Array]:
        """Cross-attention keys/values: projected on the cache-creating call, then reused."""
        if self.has_variable("cache", "cross_key"):
            return (
                self.get_variable("cache", "cross_key"),
                self.get_variable("cache", "cross_value"),
            )
        key_BxSxGxK = key_proj(memory_BxSxD)
        value_BxSxGxK = value_proj(memory_BxSxD)
        self.put_variable("cache", "cross_key", key_BxSxGxK)
        self.put_variable("cache", "cross_value", value_BxSxGxK)
        return key_BxSxGxK, value_BxSxGxK

    def _append_to_cache(
        self, key_Bx1xGxK: Array, value_Bx1xGxK: Array, mask: Array | None
    ) -> tuple[Array, Array, Array | None]:
        """Self-attention cache: the first call sizes it; each later call writes one step."""
        initialized = self.has_variable("cache", CACHED_KEY)
        cached_key = self.variable(
            "cache", CACHED_KEY, jnp.zeros, key_Bx1xGxK.shape, key_Bx1xGxK.dtype
        )
        cached_value = self.variable(
            "cache", CACHED_VALUE, jnp.zeros, value_Bx1xGxK.shape, value_Bx1xGxK.dtype
        )
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            # The sizing call sees the whole (dummy) target and attends with the given mask.
            return key_Bx1xGxK, value_Bx1xGxK, mask
        B, L = cached_key.value.shape[:2]
        if key_Bx1xGxK.shape[1] != 1:
            raise ValueError(
                f"decode=True takes one target step per call after the cache is created; got "
                f"{key_Bx1xGxK.shape[1]} steps"
            )
        index = cache_index.value
        zero = jnp.array(0, jnp.int32)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key_Bx1xGxK, (zero, index, zero, zero)
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value_Bx1xGxK, (zero, index, zero, zero)
        )
        cache_index.value = index + 1
        # Causal by construction: the new query sees steps 0..index and nothing after.
        step_mask_Bx1x1xL = jnp.broadcast_to(jnp.arange(L) <= index, (B, 1, 1, L))
        return cached_key.value, cached_value.value, step_mask_Bx1x1xL
