"""Label-smoothed cross-entropy over real target tokens (section 5.4), summed for exact means."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transformer_jax.config import PAD_ID

Array = jax.Array


def token_losses(
    logits_BxTxV: Array, targets_BxT: Array, label_smoothing: float
) -> tuple[Array, Array, Array]:
    """Per-token smoothed loss, NLL, and the real-token weights (targets that are not PAD)."""
    smoothed_BxT, nll_BxT = smoothed_cross_entropy(logits_BxTxV, targets_BxT, label_smoothing)
    weights_BxT = (targets_BxT != PAD_ID).astype(jnp.float32)
    return smoothed_BxT * weights_BxT, nll_BxT * weights_BxT, weights_BxT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def smoothed_cross_entropy(
    logits_BxTxV: Array, targets_BxT: Array, label_smoothing: float
) -> tuple[Array, Array]:
    """Cross-entropy against (1 - a) one_hot + a / V (optax.smooth_labels' targets), and the NLL.

    Expanded so that neither a [B, T, V] one-hot nor log-probabilities are built:
    NLL = lse - z_y and smoothed = (1 - a) NLL + a lse - (a / V) sum_v z_v. The hand-written
    gradient, softmax - (1 - a) one_hot - a / V, is one elementwise pass over the saved
    probabilities, where autodiff of log_softmax made several passes (and a second
    exponential) over [B, T, V].
    """
    smoothed_BxT, nll_BxT, _ = _cross_entropy_fwd_parts(logits_BxTxV, targets_BxT, label_smoothing)
    return smoothed_BxT, nll_BxT


def _cross_entropy_fwd_parts(
    logits_BxTxV: Array, targets_BxT: Array, label_smoothing: float
) -> tuple[Array, Array, Array]:
    """(smoothed, NLL, softmax probabilities); the probabilities are the backward residual."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    vocab = logits_BxTxV.shape[-1]
    max_BxT = jnp.max(logits_BxTxV, axis=-1)
    exp_BxTxV = jnp.exp(logits_BxTxV - max_BxT[..., None])
    sum_exp_BxT = jnp.sum(exp_BxTxV, axis=-1)
    lse_BxT = max_BxT + jnp.log(sum_exp_BxT)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    nll_BxT = lse_BxT - target_logit_BxT
    smoothed_BxT = (
        (1.0 - label_smoothing) * nll_BxT
        + label_smoothing * lse_BxT
        - (label_smoothing / vocab) * jnp.sum(logits_BxTxV, axis=-1)
    )
    probs_BxTxV = exp_BxTxV / sum_exp_BxT[..., None]
    return smoothed_BxT, nll_BxT, probs_BxTxV


def _cross_entropy_fwd(
    logits_BxTxV: Array, targets_BxT: Array, label_smoothing: float
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    smoothed_BxT, nll_BxT, probs_BxTxV = _cross_entropy_fwd_parts(
        logits_BxTxV, targets_BxT, label_smoothing
    )
    # The probabilities replace the logits as the saved residual (same size in the logits'
    # dtype), so the backward pass needs no second exponential over [B, T, V].
    return (smoothed_BxT, nll_BxT), (probs_BxTxV.astype(logits_BxTxV.dtype), targets_BxT)


def _cross_entropy_bwd(
    label_smoothing: float,
    residuals: tuple[Array, Array],
    cotangents: tuple[Array, Array],
) -> tuple[Array, None]:
    probs_BxTxV, targets_BxT = residuals
    d_smoothed_BxT, d_nll_BxT = cotangents
    vocab = probs_BxTxV.shape[-1]
    # d smoothed / dz = p - (1 - a) one_hot - a / V and d NLL / dz = p - one_hot; the one-hot
    # is a comparison with an iota that XLA fuses into the same pass.
    is_target_BxTxV = (
        jax.lax.broadcasted_iota(jnp.int32, probs_BxTxV.shape, 2) == targets_BxT[..., None]
    )
    on_target_BxT = (1.0 - label_smoothing) * d_smoothed_BxT + d_nll_BxT
    d_logits_BxTxV = (
        (d_smoothed_BxT + d_nll_BxT)[..., None] * probs_BxTxV.astype(jnp.float32)
        - jnp.where(is_target_BxTxV, on_target_BxT[..., None], 0.0)
        - (label_smoothing / vocab) * d_smoothed_BxT[..., None]
    )
    return d_logits_BxTxV.astype(probs_BxTxV.dtype), None


smoothed_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def loss_sums(logits_BxTxV: Array, targets_BxT: Array, label_smoothing: float) -> dict[str, Array]:
    """Sums over the batch; divide by 'num_tokens' for per-token means (packing-invariant)."""
    smoothed, nll, weights = token_losses(logits_BxTxV, targets_BxT, label_smoothing)
    return {"loss_sum": smoothed.sum(), "nll_sum": nll.sum(), "num_tokens": weights.sum()}


def summarize(sums: dict[str, Array]) -> dict[str, Array]:
    """Per-token loss, NLL and perplexity from summed metrics."""
    tokens = jnp.maximum(sums["num_tokens"], 1.0)
    nll = sums["nll_sum"] / tokens
    return {"loss": sums["loss_sum"] / tokens, "nll": nll, "perplexity": jnp.exp(nll)}
