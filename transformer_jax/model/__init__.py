"""Flax modules of the Transformer."""

from transformer_jax.model.attention import MultiHeadAttention, make_attention_mask
from transformer_jax.model.transformer import (
    Transformer,
    grow_cache,
    init_cache,
    reorder_cache,
    shift_right,
    stack_layer_params,
    unstack_layer_params,
)

__all__ = [
    "MultiHeadAttention",
    "Transformer",
    "grow_cache",
    "init_cache",
    "make_attention_mask",
    "reorder_cache",
    "shift_right",
    "stack_layer_params",
    "unstack_layer_params",
]
