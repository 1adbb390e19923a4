"""The paper's optimizer (section 5.3): Adam(0.9, 0.98, 1e-9), warmup then 1/sqrt(step) decay."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax


def paper_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), for optimizer step >= 1.

    optax counts updates from 0, so update i uses paper step i + 1: the first update gets a
    small positive rate instead of 0, and the peak falls on update warmup - 1 (paper step warmup).
    """
    if d_model <= 0 or warmup_steps <= 0:
        raise ValueError(
            f"paper_schedule: d_model and warmup_steps must be positive, got {d_model}, "
            f"{warmup_steps}"
        )

    def schedule(count: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def make_optimizer(
    *,
    d_model: int,
    warmup_steps: int,
    learning_rate_scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-9,
    clip_norm: float | None = None,
    weight_decay: float = 0.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain: optional global-norm clipping, then Adam(W) under the paper schedule."""
    schedule = paper_schedule(d_model, warmup_steps, learning_rate_scale)
    parts: list[optax.GradientTransformation] = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay > 0:
        parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    else:
        parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
    return optax.chain(*parts), schedule


def optimizer_from_config(
    optim_config: Any, d_model: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """make_optimizer from a config's `optim` section (train.py and the AOT tool share it)."""
    return make_optimizer(
        d_model=d_model,
        warmup_steps=optim_config.warmup_steps,
        learning_rate_scale=optim_config.learning_rate_scale,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        clip_norm=optim_config.clip_norm,
        weight_decay=optim_config.weight_decay,
    )
