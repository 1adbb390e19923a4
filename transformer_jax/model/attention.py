"""Multi-head attention (section 3.2) as one seam: project -> positions -> cache -> attend.

One call reads: project queries, keys and values (HeadProjection); apply positions in
self-attention (rotary positions rotate queries and keys, ALiBi makes a bias on the scores:
model/positions.py; sinusoidal and learned positions were added at the embedding); read or
write the decoding cache (model/cache.py); attend
through the kernel that config.attention_impl names (model/kernels.py), given one description of
what may attend to what (masks.AttentionMask, or cache.StepMask for a cached step); project out.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.model import kernels, positions, quant
from transformer_jax.model.cache import KVCache, StepMask, cross_memory
from transformer_jax.model.layers import dtype_of
from transformer_jax.model.masks import AttentionMask

Array = jax.Array

ACT_BLHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
# The decoding cache: sources, heads, (rows per source x slots), head dimension.
ACT_BHLK = ("activation_batch", "activation_heads", "activation_length", "activation_kv")


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
        kernel_DxNxK = quant.weight(
            self,
            "kernel",
            init,
            ("embed", "heads", "kv"),
            (cfg.d_model, self.heads, cfg.head_dim),
            (0,),
        )
        dtype = dtype_of(cfg.dtype)
        y_BxLxNxK = quant.product("BLD,DNK->BLNK", x_BxLxD, kernel_DxNxK, dtype)
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
        shape = (cfg.num_heads, cfg.head_dim, cfg.d_model)
        kernel_HxKxD = quant.weight(self, "kernel", init, ("heads", "kv", "embed"), shape, (0, 1))
        dtype = dtype_of(cfg.dtype)
        y_BxTxD = quant.product("BTHK,HKD->BTD", x_BxTxHxK, kernel_HxKxD, dtype)
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

    With decode=True it keeps a cache: self-attention writes one step's keys and values per
    call; cross-attention projects the encoder output once, on the first (cache-creating) call.
    """

    config: ModelConfig
    is_cross_attention: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxTxD: Array,
        memory_BxSxD: Array,
        mask: AttentionMask | StepMask,
        *,
        deterministic: bool,
        decode: bool = False,
        copies: int = 1,
        positions_BxT: Array | None = None,
    ) -> Array:
        """Attend from x to memory (memory is x itself for self-attention).

        mask says what may attend to what: an AttentionMask, or the StepMask of a cached
        decoding step. When decoding, x may hold `copies` consecutive rows per source (beam
        hypotheses): the cross-attention then reads one memory per source (its mask describes
        a source's rows as one grouped query row), and a cached step reads each source's cache
        once for all its rows. positions_BxT are the queries' position ids (a cached step's:
        the step), for the position schemes that act inside self-attention.
        """
        cfg = self.config
        H, G = cfg.num_heads, cfg.kv_heads
        rows = x_BxTxD.shape[0]

        def project(heads: int, name: str, x_BxLxD: Array) -> Array:
            return HeadProjection(cfg, heads=heads, name=name)(x_BxLxD)

        def project_memory() -> tuple[Array, Array]:
            return project(G, "key", memory_BxSxD), project(G, "value", memory_BxSxD)

        query_BxTxHxK = nn.with_logical_constraint(project(H, "query", x_BxTxD), ACT_BLHK)
        kernel = kernels.kernel(cfg.attention_impl)
        if decode and self.is_cross_attention:
            key_BxSxGxK, value_BxSxGxK = cross_memory(self, project_memory)
            query_BxTxHxK = _group_rows(query_BxTxHxK, copies)
        else:
            key_BxSxGxK, value_BxSxGxK = project_memory()
        bias_BxHxTxS = None
        if not self.is_cross_attention and positions_BxT is not None:
            # Self-attention: the keys are this call's own rows, at the queries' positions.
            if cfg.position_encoding == "rope":
                query_BxTxHxK = positions.rope(query_BxTxHxK, positions_BxT, cfg.rope_theta)
                key_BxSxGxK = positions.rope(key_BxSxGxK, positions_BxT, cfg.rope_theta)
            elif cfg.position_encoding == "alibi":
                k_positions = (
                    mask.slot_positions()[None] if isinstance(mask, StepMask) else positions_BxT
                )
                q_positions = positions_BxT[:1, :1] if isinstance(mask, StepMask) else positions_BxT
                bias_BxHxTxS = positions.alibi_bias(q_positions, k_positions, H)

        if isinstance(mask, StepMask):  # a cached self-attention step, one query per row
            cache = KVCache(self, key_BxSxGxK, copies)
            cached_key, cached_value = cache.write(key_BxSxGxK, value_BxSxGxK, mask.slot)
            # An int8 cache is int8 values and their scales: each leaf laid out alike.
            key_BxGxSxK, value_BxGxSxK = jax.tree.map(
                lambda x: nn.with_logical_constraint(x, ACT_BHLK[: x.ndim]),
                (cached_key, cached_value),
            )
            # A source's rows query its cache together.
            probs: Array | None
            out_BxTxHxK, probs = kernel.step(
                _group_rows(query_BxTxHxK, copies), key_BxGxSxK, value_BxGxSxK, mask, bias_BxHxTxS
            )
        else:
            if decode and not self.is_cross_attention:
                KVCache(self, key_BxSxGxK, copies)  # the cache-creating call sizes the cache
            key_BxSxGxK = nn.with_logical_constraint(key_BxSxGxK, ACT_BLHK)
            value_BxSxGxK = nn.with_logical_constraint(value_BxSxGxK, ACT_BLHK)
            dropout_fn = None
            if cfg.attention_dropout_rate > 0 and not deterministic:
                dropout = nn.Dropout(cfg.attention_dropout_rate)

                def dropout_fn(p: Array) -> Array:
                    return dropout(p, deterministic=False)

            # Decoding runs the plain formula here: the cache-creating call (its output is never
            # used) and each step's cross-attention (W queries per source, where a kernel's
            # 128-row query blocks would be padding).
            attend = kernels.kernel("einsum").attend if decode else kernel.attend
            out_BxTxHxK, probs = attend(
                query_BxTxHxK,
                key_BxSxGxK,
                value_BxSxGxK,
                mask,
                config=cfg,
                bias_BxHxTxS=bias_BxHxTxS,
                dropout_fn=dropout_fn,
            )
        if probs is not None:
            # Kept only when the caller asks for mutable=["intermediates"] (attention plots).
            self.sow("intermediates", "attention_weights", probs)
        if out_BxTxHxK.shape[0] != rows:  # grouped rows back to one row each
            out_BxTxHxK = out_BxTxHxK.reshape(rows, -1, *out_BxTxHxK.shape[2:])
        out_BxTxHxK = nn.with_logical_constraint(out_BxTxHxK, ACT_BLHK)
        return OutputProjection(cfg, name="out")(out_BxTxHxK)


def _group_rows(x_RxTx_: Array, copies: int) -> Array:
    """[B * copies, T, ...] -> [B, copies * T, ...]: each source's consecutive rows side by side."""
    if copies == 1:
        return x_RxTx_
    rows, T = x_RxTx_.shape[:2]
    return x_RxTx_.reshape(rows // copies, copies * T, *x_RxTx_.shape[2:])
