"""int8 decoding: per-channel int8 weights, per-token int8 activations, int32 accumulation.

With config.quantization == "int8" every weight matrix that multiplies activations (the
attention projections, the FFN and expert matrices, the pre-softmax projection and the
embedding table it shares) is stored as int8 values W_q with one float32 scale per output
channel, W ~ W_q * s_w (symmetric, s_w = max|W| / 127 over the contracted axes). Each product
quantizes its input per token the same way (x ~ x_q * s_x, s_x = max|x| / 127 over the
contracted axes, computed on the fly), multiplies int8 x int8 into int32
(`jax.lax.dot_general(..., preferred_element_type=int32)`, exact) and rescales once:
x W ~ (x_q W_q) * s_x * s_w. Softmax, norms, residuals, biases and the router stay float.

Scales are stored with the weight's rank (1 on the contracted axes), so `quantize_params` can
read from the quantized model's own parameter shapes which axes each matrix contracts.

The KV cache has its own switch (config.kv_cache, model/cache.py) and uses `quantize_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig

Array = jax.Array

INT8_MAX = 127
SCALE_SUFFIX = "_scale"


@flax.struct.dataclass
class Int8Array:
    """int8 values and their float32 scales.

    A weight's scale is per output channel (1 on the axes its products sum over). The int8
    KV cache's are one per (row, head, slot): [B, G, S] for values [B, G, S, K].
    """

    values: Array  # int8
    scale: Array  # float32

    def dequantized(self, dtype: Any) -> Array:
        """values * scale in `dtype` (for lookups; products use `product`)."""
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


Weight = Array | Int8Array


def quantize_rows(x: Array, axes: Sequence[int]) -> tuple[Array, Array]:
    """Symmetric int8 over `axes`: (int8 values, float32 scale with those axes kept as 1).

    A slice of zeros gets scale 1 (its values are 0 either way), so nothing divides by zero.
    """
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=tuple(axes), keepdims=True)
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
    values = jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scale


def weight(
    module: nn.Module,
    name: str,
    init: nn.initializers.Initializer,
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    contract: Sequence[int],
) -> Weight:
    """Declare a weight matrix: float as config.param_dtype, or int8 plus `name`_scale.

    contract lists the axes the weight's products sum over; the int8 form keeps one scale per
    entry of the other axes (per output channel). The logical axes shard both alike.
    """
    cfg: ModelConfig = module.config  # type: ignore[attr-defined]
    if cfg.quantization == "none":
        # flax unboxes the logical partitioning: an array comes back.
        return cast(
            Array,
            module.param(
                name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype)
            ),
        )
    values = module.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.int8
    )
    scale_shape = tuple(1 if i in contract else n for i, n in enumerate(shape))
    scale_axes = tuple(None if i in contract else a for i, a in enumerate(axes))
    scale = module.param(
        name + SCALE_SUFFIX,
        nn.with_logical_partitioning(nn.initializers.ones, scale_axes),
        scale_shape,
        jnp.float32,
    )
    return Int8Array(cast(Array, values), cast(Array, scale))


def product(spec: str, x: Array, w: Weight, dtype: Any) -> Array:
    """jnp.einsum(spec, x, w) in `dtype`; an Int8Array multiplies in int8 with int32 sums.

    spec is a two-operand einsum ("BLD,DNK->BLNK") whose output keeps x's free axes, then
    w's, each in their own order (as every product in the model does).
    """
    if not isinstance(w, Int8Array):
        return jnp.einsum(spec, x.astype(dtype), jnp.asarray(w, dtype))
    inputs, out = spec.split("->")
    x_letters, w_letters = inputs.split(",")
    summed = [c for c in x_letters if c in w_letters and c not in out]
    x_q, x_scale = quantize_rows(x, [x_letters.index(c) for c in summed])
    y = jnp.einsum(spec, x_q, w.values, preferred_element_type=jnp.int32)
    # Rescale: x's scale (x's free axes) and w's (w's free axes), lined up with the output.
    x_free = "".join(c for c in x_letters if c not in summed)
    w_free = "".join(c for c in w_letters if c not in summed)
    x_scale = _onto(x_scale, x_letters, x_free, out)
    w_scale = _onto(w.scale, w_letters, w_free, out)
    return (y.astype(jnp.float32) * x_scale * w_scale).astype(dtype)


def _onto(scale: Array, letters: str, free: str, out: str) -> Array:
    """A keep-dims scale over `letters` reshaped to broadcast against the `out` axes."""
    squeezed = scale.reshape([n for c, n in zip(letters, scale.shape, strict=True) if c in free])
    if "".join(c for c in out if c in free) != free:
        raise ValueError(f"int8 product: the output {out!r} reorders the axes {free!r}")
    shape = [squeezed.shape[free.index(c)] if c in free else 1 for c in out]
    return squeezed.reshape(shape)


def quantize_params(params: Any, quantized_shapes: Any) -> Any:
    """Float parameters in the layout `quantized_shapes` gives (an int8 model's parameters).

    quantized_shapes is the int8 model's parameter tree (arrays or ShapeDtypeStructs, e.g. from
    jax.eval_shape of its init). Each int8 leaf is the float leaf at the same path quantized
    over the axes where its `_scale` sibling has size 1; every other leaf is copied as it is.
    """
    params, quantized_shapes = nn.meta.unbox(params), nn.meta.unbox(quantized_shapes)
    flat = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    shapes = {
        path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(quantized_shapes)[0]
    }

    def convert(path: tuple[Any, ...], target: Any) -> Array:
        name = getattr(path[-1], "key", None)
        if target.dtype == jnp.int8:
            return _quantized(flat, shapes, path)[0]
        if isinstance(name, str) and name.endswith(SCALE_SUFFIX):
            values_path = (*path[:-1], jax.tree_util.DictKey(name[: -len(SCALE_SUFFIX)]))
            if values_path in shapes and shapes[values_path].dtype == jnp.int8:
                return _quantized(flat, shapes, values_path)[1]
        if path not in flat:
            raise ValueError(f"quantize_params: no float parameter at {_name(path)}")
        return flat[path]

    return jax.tree_util.tree_map_with_path(convert, quantized_shapes)


def _quantized(flat: dict, shapes: dict, path: tuple[Any, ...]) -> tuple[Array, Array]:
    """(int8 values, scale) of the float leaf at `path`, over its scale's size-1 axes."""
    if path not in flat:
        raise ValueError(f"quantize_params: no float parameter at {_name(path)}")
    scale_path = (*path[:-1], jax.tree_util.DictKey(path[-1].key + SCALE_SUFFIX))
    scale_shape = shapes[scale_path].shape
    float_leaf = flat[path]
    axes = [i for i, n in enumerate(scale_shape) if n == 1 and float_leaf.shape[i] != 1]
    return quantize_rows(float_leaf, axes)


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)
