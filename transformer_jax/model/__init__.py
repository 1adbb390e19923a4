"""Flax modules of the Transformer."""

from transformer_jax.model.attention import MultiHeadAttention, make_attention_mask
from transformer_jax.model.ensemble import Ensemble, check_members
from transformer_jax.model.transformer import (
    Transformer,
    grow_cache,
    init_cache,
    reorder_cache,
    shift_right,
    stack_layer_params,
    unstack_layer_params,
)

# What the decoders accept: one model, or several decoded as one.
Decodable = Transformer | Ensemble

__all__ = [
    "Decodable",
    "Ensemble",
    "MultiHeadAttention",
    "Transformer",
    "check_members",
    "grow_cache",
    "init_cache",
    "make_attention_mask",
    "reorder_cache",
    "shift_right",
    "stack_layer_params",
    "unstack_layer_params",
]
