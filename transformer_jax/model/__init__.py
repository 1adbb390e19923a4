"""Flax modules of the Transformer."""

from transformer_jax.model.attention import MultiHeadAttention
from transformer_jax.model.cache import grow_cache, init_cache, reorder_cache
from transformer_jax.model.ensemble import Ensemble, check_members
from transformer_jax.model.masks import AttentionMask
from transformer_jax.model.transformer import (
    Transformer,
    shift_right,
    stack_layer_params,
    unstack_layer_params,
)

# What the decoders accept: one model, or several decoded as one.
Decodable = Transformer | Ensemble

__all__ = [
    "AttentionMask",
    "Decodable",
    "Ensemble",
    "MultiHeadAttention",
    "Transformer",
    "check_members",
    "grow_cache",
    "init_cache",
    "reorder_cache",
    "shift_right",
    "stack_layer_params",
    "unstack_layer_params",
]
