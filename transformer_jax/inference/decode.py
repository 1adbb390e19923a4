"""Autoregressive decoding with the model's KV cache: greedy (beam search builds on the same)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.model import Transformer, init_cache

Array = jax.Array


def output_limits(src_ids_BxS: Array, extra_length: int, max_length: int) -> Array:
    """Per-sentence output cap: source length + extra_length (section 6.1 uses +50)."""
    src_len_B = jnp.sum(src_ids_BxS != PAD_ID, axis=-1)
    return jnp.minimum(src_len_B + extra_length, max_length)


def greedy_decode(
    model: Transformer,
    params: Any,
    src_ids_BxS: Array,
    *,
    max_length: int,
    extra_length: int = 50,
) -> Array:
    """Argmax decoding: [B, max_length] ids, EOS included, PAD after it. Jit with static max_length.

    The encoder runs once; cross-attention keys/values are projected once into the cache; each
    step feeds the previous token and stops when every sentence has emitted EOS or hit its cap.
    """
    B = src_ids_BxS.shape[0]
    encoded_BxSxD: Array = model.apply({"params": params}, src_ids_BxS, method=Transformer.encode)  # type: ignore[assignment]
    cache = init_cache(model, params, encoded_BxSxD, src_ids_BxS, max_length)
    limit_B = output_limits(src_ids_BxS, extra_length, max_length)

    def step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, cache, previous_B, finished_B, out_BxT = carry
        logits_Bx1xV, mutated = model.apply(
            {"params": params, "cache": cache},
            encoded_BxSxD,
            src_ids_BxS,
            previous_B[:, None],
            decode=True,
            mutable=["cache"],
            method=Transformer.decode,
        )
        token_B = jnp.argmax(logits_Bx1xV[:, 0], axis=-1).astype(jnp.int32)
        # A sentence at its length cap is forced to end, as if it had produced EOS.
        token_B = jnp.where(i + 1 >= limit_B, EOS_ID, token_B)
        token_B = jnp.where(finished_B, PAD_ID, token_B)
        out_BxT = jax.lax.dynamic_update_slice(out_BxT, token_B[:, None], (0, i))
        finished_B = finished_B | (token_B == EOS_ID)
        return i + 1, mutated["cache"], token_B, finished_B, out_BxT

    def not_done(carry: tuple[Any, ...]) -> Array:
        i, _, _, finished_B, _ = carry
        return (i < max_length) & ~jnp.all(finished_B)

    init = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.full((B,), BOS_ID, jnp.int32),
        jnp.zeros((B,), bool),
        jnp.full((B, max_length), PAD_ID, jnp.int32),
    )
    return jax.lax.while_loop(not_done, step, init)[-1]
