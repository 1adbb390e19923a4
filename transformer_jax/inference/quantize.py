"""Post-training int8 for decoding: a float checkpoint's parameters in an int8 model's layout.

load(..., quantization="int8") calls `quantize` on each model it opens, in memory, sharded as
the float parameters are; the checkpoint on disk stays float. See model/quant.py for the
arithmetic and docs/inference.md for accuracy and speed.
"""

from __future__ import annotations

from typing import Any, get_args

import jax
from jax.sharding import Mesh

from transformer_jax import sharding
from transformer_jax.config import KVCacheType, ModelConfig, Quantization
from transformer_jax.model.quant import quantize_params
from transformer_jax.state import abstract_train_state

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
KV_CACHES: tuple[str, ...] = get_args(KVCacheType)


def check_names(quantization: str, kv_cache: str, flags: bool = False) -> None:
    """Raise ValueError naming the argument (or --flag) if either name is unknown."""
    prefix = "--" if flags else ""
    for name, value, allowed in (
        ("quantization", quantization, QUANTIZATIONS),
        ("kv_cache", kv_cache, KV_CACHES),
    ):
        if value not in allowed:
            raise ValueError(
                f"{prefix}{name}={value!r}: unknown; choose one of {', '.join(allowed)}"
            )


def quantize(
    config: ModelConfig, params: Any, mesh: Mesh, rules: sharding.LogicalRules
) -> tuple[ModelConfig, Any]:
    """(the int8 model's config, its parameters) from a float model's, on `mesh`.

    Every projection, FFN (experts included), the output layer and the embedding table become
    int8 with per-output-channel float32 scales; norms, biases and the router stay as they are.
    """
    if config.quantization != "none":
        raise ValueError(
            f"quantize: the model is already quantized ({config.quantization}); quantize the "
            "float model it came from"
        )
    int8_config = config.replace(quantization="int8")
    shapes = abstract_train_state(int8_config, mesh, rules).params
    convert = jax.jit(
        lambda p: quantize_params(p, shapes), out_shardings=sharding.shardings_of(shapes)
    )
    with sharding.context(mesh, rules):
        return int8_config, convert(params)
