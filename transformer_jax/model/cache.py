"""The decoding cache, owned here: its layout, the write of one step, growth and beam reorders.

Self-attention keeps each source's rows (beam search's hypotheses) side by side in the layout
attention reads, [B sources, G heads, W x C slots, K]: slot w * C + c holds the key that
physical row w wrote at step c. Beam search never moves these buffers. A hypothesis that takes
over another's history takes over its row of the decoder-level BEAM_ORIGIN table instead
([B * W, C] int32: for each row and slot, the physical row holding its key), and the step's
mask (`StepMask`) hides every (physical row, slot) pair that is not in the hypothesis's own
history. So a step reads each cached key once, with no gather and no transpose; the W queries
of a source share one matrix product. Cross-attention caches its keys and values of the
encoder output, one copy per source, projected on the cache-creating call.

The step is counted once, by the decoder (`DecoderSteps`): its `position` is the step every
layer writes, handed to the layers inside the step's `StepMask` with the slot it goes to. With
a sliding window of A positions (config.attention_window) the cache is a ring: its capacity
stops at A slots and step i writes slot i mod A, so a decode's memory stops growing with its
length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from transformer_jax.model.quant import SCALE_SUFFIX, Int8Array, quantize_rows

Array = jax.Array

CACHED_KEY, CACHED_VALUE = "cached_key", "cached_value"
# With config.kv_cache == "int8" keys and values are int8 and these hold their float32 scales,
# one per (row, head, slot): [B, G, W x C].
CACHED_KEY_SCALE, CACHED_VALUE_SCALE = CACHED_KEY + SCALE_SUFFIX, CACHED_VALUE + SCALE_SUFFIX
CROSS_KEY, CROSS_VALUE = "cross_key", "cross_value"
BEAM_ORIGIN = "beam_origin"
POSITION = "position"
# The leaves a beam reorder gathers (axis 0: one row per hypothesis).
PER_ROW_CACHE = frozenset({BEAM_ORIGIN})
# Each growing leaf's slot axis (before any leading layer axis that nn.scan adds): W blocks
# of C slots for keys and values, C slots for the origin table.
CACHE_SLOT_AXIS = {
    CACHED_KEY: 2,
    CACHED_VALUE: 2,
    CACHED_KEY_SCALE: 2,
    CACHED_VALUE_SCALE: 2,
    BEAM_ORIGIN: 1,
}
# The cache's first capacity; it doubles from here up to max_length.
FIRST_CAPACITY = 16


@flax.struct.dataclass
class StepMask:
    """One cached self-attention step: query row b * W + w reads the slots of its own history.

    origin is the decoder's BEAM_ORIGIN table [B * W, C]; index is the step and slot the slot
    it writes (the same until a windowed cache wraps around its C slots); slots not written
    yet, and with a window of A those A or more steps back, are hidden.
    """

    origin: Array  # [B * W, C] int32
    index: Array  # [] int32
    slot: Array  # [] int32
    copies: int = flax.struct.field(pytree_node=False, default=1)
    window: int | None = flax.struct.field(pytree_node=False, default=None)

    def slot_steps(self) -> Array:
        """[C] int32: the step whose keys each slot holds (negative: not written yet)."""
        C = self.origin.shape[1]
        if self.window is None:
            return jnp.arange(C, dtype=jnp.int32)
        # A ring: slot c holds the latest step s <= index with s = c (mod C).
        return self.index - jnp.mod(self.index - jnp.arange(C, dtype=jnp.int32), C)

    def slot_positions(self) -> Array:
        """[W * C] int32: the position of every cache slot, in the cache's W x C layout."""
        return jnp.tile(self.slot_steps(), self.copies)

    def dense(self) -> Array:
        """Boolean [B, 1, W, W * C] over the cache's slots."""
        R, C = self.origin.shape
        W = self.copies
        if self.window is None:
            written_C = jnp.arange(C) <= self.index
        else:
            steps_C = self.slot_steps()
            written_C = (steps_C >= 0) & (self.index - steps_C < self.window)
        origin_BxWxC = self.origin.reshape(R // W, W, C)
        rows_1x1xWx1 = jnp.arange(W)[None, None, :, None]
        ours_BxWxWxC = (origin_BxWxC[:, :, None, :] == rows_1x1xWx1) & written_C
        return ours_BxWxWxC.reshape(R // W, 1, W, W * C)


class DecoderSteps:
    """The decoder's side of the cache: the step counter and the beam-origin table.

    With a sliding window of A positions the cache is a ring: once it holds A slots (its last
    capacity, see `capacities`), step i writes slot i mod A, so memory stops growing with the
    output.
    """

    def __init__(self, module: nn.Module, window: int | None) -> None:
        self.module = module
        self.window = window

    @property
    def stepping(self) -> bool:
        """True once the cache exists: each call then decodes one step."""
        return self.module.has_variable("cache", POSITION)

    def create(self, rows: int, capacity: int) -> None:
        """On the cache-creating call: step 0 and an origin table of `capacity` slots per row."""
        self.module.variable("cache", POSITION, lambda: jnp.array(0, jnp.int32))
        self.module.variable("cache", BEAM_ORIGIN, jnp.zeros, (rows, capacity), jnp.int32)

    def step(self, rows: int, copies: int) -> tuple[Array, StepMask]:
        """Count one step; (its position, the self-attention mask of every row's history)."""
        position: nn.Variable[Array] = self.module.variable("cache", POSITION)
        index = position.value
        position.value = index + 1
        origin: nn.Variable[Array] = self.module.variable("cache", BEAM_ORIGIN)
        if origin.value.shape[0] != rows:
            raise ValueError(
                f"decode: {rows} rows step a cache made for {origin.value.shape[0]}; build it "
                "with init_cache(..., copies=rows/source)"
            )
        slot = index if self.window is None else jnp.mod(index, origin.value.shape[1])
        # Each row writes this step's keys into its own physical row of the cache.
        own_Rx1 = (jnp.arange(rows, dtype=jnp.int32) % copies)[:, None]
        origin.value = jax.lax.dynamic_update_slice(
            origin.value, own_Rx1, (jnp.array(0, jnp.int32), slot)
        )
        return index, StepMask(origin.value, index, slot, copies, self.window)


class KVCache:
    """One self-attention layer's keys and values: [B, G, W x C, K] in the module's cache.

    With config.kv_cache == "int8" they are stored as int8, each (row, head, slot) vector with
    its own float32 scale (symmetric, max|x| / 127: model/quant.py), and `write` hands attention
    the int8 values with their scales (`Int8Array`). Bytes per cached token and layer:
    2 G (K + 4) against 2 G K x 2 (bfloat16) or x 4 (float32); see `bytes_per_token`.
    """

    def __init__(self, module: nn.Module, key_RxTxGxK: Array, copies: int) -> None:
        R, T, G, K = key_RxTxGxK.shape
        shape = (R // copies, G, copies * T, K)  # T is the capacity on the sizing call
        self.dtype = key_RxTxGxK.dtype
        self.int8 = module.config.kv_cache == "int8"
        stored = jnp.int8 if self.int8 else self.dtype
        self.key = module.variable("cache", CACHED_KEY, jnp.zeros, shape, stored)
        self.value = module.variable("cache", CACHED_VALUE, jnp.zeros, shape, stored)
        if self.int8:
            # [B, G, S]: slots as the minor axis, so a TPU tiles the scales densely (a trailing
            # axis of 1 would be padded to 128 lanes, costing more than the values saved).
            scales = shape[:3]
            self.key_scale = module.variable(
                "cache", CACHED_KEY_SCALE, jnp.ones, scales, jnp.float32
            )
            self.value_scale = module.variable(
                "cache", CACHED_VALUE_SCALE, jnp.ones, scales, jnp.float32
            )
        self.copies = copies

    def write(
        self, key_RxTxGxK: Array, value_RxTxGxK: Array, slot: Array
    ) -> tuple[Array | Int8Array, Array | Int8Array]:
        """Store one step's keys and values at `slot` of every row; the whole cache (as stored)."""
        _, T, G, _ = key_RxTxGxK.shape
        if T != 1:
            raise ValueError(
                f"decode=True takes one target step per call after the cache is created; got "
                f"{T} steps"
            )
        W = self.copies
        B, S = self.key.value.shape[0], self.key.value.shape[2]
        C, zero = S // W, jnp.array(0, jnp.int32)

        def write(cache_BxGxSx_: Array, new_RxTxGx_: Array) -> Array:
            # [B, G, S, K] keys or values, or [B, G, S] scales.
            new_BxGxWx_ = new_RxTxGx_.reshape(B, W, G, *cache_BxGxSx_.shape[3:]).swapaxes(1, 2)
            # One in-place update per row: writing a [B, G, W, 1, K] view of the cache instead
            # makes XLA:CPU fuse the update into both its readers and copy the cache per step.
            for w in range(W):
                start = (zero, zero, w * C + slot, *[zero] * (cache_BxGxSx_.ndim - 3))
                cache_BxGxSx_ = jax.lax.dynamic_update_slice(
                    cache_BxGxSx_, new_BxGxWx_[:, :, w : w + 1], start
                )
            return cache_BxGxSx_

        if not self.int8:
            self.key.value = write(self.key.value, key_RxTxGxK)
            self.value.value = write(self.value.value, value_RxTxGxK)
            return self.key.value, self.value.value
        stored = []
        for values, scales, new_RxTxGxK in (
            (self.key, self.key_scale, key_RxTxGxK),
            (self.value, self.value_scale, value_RxTxGxK),
        ):
            new_q, new_scale = quantize_rows(new_RxTxGxK, [3])
            values.value = write(values.value, new_q)
            scales.value = write(scales.value, new_scale[..., 0])
            # Handed over as stored: the step's attention applies the scales to its scores and
            # probabilities, so no float copy of the cache is made (kernels.cached_step_attention).
            stored.append(Int8Array(values.value, scales.value))
        return stored[0], stored[1]


def bytes_per_token(config: Any, cache_dtype: Any = None) -> int:
    """Self-attention cache bytes one decoded token adds per row (all decoder layers).

    2 (keys and values) x layers x G heads x K, times the element size: config.dtype's, or 1
    plus 4 for the float32 scale with kv_cache="int8". Cross-attention's cache is per source,
    not per token.
    """
    per_vector = (
        config.head_dim + 4
        if config.kv_cache == "int8"
        else config.head_dim * jnp.dtype(cache_dtype or config.dtype).itemsize
    )
    return 2 * config.num_decoder_layers * config.kv_heads * per_vector


def cross_memory(
    module: nn.Module, project: Callable[[], tuple[Array, Array]]
) -> tuple[Array, Array]:
    """Cross-attention keys/values: projected on the cache-creating call, then reused.

    With config.kv_cache == "int8" they are kept as int8 with a float32 scale per (source
    token, head), as the self-attention cache is, and handed out dequantized.
    """
    int8 = module.config.kv_cache == "int8"
    if not module.has_variable("cache", CROSS_KEY):
        for name, projected_BxSxGxK in zip((CROSS_KEY, CROSS_VALUE), project(), strict=True):
            if int8:
                projected_BxSxGxK, scale_BxSxGx1 = quantize_rows(projected_BxSxGxK, [3])
                # [B, G, S], lane-dense on a TPU as the self-attention cache's scales.
                module.put_variable(
                    "cache", name + SCALE_SUFFIX, scale_BxSxGx1[..., 0].swapaxes(1, 2)
                )
            module.put_variable("cache", name, projected_BxSxGxK)
    stored = []
    for name in (CROSS_KEY, CROSS_VALUE):
        x_BxSxGxK: Array = module.get_variable("cache", name)
        if int8:
            scale_BxGxS: Array = module.get_variable("cache", name + SCALE_SUFFIX)
            x_BxSxGxK = x_BxSxGxK.astype(jnp.float32) * scale_BxGxS.swapaxes(1, 2)[..., None]
            x_BxSxGxK = x_BxSxGxK.astype(jnp.dtype(module.config.dtype))
        stored.append(x_BxSxGxK)
    return stored[0], stored[1]


def capacities(max_length: int, window: int | None = None) -> list[int]:
    """The cache sizes a decode may pass through: 16, 32, ... and the largest last.

    The largest is max_length, or the window when it is shorter (a ring of W slots, which the
    last stage of the decoding loop keeps using to the end). The last doubling stops where the
    largest is within 1.5x, so a buffer of 129 (128 tokens and EOS) ends 64 -> 129 rather than
    64 -> 128 -> 129 (one more copy for one more step).
    """
    largest = max_length if window is None else min(window, max_length)
    sizes = []
    capacity = min(FIRST_CAPACITY, largest)
    while capacity * 3 < largest * 2:
        sizes.append(capacity)
        capacity *= 2
    return [*sizes, largest]


def _row_axis(path: tuple[Any, ...]) -> int:
    """A cache leaf's axes start at 0, or 1 under nn.scan (its leading axis is the layer).

    Read from the leaf's path (a scanned stack's scope is named "layers"), so one cache may
    hold scanned and unscanned members (an Ensemble of both). Every axis this module names is
    offset by it.
    """
    return 1 if any(getattr(k, "key", None) == "layers" for k in path) else 0


def reorder_cache(cache: dict, rows_R: Array) -> dict:
    """The cache with row r taking over the history of row rows_R[r] (a beam reorder).

    Only the small per-row tables (PER_ROW_CACHE) move; the keys and values stay.
    """

    def reorder(path: tuple[Any, ...], leaf: Array) -> Array:
        if getattr(path[-1], "key", None) not in PER_ROW_CACHE:
            return leaf
        # Indices are in range by construction; "clip" skips the default "fill" mode's masking.
        return jnp.take(leaf, rows_R, axis=_row_axis(path), mode="clip")

    return jax.tree_util.tree_map_with_path(reorder, cache)


def grow_cache(cache: dict, capacity: int) -> dict:
    """The cache with capacity slots per row: its growing leaves padded along their slot axis.

    The new slots are never read before they are written: each step's mask stops at its index.
    """
    origins = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
        if getattr(path[-1], "key", None) == BEAM_ORIGIN
    ]
    if not origins:
        raise ValueError("grow_cache: not a decoding cache (no beam_origin leaf); see init_cache")
    old = origins[0].shape[-1]

    def grow(path: tuple[Any, ...], leaf: Array) -> Array:
        name = getattr(path[-1], "key", None)
        if name not in CACHE_SLOT_AXIS:
            return leaf
        axis = _row_axis(path) + CACHE_SLOT_AXIS[name]
        # Keys and values hold one block of `old` slots per row of the source: pad each block.
        blocks = leaf.shape[axis] // old
        blocked = leaf.reshape(*leaf.shape[:axis], blocks, old, *leaf.shape[axis + 1 :])
        pad = [(0, 0)] * blocked.ndim
        pad[axis + 1] = (0, capacity - old)
        return jnp.pad(blocked, pad).reshape(
            *leaf.shape[:axis], blocks * capacity, *leaf.shape[axis + 1 :]
        )

    return jax.tree_util.tree_map_with_path(grow, cache)


def init_cache(
    model: nn.Module,
    params: dict,
    encoded_BxSxD: Any,
    src_ids_BxS: Array,
    max_length: int,
    copies: int = 1,
) -> dict:
    """Create the decoding cache for a batch: self-attention slots and projected encoder output.

    model is a Transformer or anything with its encode/decode methods (an Ensemble). With
    copies = k the self-attention cache holds k rows per source (beams) and the projected
    encoder output one.
    """
    dummy_BxT = jnp.zeros((src_ids_BxS.shape[0] * copies, max_length), jnp.int32)
    _, variables = model.apply(
        {"params": params},
        encoded_BxSxD,
        src_ids_BxS,
        dummy_BxT,
        decode=True,
        mutable=["cache"],
        method="decode",
    )
    return variables["cache"]
