"""Autoregressive decoding with the model's KV cache: greedy, sampling and beam search.

Shape letters follow the model's glossary (B batch, S source length, T target length = the
static max_length of the output buffer and of the self-attention cache, D d_model, V vocab),
plus W = beam size and BW = the batch and beam axes flattened row-major (row b, beam w at
b * W + w). Every decoder is a pure function of arrays looping with jax.lax.while_loop; jit it
with max_length (and beam_size, alpha, temperature, top_k) static.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.model import Transformer, init_cache, reorder_cache

Array = jax.Array


def length_penalty(length: ArrayLike, alpha: float) -> Array:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (section 6.1 uses alpha = 0.6)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def output_limits(src_ids_BxS: Array, extra_length: int, max_length: int) -> Array:
    """Per-sentence output cap: source length + extra_length (section 6.1 uses +50)."""
    src_len_B = jnp.sum(src_ids_BxS != PAD_ID, axis=-1)
    return jnp.minimum(src_len_B + extra_length, max_length)


def _allowed_tokens(step: Array, limit_B: Array, vocab_size: int, min_length: ArrayLike) -> Array:
    """[B, V] mask of ids that may be emitted at `step` (0-based output position).

    PAD and BOS are never emitted: a PAD inside a sentence would read as its end, and BOS is
    only the decoder's start token. EOS waits for min_length; at the cap EOS is the only choice.
    """
    ids_V = jnp.arange(vocab_size)
    is_eos_V = ids_V == EOS_ID
    ordinary_V = (ids_V != PAD_ID) & (ids_V != BOS_ID) & ~(is_eos_V & (step < min_length))
    at_cap_B = step + 1 >= limit_B
    return jnp.where(at_cap_B[:, None], is_eos_V[None, :], ordinary_V[None, :])


def _encode_and_cache(
    model: Transformer, params: Any, src_ids_BxS: Array, max_length: int, copies: int
) -> tuple[Array, Array, Any]:
    """Encode once, repeat the encoder output and source `copies` times per row, build the cache."""
    encoded_BxSxD: Array = model.apply({"params": params}, src_ids_BxS, method=Transformer.encode)  # type: ignore[assignment]
    if copies > 1:
        encoded_BxSxD = jnp.repeat(encoded_BxSxD, copies, axis=0)
        src_ids_BxS = jnp.repeat(src_ids_BxS, copies, axis=0)
    # Under jit the sizing pass inside init_cache is dead code except the cross-attention
    # projection; XLA drops the rest, so building the cache costs one projection per layer.
    cache = init_cache(model, params, encoded_BxSxD, src_ids_BxS, max_length)
    return encoded_BxSxD, src_ids_BxS, cache


def _decoder_step(
    model: Transformer,
    params: Any,
    cache: Any,
    encoded_BxSxD: Array,
    src_ids_BxS: Array,
    previous_B: Array,
) -> tuple[Array, Any]:
    """One cached decoder step: float32 logits [B, V] for the token after previous_B."""
    logits_Bx1xV, mutated = model.apply(
        {"params": params, "cache": cache},
        encoded_BxSxD,
        src_ids_BxS,
        previous_B[:, None],
        decode=True,
        mutable=["cache"],
        method=Transformer.decode,
    )
    return logits_Bx1xV[:, 0], mutated["cache"]  # type: ignore[index]


def _sequential_decode(
    model: Transformer,
    params: Any,
    src_ids_BxS: Array,
    choose: Callable[[Array, Array], Array],
    *,
    max_length: int,
    extra_length: int,
    min_length: int,
) -> Array:
    """One token per step per sentence, picked by choose(step, masked_logits_BxV) -> [B]."""
    B = src_ids_BxS.shape[0]
    encoded_BxSxD, src_ids_BxS, cache = _encode_and_cache(
        model, params, src_ids_BxS, max_length, copies=1
    )
    limit_B = output_limits(src_ids_BxS, extra_length, max_length)

    def step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, cache, previous_B, finished_B, out_BxT = carry
        logits_BxV, cache = _decoder_step(
            model, params, cache, encoded_BxSxD, src_ids_BxS, previous_B
        )
        allowed_BxV = _allowed_tokens(i, limit_B, logits_BxV.shape[-1], min_length)
        token_B = choose(i, jnp.where(allowed_BxV, logits_BxV, -jnp.inf)).astype(jnp.int32)
        token_B = jnp.where(finished_B, PAD_ID, token_B)
        out_BxT = jax.lax.dynamic_update_slice(out_BxT, token_B[:, None], (0, i))
        finished_B = finished_B | (token_B == EOS_ID)
        return i + 1, cache, token_B, finished_B, out_BxT

    def not_done(carry: tuple[Any, ...]) -> Array:
        i, _, _, finished_B, _ = carry
        return (i < max_length) & ~jnp.all(finished_B)

    init = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.full((B,), BOS_ID, jnp.int32),
        jnp.zeros((B,), bool),
        jnp.full((B, max_length), PAD_ID, jnp.int32),
    )
    return jax.lax.while_loop(not_done, step, init)[-1]


def greedy_decode(
    model: Transformer,
    params: Any,
    src_ids_BxS: Array,
    *,
    max_length: int,
    extra_length: int = 50,
    min_length: int = 0,
) -> Array:
    """Argmax decoding: [B, max_length] ids, EOS included, PAD after it. Jit with static max_length.

    The encoder runs once; cross-attention keys/values are projected once into the cache; each
    step feeds the previous token and stops when every sentence has emitted EOS or hit its cap
    (source length + extra_length, at most max_length). min_length blocks EOS before that many
    tokens (benchmarks use it to force the output length).
    """

    def argmax(_: Array, logits_BxV: Array) -> Array:
        return jnp.argmax(logits_BxV, axis=-1)

    return _sequential_decode(
        model,
        params,
        src_ids_BxS,
        argmax,
        max_length=max_length,
        extra_length=extra_length,
        min_length=min_length,
    )


def sample_decode(
    model: Transformer,
    params: Any,
    src_ids_BxS: Array,
    rng: Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    max_length: int,
    extra_length: int = 50,
    min_length: int = 0,
) -> Array:
    """Ancestral sampling from softmax(logits / temperature), optionally from the top_k ids only.

    Same output format and caps as greedy_decode; temperature 0 or top_k 1 is greedy decoding.
    """
    if temperature < 0:
        raise ValueError(f"sample_decode: temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"sample_decode: top_k must be >= 0 (0 = no cut), got {top_k}")

    def sample(i: Array, logits_BxV: Array) -> Array:
        if temperature == 0:
            return jnp.argmax(logits_BxV, axis=-1)
        logits_BxV = logits_BxV / temperature
        if top_k > 0:
            kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
            logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
        # A fresh key per step from the step index: no key to carry through the loop.
        return jax.random.categorical(jax.random.fold_in(rng, i), logits_BxV, axis=-1)

    return _sequential_decode(
        model,
        params,
        src_ids_BxS,
        sample,
        max_length=max_length,
        extra_length=extra_length,
        min_length=min_length,
    )


@flax.struct.dataclass
class BeamState:
    """The beam search loop's carry: W alive and W finished hypotheses per sentence."""

    step: Array  # [] int32: tokens decoded so far (the output position being filled)
    cache: Any  # the decoder's KV cache, one row per (sentence, alive beam)
    last_BxW: Array  # [B, W] int32: each alive hypothesis's latest token
    alive_seqs_BxWxT: Array  # [B, W, T] int32: alive hypotheses, PAD after the last token
    alive_logp_BxW: Array  # [B, W] float32: their log-probabilities, best first
    done_seqs_BxWxT: Array  # [B, W, T] int32: finished hypotheses (ending in EOS)
    done_score_BxW: Array  # [B, W] float32: their length-penalized scores, best first


def beam_search(
    model: Transformer,
    params: Any,
    src_ids_BxS: Array,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_length: int,
    extra_length: int = 50,
    min_length: int = 0,
) -> tuple[Array, Array]:
    """Beam search with the GNMT length penalty and early stopping (section 6.1).

    Keeps W alive and W finished hypotheses per sentence (tensor2tensor / flax WMT style): each
    step takes the best 2W one-token extensions, so at least W of them did not end in EOS. A
    finished hypothesis scores log P(Y|X) / length_penalty(|Y|, alpha), |Y| counting its EOS.
    A hypothesis reaching the sentence's cap (source length + extra_length, at most max_length)
    can only emit EOS; before min_length tokens EOS is blocked. The loop stops once no
    sentence's best alive log-prob, divided by the length penalty at its cap (the best it could
    still score), beats its worst finished score.

    Returns:
      ([B, max_length] int32 best hypothesis per sentence, EOS then PAD; [B] float32 its score).
      A sentence with no finished hypothesis gets its best alive one, scored at its length.
    """
    if beam_size < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {beam_size}")
    if alpha < 0:
        # The early-stop bound needs a penalty that grows with length.
        raise ValueError(f"beam_search: alpha must be >= 0, got {alpha}")
    B, W, T = src_ids_BxS.shape[0], beam_size, max_length
    encoded_BWxSxD, src_ids_BWxS, cache = _encode_and_cache(
        model, params, src_ids_BxS, max_length, copies=W
    )
    limit_B = output_limits(src_ids_BxS, extra_length, max_length)
    best_possible_lp_B = length_penalty(limit_B, alpha)
    rows_Bx1 = jnp.arange(B)[:, None]

    def step(state: BeamState) -> BeamState:
        i = state.step
        logits_BWxV, cache = _decoder_step(
            model, params, state.cache, encoded_BWxSxD, src_ids_BWxS, state.last_BxW.reshape(B * W)
        )
        V = logits_BWxV.shape[-1]
        logp_BxWxV = jax.nn.log_softmax(logits_BWxV).reshape(B, W, V)
        # Masked after the softmax, not renormalized: scores stay the model's own log-probs.
        allowed_BxV = _allowed_tokens(i, limit_B, V, min_length)
        logp_BxWxV = jnp.where(allowed_BxV[:, None, :], logp_BxWxV, -jnp.inf)
        total_BxWV = (state.alive_logp_BxW[:, :, None] + logp_BxWxV).reshape(B, W * V)
        cand_logp_Bx2W, cand_index_Bx2W = jax.lax.top_k(total_BxWV, 2 * W)
        cand_parent_Bx2W = cand_index_Bx2W // V
        cand_token_Bx2W = (cand_index_Bx2W % V).astype(jnp.int32)
        cand_seqs_Bx2WxT = jax.lax.dynamic_update_slice(
            state.alive_seqs_BxWxT[rows_Bx1, cand_parent_Bx2W],
            cand_token_Bx2W[:, :, None],
            (0, 0, i),
        )
        cand_eos_Bx2W = cand_token_Bx2W == EOS_ID

        # Alive: the best W extensions that did not end (each parent gives at most one EOS).
        alive_logp_BxW, pick_BxW = jax.lax.top_k(
            jnp.where(cand_eos_Bx2W, -jnp.inf, cand_logp_Bx2W), W
        )
        parent_BxW = cand_parent_Bx2W[rows_Bx1, pick_BxW]

        # Finished: merge the new EOS extensions into the W best so far.
        cand_score_Bx2W = jnp.where(
            cand_eos_Bx2W, cand_logp_Bx2W / length_penalty(i + 1, alpha), -jnp.inf
        )
        done_score_BxW, keep_BxW = jax.lax.top_k(
            jnp.concatenate([state.done_score_BxW, cand_score_Bx2W], axis=1), W
        )
        done_seqs_BxWxT = jnp.concatenate([state.done_seqs_BxWxT, cand_seqs_Bx2WxT], axis=1)[
            rows_Bx1, keep_BxW
        ]
        return BeamState(
            step=i + 1,
            cache=reorder_cache(model.config, cache, (rows_Bx1 * W + parent_BxW).reshape(B * W)),
            last_BxW=cand_token_Bx2W[rows_Bx1, pick_BxW],
            alive_seqs_BxWxT=cand_seqs_Bx2WxT[rows_Bx1, pick_BxW],
            alive_logp_BxW=alive_logp_BxW,
            done_seqs_BxWxT=done_seqs_BxWxT,
            done_score_BxW=done_score_BxW,
        )

    def not_done(state: BeamState) -> Array:
        # Both are sorted best first (top_k): compare the best alive with the worst finished.
        best_alive_B = state.alive_logp_BxW[:, 0] / best_possible_lp_B
        can_improve_B = best_alive_B > state.done_score_BxW[:, -1]
        return (state.step < max_length) & jnp.any(can_improve_B)

    # Beams start identical; only beam 0 is live so the first step does not pick duplicates.
    init = BeamState(
        step=jnp.array(0, jnp.int32),
        cache=cache,
        last_BxW=jnp.full((B, W), BOS_ID, jnp.int32),
        alive_seqs_BxWxT=jnp.full((B, W, T), PAD_ID, jnp.int32),
        alive_logp_BxW=jnp.tile(jnp.array([0.0] + [-jnp.inf] * (W - 1), jnp.float32), (B, 1)),
        done_seqs_BxWxT=jnp.full((B, W, T), PAD_ID, jnp.int32),
        done_score_BxW=jnp.full((B, W), -jnp.inf, jnp.float32),
    )
    final = jax.lax.while_loop(not_done, step, init)
    has_finished_B = final.done_score_BxW[:, 0] > -jnp.inf
    seqs_BxT = jnp.where(
        has_finished_B[:, None], final.done_seqs_BxWxT[:, 0], final.alive_seqs_BxWxT[:, 0]
    )
    score_B = jnp.where(
        has_finished_B,
        final.done_score_BxW[:, 0],
        final.alive_logp_BxW[:, 0] / length_penalty(final.step, alpha),
    )
    return seqs_BxT, score_B
