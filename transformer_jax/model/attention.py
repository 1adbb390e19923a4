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

# The decoding cache: sources, heads, (rows per source x slots), head dimension.
ACT_BHLK = ("activation_batch", "activation_heads", "activation_length", "activation_kv")

# The self-attention decoding cache keeps each source's rows (beam search's hypotheses) side
# by side in the layout attention reads, [B sources, G heads, W x C slots, K]: slot w * C + c
# holds the key that physical row w wrote at step c. Beam search never moves these
# buffers. A hypothesis that takes over another's history takes over its row of the
# decoder-level BEAM_ORIGIN table instead ([B * W, C] int32: for each row and slot, the
# physical row holding its key), and attention masks every (physical row, slot) pair that is
# not in the hypothesis's own history. So a step reads each cached key once, with no gather
# and no transpose; the W queries of a source share one matrix product.
CACHED_KEY, CACHED_VALUE = "cached_key", "cached_value"
BEAM_ORIGIN = "beam_origin"
# The leaves a beam reorder gathers (axis 0: one row per hypothesis).
PER_ROW_CACHE = frozenset({BEAM_ORIGIN})
# Each growing leaf's slot axis (before any leading layer axis that nn.scan adds): W blocks
# of C slots for keys and values, C slots for the origin table.
CACHE_SLOT_AXIS = {CACHED_KEY: 2, CACHED_VALUE: 2, BEAM_ORIGIN: 1}


def self_attention_step_mask(origin_RxC: Array, index: Array, copies: int) -> Array:
    """[B, 1, W, W * C] mask for one step: query row q reads (row p, slot c) in its history.

    origin_RxC is the BEAM_ORIGIN table (rows b * W + w); slots after index are not written.
    """
    R, C = origin_RxC.shape
    origin_BxWxC = origin_RxC.reshape(R // copies, copies, C)
    rows_1x1xWx1 = jnp.arange(copies)[None, None, :, None]
    ours_BxWxWxC = (origin_BxWxC[:, :, None, :] == rows_1x1xWx1) & (jnp.arange(C) <= index)
    return ours_BxWxWxC.reshape(R // copies, 1, copies, copies * C)


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


def cached_step_attention(
    query_BxTxHxK: Array, key_BxGxSxK: Array, value_BxGxSxK: Array, mask_Bx1xTxS: Array
) -> tuple[Array, Array]:
    """One decoding step against the cache: T = W queries per source over its S = W x C slots.

    The same softmax(Q K^T / sqrt(d_k)) V as einsum_attention, with both products in XLA's
    batch-major order [B, G, ...] and the cache read as it is stored, so XLA:CPU neither
    transposes nor copies it. Returns (output [B, T, H, K], probabilities [B, H, T, S]).
    """
    B, T, H, K = query_BxTxHxK.shape
    G = key_BxGxSxK.shape[1]
    R = H // G
    query_BxTxHxK = query_BxTxHxK * jnp.asarray(1.0 / np.sqrt(K), query_BxTxHxK.dtype)
    query_BxGxRxTxK = query_BxTxHxK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4)
    scores_BxGxRxTxS = jnp.einsum(
        "BGRTK,BGSK->BGRTS", query_BxGxRxTxK, key_BxGxSxK, preferred_element_type=jnp.float32
    )
    scores_BxGxRxTxS = jnp.where(
        mask_Bx1xTxS[:, :, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min
    )
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS.astype(jnp.float32), axis=-1)
    out_BxGxRxTxK = jnp.einsum(
        "BGRTS,BGSK->BGRTK", probs_BxGxRxTxS.astype(value_BxGxSxK.dtype), value_BxGxSxK
    )
    out_BxTxHxK = out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
    return out_BxTxHxK, probs_BxGxRxTxS.reshape(B, H, T, -1)


def fused_attention(
    query_BxTxHxK: Array, key_BxSxGxK: Array, value_BxSxGxK: Array, mask_Bx1xTxS: Array | None
) -> Array:
    """The same computation through jax.nn.dot_product_attention (cuDNN flash kernel on GPU)."""
    return jax.nn.dot_product_attention(
        query_BxTxHxK, key_BxSxGxK, value_BxSxGxK, mask=mask_Bx1xTxS, implementation=None
    )


def _group_rows(x_RxTx_: Array, copies: int) -> Array:
    """[B * copies, T, ...] -> [B, copies * T, ...]: each source's consecutive rows side by side."""
    rows, T = x_RxTx_.shape[:2]
    return x_RxTx_.reshape(rows // copies, copies * T, *x_RxTx_.shape[2:])


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
        copies: int = 1,
    ) -> Array:
        """Attend from x to memory (memory is x itself for self-attention).

        When decoding, x may hold `copies` consecutive rows per source (beam hypotheses): the
        cross-attention then reads one memory per source, and a cached self-attention step
        takes the mask self_attention_step_mask builds.
        """
        cfg = self.config
        H, G = cfg.num_heads, cfg.kv_heads
        rows = x_BxTxD.shape[0]

        def projection(heads: int, name: str) -> HeadProjection:
            return HeadProjection(cfg, heads=heads, name=name)

        query_BxTxHxK = nn.with_logical_constraint(projection(H, "query")(x_BxTxD), ACT_BLHK)
        heads_first = False

        if decode and self.is_cross_attention:
            key_BxSxGxK, value_BxSxGxK = self._cached_memory(
                projection(G, "key"), projection(G, "value"), memory_BxSxD
            )
            # A source's rows attend together to one copy of its memory, as one longer query.
            if copies > 1:
                query_BxTxHxK = _group_rows(query_BxTxHxK, copies)
                if mask_Bx1xTxS is not None and mask_Bx1xTxS.shape[0] == rows:
                    mask_Bx1xTxS = _group_rows(mask_Bx1xTxS.swapaxes(1, 2), copies).swapaxes(1, 2)
        else:
            key_BxSxGxK = projection(G, "key")(memory_BxSxD)
            value_BxSxGxK = projection(G, "value")(memory_BxSxD)
            if decode:
                key_BxSxGxK, value_BxSxGxK, heads_first = self._append_to_cache(
                    key_BxSxGxK, value_BxSxGxK, copies
                )
                if heads_first:  # a cached step: the source's rows query its cache together
                    query_BxTxHxK = _group_rows(query_BxTxHxK, copies)
        kv_axes = ACT_BHLK if heads_first else ACT_BLHK
        key_BxSxGxK = nn.with_logical_constraint(key_BxSxGxK, kv_axes)
        value_BxSxGxK = nn.with_logical_constraint(value_BxSxGxK, kv_axes)

        if heads_first:  # a cached step, whatever attention_impl (no fused kernel reads it)
            if mask_Bx1xTxS is None:
                raise ValueError("a cached self-attention step needs self_attention_step_mask")
            out_BxTxHxK, probs_BxHxTxS = cached_step_attention(
                query_BxTxHxK, key_BxSxGxK, value_BxSxGxK, mask_Bx1xTxS
            )
            self.sow("intermediates", "attention_weights", probs_BxHxTxS)
        elif cfg.attention_impl == "dot_product":
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

        if out_BxTxHxK.shape[0] != rows:  # grouped rows back to one row each
            out_BxTxHxK = out_BxTxHxK.reshape(rows, -1, *out_BxTxHxK.shape[2:])
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
        self, key_RxTxGxK: Array, value_RxTxGxK: Array, copies: int
    ) -> tuple[Array, Array, bool]:
        """Self-attention cache: the first call sizes it; each later call writes one step.

        Returns the keys and values to attend to and whether they are the cache ([B, G, W * C,
        K], heads first) rather than this call's own ([R, T, G, K], the sizing call).
        """
        initialized = self.has_variable("cache", CACHED_KEY)
        R, T, G, K = key_RxTxGxK.shape
        W = copies
        shape = (R // W, G, W * T, K)  # T is the capacity on the sizing call
        cached_key = self.variable("cache", CACHED_KEY, jnp.zeros, shape, key_RxTxGxK.dtype)
        cached_value = self.variable("cache", CACHED_VALUE, jnp.zeros, shape, value_RxTxGxK.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            # The sizing call sees the whole (dummy) target and attends with the given mask.
            return key_RxTxGxK, value_RxTxGxK, False
        if T != 1:
            raise ValueError(
                f"decode=True takes one target step per call after the cache is created; got "
                f"{T} steps"
            )
        B, S = cached_key.value.shape[0], cached_key.value.shape[2]
        C, index, zero = S // W, cache_index.value, jnp.array(0, jnp.int32)

        def write(cache_BxGxSxK: Array, new_RxTxGxK: Array) -> Array:
            new_BxGxWxK = new_RxTxGxK.reshape(B, W, G, K).transpose(0, 2, 1, 3)
            # One in-place update per row: writing a [B, G, W, 1, K] view of the cache instead
            # makes XLA:CPU fuse the update into both its readers and copy the cache per step.
            for w in range(W):
                cache_BxGxSxK = jax.lax.dynamic_update_slice(
                    cache_BxGxSxK, new_BxGxWxK[:, :, w : w + 1], (zero, zero, w * C + index, zero)
                )
            return cache_BxGxSxK

        cached_key.value = write(cached_key.value, key_RxTxGxK)
        cached_value.value = write(cached_value.value, value_RxTxGxK)
        cache_index.value = index + 1
        return cached_key.value, cached_value.value, True
