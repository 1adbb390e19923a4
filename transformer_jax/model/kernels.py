"""The attention kernels, behind one choice: `kernel(config.attention_impl)`.

Every kernel computes softmax(Q K^T / sqrt(d_k) + bias) V over what the call's
`masks.AttentionMask` allows, with queries [B, T, H, K] and keys and values [B, S, G, K] (G key
heads, H a multiple of G), and returns (output [B, T, H, K], probabilities [B, H, T, S] or None
where the kernel never forms them). Each also names the path a cached decoding step takes:
one query per row against the cache's [B, G, slots, K] layout (`cache.StepMask`).

- einsum: the formula spelled out in XLA; materializes the [B, H, T, S] scores. Everywhere.
- dot_product: jax.nn.dot_product_attention with implementation=None, which jax 0.10.2 runs
  as XLA's attention on every backend (the same scores as einsum); its cuDNN flash kernel is
  implementation="cudnn", which no GPU here has tested.
- splash: Pallas splash attention (model/splash.py); a flash kernel on TPU that never holds
  the scores, run in Pallas interpret mode (slow) elsewhere.

A new kernel is one function here and one entry in KERNELS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.model.cache import StepMask
from transformer_jax.model.masks import AttentionMask
from transformer_jax.model.quant import Int8Array

Array = jax.Array


class Attend(Protocol):
    """(q, k, v, mask, bias, dropout) -> (output, probabilities or None)."""

    def __call__(
        self,
        query_BxTxHxK: Array,
        key_BxSxGxK: Array,
        value_BxSxGxK: Array,
        mask: AttentionMask,
        *,
        config: ModelConfig,
        bias_BxHxTxS: Array | None = None,
        dropout_fn: Callable[[Array], Array] | None = None,
    ) -> tuple[Array, Array | None]: ...


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One attention_impl: its full-sequence kernel and its cached decoding step."""

    attend: Attend
    step: Callable[..., tuple[Array, Array]]  # cached_step_attention's signature


def scale_query(query_BxTxHxK: Array) -> Array:
    """q / sqrt(d_k), in q's dtype: scaling q, not the scores, keeps bfloat16 products in range."""
    K = query_BxTxHxK.shape[-1]
    return query_BxTxHxK * jnp.asarray(1.0 / np.sqrt(K), query_BxTxHxK.dtype)


def einsum_attention(
    query_BxTxHxK: Array,
    key_BxSxGxK: Array,
    value_BxSxGxK: Array,
    mask_Bx1xTxS: Array | None,
    *,
    bias_BxHxTxS: Array | None = None,
    dropout_fn: Any = None,
) -> tuple[Array, Array]:
    """softmax(Q K^T / sqrt(d_k)) V, spelled out; returns (output, probabilities [B,H,T,S])."""
    B, T, H, K = query_BxTxHxK.shape
    G = key_BxSxGxK.shape[2]
    R = H // G
    query_BxTxGxRxK = scale_query(query_BxTxHxK).reshape(B, T, G, R, K)
    scores_BxGxRxTxS = jnp.einsum(
        "BTGRK,BSGK->BGRTS",
        query_BxTxGxRxK,
        key_BxSxGxK,
        preferred_element_type=jnp.float32,
    )
    if bias_BxHxTxS is not None:
        bias_BxGxRxTxS = bias_BxHxTxS.reshape(-1, G, R, *bias_BxHxTxS.shape[2:])
        scores_BxGxRxTxS += bias_BxGxRxTxS
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
    query_BxTxHxK: Array,
    key_BxGxSxK: Array | Int8Array,
    value_BxGxSxK: Array | Int8Array,
    mask: StepMask,
    bias_BxHxTxS: Array | None = None,
) -> tuple[Array, Array]:
    """One decoding step against the cache: T = W queries per source over its S = W x C slots.

    The same softmax(Q K^T / sqrt(d_k)) V as einsum_attention, with both products in XLA's
    batch-major order [B, G, ...] and the cache read as it is stored, so XLA:CPU neither
    transposes nor copies it. One query per row is a matrix-vector product that reads each
    cached key once; a flash kernel's query blocks (128 rows on TPU) would be padding. Returns
    (output [B, T, H, K], probabilities [B, H, T, S]).

    An int8 cache (config.kv_cache="int8") arrives as int8 values with one scale per slot:
    key scales multiply the scores and value scales the probabilities, so the products read
    the int8 values converted on the way in (fused into the dot on TPU), never a float copy.
    """
    B, T, H, K = query_BxTxHxK.shape
    G = key_BxGxSxK.values.shape[1] if isinstance(key_BxGxSxK, Int8Array) else key_BxGxSxK.shape[1]
    R = H // G
    query_BxGxRxTxK = scale_query(query_BxTxHxK).reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4)
    key_scale_Bx1x1x1xS: Array | None = None
    if isinstance(key_BxGxSxK, Int8Array):
        key_scale_Bx1x1x1xS = key_BxGxSxK.scale[:, :, None, None, :]
        key_BxGxSxK = key_BxGxSxK.values.astype(query_BxGxRxTxK.dtype)
    scores_BxGxRxTxS = jnp.einsum(
        "BGRTK,BGSK->BGRTS", query_BxGxRxTxK, key_BxGxSxK, preferred_element_type=jnp.float32
    )
    if key_scale_Bx1x1x1xS is not None:
        scores_BxGxRxTxS = scores_BxGxRxTxS * key_scale_Bx1x1x1xS
    if bias_BxHxTxS is not None:
        scores_BxGxRxTxS += bias_BxHxTxS.reshape(-1, G, R, *bias_BxHxTxS.shape[2:])
    scores_BxGxRxTxS = jnp.where(
        mask.dense()[:, :, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min
    )
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS.astype(jnp.float32), axis=-1)
    weights_BxGxRxTxS = probs_BxGxRxTxS
    if isinstance(value_BxGxSxK, Int8Array):
        weights_BxGxRxTxS = probs_BxGxRxTxS * value_BxGxSxK.scale[:, :, None, None, :]
        value_BxGxSxK = value_BxGxSxK.values.astype(query_BxTxHxK.dtype)
    out_BxGxRxTxK = jnp.einsum(
        "BGRTS,BGSK->BGRTK", weights_BxGxRxTxS.astype(value_BxGxSxK.dtype), value_BxGxSxK
    )
    out_BxTxHxK = out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
    return out_BxTxHxK, probs_BxGxRxTxS.reshape(B, H, T, -1)


def fused_attention(
    query_BxTxHxK: Array,
    key_BxSxGxK: Array,
    value_BxSxGxK: Array,
    mask_Bx1xTxS: Array | None,
    *,
    bias_BxHxTxS: Array | None = None,
    local_window_size: tuple[int, int] | None = None,
) -> Array:
    """The same computation through jax.nn.dot_product_attention (XLA's attention in jax 0.10.2).

    A sliding window is in the mask already; local_window_size also tells the function, whose
    fused implementations skip the blocks outside it.
    """
    return jax.nn.dot_product_attention(
        query_BxTxHxK,
        key_BxSxGxK,
        value_BxSxGxK,
        bias=bias_BxHxTxS,
        mask=mask_Bx1xTxS,
        local_window_size=local_window_size,
        implementation=None,
    )


def _einsum(
    query_BxTxHxK: Array,
    key_BxSxGxK: Array,
    value_BxSxGxK: Array,
    mask: AttentionMask,
    *,
    config: ModelConfig,
    bias_BxHxTxS: Array | None = None,
    dropout_fn: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array | None]:
    return einsum_attention(
        query_BxTxHxK,
        key_BxSxGxK,
        value_BxSxGxK,
        mask.dense(),
        bias_BxHxTxS=bias_BxHxTxS,
        dropout_fn=dropout_fn,
    )


def _dot_product(
    query_BxTxHxK: Array,
    key_BxSxGxK: Array,
    value_BxSxGxK: Array,
    mask: AttentionMask,
    *,
    config: ModelConfig,
    bias_BxHxTxS: Array | None = None,
    dropout_fn: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array | None]:
    out = fused_attention(
        query_BxTxHxK,
        key_BxSxGxK,
        value_BxSxGxK,
        mask.dense(),
        bias_BxHxTxS=bias_BxHxTxS,
        local_window_size=mask.local_window(),
    )
    return out, None


def _splash(
    query_BxTxHxK: Array,
    key_BxSxGxK: Array,
    value_BxSxGxK: Array,
    mask: AttentionMask,
    *,
    config: ModelConfig,
    bias_BxHxTxS: Array | None = None,
    dropout_fn: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array | None]:
    from transformer_jax.model import splash

    if bias_BxHxTxS is not None:
        raise ValueError("attention_impl='splash' takes no additive attention bias")
    return splash.splash_attention(query_BxTxHxK, key_BxSxGxK, value_BxSxGxK, mask, config), None


KERNELS: dict[str, Kernel] = {
    "einsum": Kernel(attend=_einsum, step=cached_step_attention),
    "dot_product": Kernel(attend=_dot_product, step=cached_step_attention),
    "splash": Kernel(attend=_splash, step=cached_step_attention),
}


def kernel(attention_impl: str) -> Kernel:
    """The kernel config.attention_impl names."""
    return KERNELS[attention_impl]
