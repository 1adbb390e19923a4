"""Positions that act inside self-attention: rotary (RoPE) and linear biases (ALiBi).

Both see only position ids, never a table, so a packed row's examples each start at 0 and a
cached decoding step sits at its absolute step; both depend on positions only through their
differences, so they encode relative position.

- RoPE (Su et al., "RoFormer", 2021), rotate-half pairing: channel i of a head is paired with
  channel i + K/2 (the layout of GPT-NeoX, Hugging Face Llama and MaxText's default), and the
  pair is rotated by position * theta^(-2i/K). The interleaved form (RoFormer's, GPT-J's)
  pairs 2i with 2i + 1; weights move between the two by permuting the query and key
  projections' output channels.
- ALiBi (Press et al., "Train Short, Test Long", 2022): score(i, j) -= m_h |i - j|, with the
  paper's head slopes m_h: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads when n
  is a power of two; otherwise those of the largest power of two below n, then every other
  slope of twice that count (the paper's code, `get_slopes`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def rope(x_BxLxNxK: Array, positions_BxL: Array, theta: float) -> Array:
    """x with each head's channel pairs (i, i + K/2) rotated by position * theta^(-2i/K)."""
    K = x_BxLxNxK.shape[-1]
    half = K // 2
    inv_freq_I = np.exp(-np.log(theta) * np.arange(half, dtype=np.float32) * 2.0 / K)
    angles_BxLx1xI = positions_BxL.astype(jnp.float32)[:, :, None, None] * inv_freq_I
    cos, sin = jnp.cos(angles_BxLx1xI), jnp.sin(angles_BxLx1xI)
    # In float32 whatever the compute dtype: the angle of a far position must not round.
    x1, x2 = x_BxLxNxK[..., :half].astype(jnp.float32), x_BxLxNxK[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxK.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The ALiBi paper's per-head slopes m_h (float32 [num_heads])."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        below = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(below) + power_of_two(2 * below)[0::2][: num_heads - below]
    return np.asarray(slopes, np.float32)


def alibi_bias(q_positions_BxT: Array, k_positions_BxS: Array, num_heads: int) -> Array:
    """-m_h |i - j| as a float32 [B, H, T, S] bias on the attention scores."""
    distance_BxTxS = jnp.abs(
        q_positions_BxT[:, :, None].astype(jnp.float32)
        - k_positions_BxS[:, None, :].astype(jnp.float32)
    )
    slopes_1xHx1x1 = jnp.asarray(alibi_slopes(num_heads))[None, :, None, None]
    return -slopes_1xHx1x1 * distance_BxTxS[:, None]
