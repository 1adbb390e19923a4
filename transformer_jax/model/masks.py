"""What may attend to what: one description per attention call, in each kernel's own form.

The Encoder and Decoder describe every attention call once: which query and key positions are
real (padding), which packed segment each belongs to, and whether it is causal. Each kernel
reads that description in its own form, all of them written here: a dense boolean mask for
einsum and jax.nn.dot_product_attention (`dense`, and `local_window`, which the latter also
takes), and segment ids plus a causal, local or full mask object for splash attention
(`splash_segments`, `splash_mask`). A new rule is added here once, in each form.
A cached decoding step's history is the cache's own (`cache.StepMask`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class AttentionMask:
    """Queries [B, T] may attend to keys [B, S]: both real, the same segment, causal if set.

    Segment ids are 1, 2, ... for packed examples and 0 for padding. When decoding, the
    cross-attention reads a source's W beam rows as one query row of W x T positions: the
    decoder then describes the queries in that grouped form.
    """

    q_valid: Array  # [B, T] bool
    k_valid: Array  # [B, S] bool
    q_segment: Array | None = None  # [B, T] int
    k_segment: Array | None = None  # [B, S] int
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    # Sliding window W: a query reads keys fewer than W positions away (only those before it,
    # and itself, when causal). Self-attention only: query and key rows share positions.
    window: int | None = flax.struct.field(pytree_node=False, default=None)

    def dense(self) -> Array:
        """Boolean [B, 1, T, S]: True where a query may read a key."""
        mask_BxTxS = self.q_valid[:, :, None] & self.k_valid[:, None, :]
        if self.q_segment is not None and self.k_segment is not None:
            mask_BxTxS &= self.q_segment[:, :, None] == self.k_segment[:, None, :]
        T, S = self.q_valid.shape[1], self.k_valid.shape[1]
        # Row index comparisons are right for packed rows too: segments are contiguous.
        if self.causal:
            mask_BxTxS &= jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
        if self.window is not None:
            mask_BxTxS &= jnp.abs(jnp.arange(T)[:, None] - jnp.arange(S)[None, :]) < self.window
        return mask_BxTxS[:, None, :, :]

    def local_window(self) -> tuple[int, int] | None:
        """(keys before, keys after) a query may read, as jax.nn.dot_product_attention's
        local_window_size and splash's LocalMask take it; None without a window."""
        if self.window is None:
            return None
        return (self.window - 1, 0 if self.causal else self.window - 1)

    def splash_segments(self) -> tuple[Array, Array]:
        """int32 segment ids (queries [B, T], keys [B, S]) that splash attention compares.

        Real positions keep their segment (1 when the row is not packed); padded keys get 0.
        No padded query may be left with no key to read (its softmax would be 0/0): without a
        window it takes the segment of the row's first key; with one (self-attention, where
        query and key positions coincide) it keeps 0 and reads the padded keys around it,
        itself included. Padded queries' outputs are never used (the loss masks them).
        """
        k_segment = self.k_valid.astype(jnp.int32)
        q_segment = self.q_valid.astype(jnp.int32)
        if self.k_segment is not None and self.q_segment is not None:
            k_segment = jnp.where(self.k_valid, self.k_segment, 0).astype(jnp.int32)
            q_segment = jnp.where(self.q_valid, self.q_segment, 0).astype(jnp.int32)
        if self.window is None:
            q_segment = jnp.where(self.q_valid, q_segment, k_segment[:, :1])
        return q_segment, k_segment

    def splash_mask(self, q_len: int, kv_len: int) -> Any:
        """Splash's mask object for one head over (padded) lengths: causal, window or full."""
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

        shape = (q_len, kv_len)
        window = self.local_window()
        if window is not None:  # splash skips the blocks outside it
            return sm.LocalMask(shape, window_size=window, offset=0)
        return sm.CausalMask(shape) if self.causal else sm.FullMask(shape)
