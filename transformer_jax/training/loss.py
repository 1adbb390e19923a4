"""Label-smoothed cross-entropy over real target tokens (section 5.4), summed for exact means."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.config import PAD_ID

Array = jax.Array


def token_losses(
    logits_BxTxV: Array, targets_BxT: Array, label_smoothing: float
) -> tuple[Array, Array, Array]:
    """Per-token smoothed loss, NLL, and the real-token weights (targets that are not PAD)."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    vocab = logits_BxTxV.shape[-1]
    log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    nll_BxT = -jnp.take_along_axis(log_probs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    # Cross-entropy with optax.smooth_labels' targets (1 - a) one_hot + a / V, expanded so no
    # [B, T, V] one-hot is built: (1 - a) NLL - (a / V) sum_v log p_v.
    smoothed_BxT = (1.0 - label_smoothing) * nll_BxT - (label_smoothing / vocab) * jnp.sum(
        log_probs_BxTxV, axis=-1
    )
    weights_BxT = (targets_BxT != PAD_ID).astype(jnp.float32)
    return smoothed_BxT * weights_BxT, nll_BxT * weights_BxT, weights_BxT


def loss_sums(logits_BxTxV: Array, targets_BxT: Array, label_smoothing: float) -> dict[str, Array]:
    """Sums over the batch; divide by 'num_tokens' for per-token means (packing-invariant)."""
    smoothed, nll, weights = token_losses(logits_BxTxV, targets_BxT, label_smoothing)
    return {"loss_sum": smoothed.sum(), "nll_sum": nll.sum(), "num_tokens": weights.sum()}


def summarize(sums: dict[str, Array]) -> dict[str, Array]:
    """Per-token loss, NLL and perplexity from summed metrics."""
    tokens = jnp.maximum(sums["num_tokens"], 1.0)
    nll = sums["nll_sum"] / tokens
    return {"loss": sums["loss_sum"] / tokens, "nll": nll, "perplexity": jnp.exp(nll)}
