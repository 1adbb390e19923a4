"""Autoregressive decoding with the model's KV cache: greedy, sampling and beam search.

Shape letters follow the model's glossary (B batch, S source length, T target length = the
static max_length of the output, D d_model, V vocab), plus W = beam size, N = hypotheses
returned per sentence, C = the self-attention cache's current capacity, and BW = the batch and
beam axes flattened row-major (row b, beam w at b * W + w). Every decoder is a pure function of
arrays; jit it with max_length (and beam_size, alpha, temperature, top_k) static.

Work follows the tokens decoded, not the output buffer. The cache starts with 16 slots and
doubles (up to max_length) when the longest open hypothesis fills it: the decoding loop is a
chain of jax.lax.while_loops, one per capacity, and each next one (with the cache copied into
the larger buffer) runs only if some sentence is still open (jax.lax.cond), so a batch that
ends early never touches the long buffers. Masked slots contribute exactly zero to attention,
so the tokens are those of decoding into one buffer of max_length slots. With a sliding
window the doubling stops at the window's size, and that last buffer is a ring each step
overwrites in turn (model/cache.py): the tokens are those of a max_length buffer read
through the window.

Beam search keeps, per step, only what a step needs: each beam's 2W best next tokens are found
first, then the joint best 2W among those W x 2W (not among W x V); every step writes the
chosen tokens and their parent beams into [T, B, W] tables instead of gathering whole
sequences, and the hypotheses are read back once at the end by following the parents. The
cache never moves either: a reorder gathers only the decoder's small beam_origin table, and
attention masks each hypothesis to its own history (model/cache.py). The loop stops as
soon as the hypotheses it returns can no longer change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.model import Decodable, grow_cache, init_cache, reorder_cache
from transformer_jax.model.cache import capacities as cache_capacities

Array = jax.Array

_NEG_INF = -jnp.inf


def length_penalty(length: ArrayLike, alpha: float) -> Array:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (section 6.1 uses alpha = 0.6)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def output_limits(src_ids_BxS: Array, extra_length: int, max_length: int) -> Array:
    """Per-sentence output cap: source length + extra_length (section 6.1 uses +50)."""
    src_len_B = jnp.sum(src_ids_BxS != PAD_ID, axis=-1)
    # An all-PAD row (batch padding) ends at once instead of decoding extra_length tokens.
    return jnp.where(src_len_B == 0, 1, jnp.minimum(src_len_B + extra_length, max_length))


def _mask_columns(
    scores_RxV: Array, step: Array, min_length: ArrayLike, start_id: int = BOS_ID
) -> Array:
    """PAD and the start token are never emitted; EOS waits for min_length (no full pass).

    A PAD inside a sentence would read as its end, and the start token (config.decoder_start_id:
    BOS, or PAD itself for imported Marian models) only ever begins the decoder's input.
    """
    scores_RxV = scores_RxV.at[:, PAD_ID].set(_NEG_INF).at[:, start_id].set(_NEG_INF)
    eos_R = jnp.where(step < min_length, _NEG_INF, scores_RxV[:, EOS_ID])
    return scores_RxV.at[:, EOS_ID].set(eos_R)


def _encode_and_cache(
    model: Decodable, params: Any, src_ids_BxS: Array, capacity: int, copies: int
) -> tuple[Array, Any]:
    """Encode once and build the cache with `copies` self-attention rows per source."""
    # An Ensemble's encoding is one array per member. The encoder output is not repeated per
    # beam: the decoder's cross-attention reads one copy for all of a source's rows.
    encoded_BxSxD: Any = model.apply({"params": params}, src_ids_BxS, method="encode")
    # Under jit the sizing pass inside init_cache is dead code except the cross-attention
    # projection; XLA drops the rest, so building the cache costs one projection per layer.
    cache = init_cache(model, params, encoded_BxSxD, src_ids_BxS, capacity, copies)
    return encoded_BxSxD, cache


def _decoder_step(
    model: Decodable,
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
        method="decode",
    )
    return logits_Bx1xV[:, 0], mutated["cache"]  # type: ignore[index]


def _grown_loop(
    state: Any,
    step_fn: Callable[[Any], Any],
    is_open: Callable[[Any], Array],
    finish: Callable[[Any], Any],
    capacities: list[int],
    grow: Callable[[Any, int], Any],
) -> Any:
    """finish(state) after stepping while is_open, the cache growing through capacities.

    The last stage runs until the loop closes (is_open stops at max_length): its capacity is
    max_length, or a sliding window's ring of slots that steps overwrite in turn.
    """

    def run(k: int, state: Any) -> Any:
        capacity = capacities[k]
        if k == len(capacities) - 1:
            return finish(jax.lax.while_loop(is_open, step_fn, state))
        # Step i writes cache slot i: a capacity of C holds steps 0 .. C - 1.
        state = jax.lax.while_loop(lambda s: is_open(s) & (s.step < capacity), step_fn, state)
        return jax.lax.cond(
            is_open(state), lambda s: run(k + 1, grow(s, capacities[k + 1])), finish, state
        )

    return run(0, state)


@flax.struct.dataclass
class _SequenceState:
    """The greedy/sampling loop's carry."""

    step: Array  # [] int32: tokens decoded so far
    cache: Any
    previous_B: Array  # [B] int32: each sentence's latest token
    finished_B: Array  # [B] bool: emitted EOS
    out_BxT: Array  # [B, T] int32: the outputs, PAD after EOS
    logp_B: Array  # [B] float32: sum of the model's log-probs of the outputs


def _sequential_decode(
    model: Decodable,
    params: Any,
    src_ids_BxS: Array,
    choose: Callable[[Array, Array], Array],
    *,
    max_length: int,
    extra_length: int,
    min_length: int,
    alpha: float,
    with_scores: bool,
) -> tuple[Array, Array]:
    """One token per step per sentence, picked by choose(step, masked_logits_BxV) -> [B].

    Returns (outputs [B, T], log P(outputs) / lp(|outputs|, alpha) [B]).
    """
    B = src_ids_BxS.shape[0]
    capacities = cache_capacities(max_length, model.config.attention_window)
    encoded_BxSxD, cache = _encode_and_cache(model, params, src_ids_BxS, capacities[0], copies=1)
    limit_B = output_limits(src_ids_BxS, extra_length, max_length)
    rows_B = jnp.arange(B)
    start_id = model.config.decoder_start_id

    def step(s: _SequenceState) -> _SequenceState:
        logits_BxV, cache = _decoder_step(
            model, params, s.cache, encoded_BxSxD, src_ids_BxS, s.previous_B
        )
        masked_BxV = _mask_columns(logits_BxV, s.step, min_length, start_id)
        token_B = choose(s.step, masked_BxV)
        # At the cap EOS is the only choice.
        token_B = jnp.where(s.step + 1 >= limit_B, EOS_ID, token_B).astype(jnp.int32)
        token_B = jnp.where(s.finished_B, PAD_ID, token_B)
        if with_scores:
            logp_B = logits_BxV[rows_B, token_B] - jax.nn.logsumexp(logits_BxV, axis=-1)
        else:  # a pass over V per step saved
            logp_B = jnp.zeros_like(s.logp_B)
        return _SequenceState(
            step=s.step + 1,
            cache=cache,
            previous_B=token_B,
            finished_B=s.finished_B | (token_B == EOS_ID),
            out_BxT=jax.lax.dynamic_update_slice(s.out_BxT, token_B[:, None], (0, s.step)),
            logp_B=s.logp_B + jnp.where(s.finished_B, 0.0, logp_B),
        )

    def is_open(s: _SequenceState) -> Array:
        return (s.step < max_length) & ~jnp.all(s.finished_B)

    def finish(s: _SequenceState) -> tuple[Array, Array]:
        lengths_B = jnp.sum(s.out_BxT != PAD_ID, axis=-1)
        return s.out_BxT, s.logp_B / length_penalty(lengths_B, alpha)

    def grow(s: _SequenceState, capacity: int) -> _SequenceState:
        return dataclasses.replace(s, cache=grow_cache(s.cache, capacity))

    init = _SequenceState(
        step=jnp.array(0, jnp.int32),
        cache=cache,
        previous_B=jnp.full((B,), start_id, jnp.int32),
        finished_B=jnp.zeros((B,), bool),
        out_BxT=jnp.full((B, max_length), PAD_ID, jnp.int32),
        logp_B=jnp.zeros((B,), jnp.float32),
    )
    return _grown_loop(init, step, is_open, finish, capacities, grow)


def greedy_decode(
    model: Decodable,
    params: Any,
    src_ids_BxS: Array,
    *,
    max_length: int,
    extra_length: int = 50,
    min_length: int = 0,
    return_scores: bool = False,
    alpha: float = 0.6,
) -> Array | tuple[Array, Array]:
    """Argmax decoding: [B, max_length] ids, EOS included, PAD after it. Jit with static max_length.

    The encoder runs once; cross-attention keys/values are projected once into the cache; each
    step feeds the previous token and stops when every sentence has emitted EOS or hit its cap
    (source length + extra_length, at most max_length). min_length blocks EOS before that many
    tokens (benchmarks use it to force the output length). With return_scores, also [B]
    log P(output) / lp(|output|, alpha), the score beam search ranks by.
    """

    def argmax(_: Array, logits_BxV: Array) -> Array:
        return jnp.argmax(logits_BxV, axis=-1)

    out_BxT, score_B = _sequential_decode(
        model,
        params,
        src_ids_BxS,
        argmax,
        max_length=max_length,
        extra_length=extra_length,
        min_length=min_length,
        alpha=alpha,
        with_scores=return_scores,
    )
    return (out_BxT, score_B) if return_scores else out_BxT


def sample_decode(
    model: Decodable,
    params: Any,
    src_ids_BxS: Array,
    rng: Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    max_length: int,
    extra_length: int = 50,
    min_length: int = 0,
    return_scores: bool = False,
    alpha: float = 0.6,
) -> Array | tuple[Array, Array]:
    """Ancestral sampling from softmax(logits / temperature), optionally from the top_k ids only.

    Same output format, caps and scores as greedy_decode; temperature 0 or top_k 1 is greedy.
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
            logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, _NEG_INF)
        # A fresh key per step from the step index: no key to carry through the loop.
        return jax.random.categorical(jax.random.fold_in(rng, i), logits_BxV, axis=-1)

    out_BxT, score_B = _sequential_decode(
        model,
        params,
        src_ids_BxS,
        sample,
        max_length=max_length,
        extra_length=extra_length,
        min_length=min_length,
        alpha=alpha,
        with_scores=return_scores,
    )
    return (out_BxT, score_B) if return_scores else out_BxT


@flax.struct.dataclass
class BeamState:
    """The beam search loop's carry: W alive and W finished hypotheses per sentence.

    Sequences are not carried: tokens_TxBxW[t] holds the token each alive beam chose at step t
    and parents_TxBxW[t] the beam of step t - 1 it extends; a finished hypothesis is its score,
    the step that emitted its EOS and the beam that EOS extended.
    """

    step: Array  # [] int32: tokens decoded so far (the output position being filled)
    cache: Any  # the decoder's KV cache, one row per (sentence, alive beam)
    last_BxW: Array  # [B, W] int32: each alive hypothesis's latest token
    alive_logp_BxW: Array  # [B, W] float32: their log-probabilities, best first
    tokens_TxBxW: Array  # [T, B, W] int32
    parents_TxBxW: Array  # [T, B, W] int32
    done_score_BxW: Array  # [B, W] float32: finished hypotheses' length-penalized scores
    done_step_BxW: Array  # [B, W] int32: the step that emitted their EOS
    done_parent_BxW: Array  # [B, W] int32: the alive beam of that step - 1 they extend


def beam_search(
    model: Decodable,
    params: Any,
    src_ids_BxS: Array,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_length: int,
    extra_length: int = 50,
    min_length: int = 0,
    num_hypotheses: int | None = None,
) -> tuple[Array, Array]:
    """Beam search with the GNMT length penalty and early stopping (section 6.1).

    Keeps W alive and W finished hypotheses per sentence (tensor2tensor / flax WMT style): each
    step takes the best 2W one-token extensions, so at least W of them did not end in EOS. A
    finished hypothesis scores log P(Y|X) / length_penalty(|Y|, alpha), |Y| counting its EOS.
    A hypothesis reaching the sentence's cap (source length + extra_length, at most max_length)
    can only emit EOS; before min_length tokens EOS is blocked. The loop stops once no
    sentence's best alive log-prob, divided by the length penalty at its cap (the best it could
    still score), beats its N-th best finished score (N = num_hypotheses, default 1): nothing
    found later could enter the N returned, so this is tensor2tensor's result (it waits for
    the worst of W finished) in fewer steps.

    Returns:
      ([B, max_length] int32 best hypothesis per sentence, EOS then PAD; [B] float32 its score),
      or with num_hypotheses=N (at most beam_size) the N best: [B, N, max_length] and [B, N].
      Where fewer than N finished, the best alive ones follow, scored at their length.
    """
    if beam_size < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {beam_size}")
    if alpha < 0:
        # The early-stop bound needs a penalty that grows with length.
        raise ValueError(f"beam_search: alpha must be >= 0, got {alpha}")
    count = 1 if num_hypotheses is None else num_hypotheses
    if not 1 <= count <= beam_size:
        raise ValueError(
            f"beam_search: num_hypotheses={num_hypotheses} must be in [1, beam_size={beam_size}]"
        )
    B, W, T = src_ids_BxS.shape[0], beam_size, max_length
    capacities = cache_capacities(max_length, model.config.attention_window)
    encoded_BxSxD, cache = _encode_and_cache(model, params, src_ids_BxS, capacities[0], copies=W)
    limit_B = output_limits(src_ids_BxS, extra_length, max_length)

    def step(state: BeamState) -> BeamState:
        logits_BWxV, cache = _decoder_step(
            model, params, state.cache, encoded_BxSxD, src_ids_BxS, state.last_BxW.reshape(-1)
        )
        token_BxW, parent_BxW, alive_logp_BxW, finished = _beam_choices(
            jax.nn.log_softmax(logits_BWxV),
            state,
            limit_B,
            min_length,
            alpha,
            W,
            model.config.decoder_start_id,
        )
        rows_Bx1 = jnp.arange(B)[:, None]
        return BeamState(
            step=state.step + 1,
            cache=reorder_cache(cache, (rows_Bx1 * W + parent_BxW).reshape(-1)),
            last_BxW=token_BxW,
            alive_logp_BxW=alive_logp_BxW,
            tokens_TxBxW=state.tokens_TxBxW.at[state.step].set(token_BxW),
            parents_TxBxW=state.parents_TxBxW.at[state.step].set(parent_BxW),
            **finished,
        )

    best_possible_lp_B = length_penalty(limit_B, alpha)

    def is_open(state: BeamState) -> Array:
        # Both are sorted best first (top_k): compare the best alive with the count-th
        # finished, the last one returned (-inf while fewer than count have finished).
        best_alive_B = state.alive_logp_BxW[:, 0] / best_possible_lp_B
        can_improve_B = best_alive_B > state.done_score_BxW[:, count - 1]
        return (state.step < max_length) & jnp.any(can_improve_B)

    def grow(state: BeamState, capacity: int) -> BeamState:
        return dataclasses.replace(state, cache=grow_cache(state.cache, capacity))

    def finish(state: BeamState) -> tuple[Array, Array]:
        return _best_hypotheses(state, count, alpha)

    # Beams start identical; only beam 0 is live so the first step does not pick duplicates.
    init = BeamState(
        step=jnp.array(0, jnp.int32),
        cache=cache,
        last_BxW=jnp.full((B, W), model.config.decoder_start_id, jnp.int32),
        alive_logp_BxW=jnp.tile(jnp.array([0.0] + [-jnp.inf] * (W - 1), jnp.float32), (B, 1)),
        tokens_TxBxW=jnp.full((T, B, W), PAD_ID, jnp.int32),
        parents_TxBxW=jnp.zeros((T, B, W), jnp.int32),
        done_score_BxW=jnp.full((B, W), -jnp.inf, jnp.float32),
        done_step_BxW=jnp.zeros((B, W), jnp.int32),
        done_parent_BxW=jnp.zeros((B, W), jnp.int32),
    )
    seqs_BxNxT, scores_BxN = _grown_loop(init, step, is_open, finish, capacities, grow)
    if num_hypotheses is None:
        return seqs_BxNxT[:, 0], scores_BxN[:, 0]
    return seqs_BxNxT, scores_BxN


# top_k_rows' block of columns: 128 was the fastest of 64-512 for 32 rows of 37000 on 2 cores.
TOP_K_BLOCK = 128


def top_k_rows(x_RxV: Array, k: int) -> tuple[Array, Array]:
    """jax.lax.top_k(x, k) of wide rows, the same values and indices, about 3x faster on CPU.

    A row's k largest lie in the k blocks of TOP_K_BLOCK columns with the largest maxima (a
    block holding one of them has a maximum at least as large, and at most k - 1 elements are
    larger), so one max per block, a top-k over the blocks and one over their k x block columns
    replace the top-k over all V (XLA:CPU's top-k sorts; the max is one vectorized pass). The
    chosen blocks are taken in column order, so ties still go to the lower column.
    """
    R, V = x_RxV.shape
    if 4 * k * TOP_K_BLOCK >= V:
        return jax.lax.top_k(x_RxV, k)
    pad = (-V) % TOP_K_BLOCK
    blocks_RxNxC = jnp.pad(x_RxV, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(
        R, -1, TOP_K_BLOCK
    )
    _, block_Rxk = jax.lax.top_k(jnp.max(blocks_RxNxC, axis=2), k)
    block_Rxk = jnp.sort(block_Rxk, axis=1)
    chosen_RxkC = jnp.take_along_axis(blocks_RxNxC, block_Rxk[:, :, None], axis=1).reshape(R, -1)
    values_Rxk, at_Rxk = jax.lax.top_k(chosen_RxkC, k)
    rows_Rx1 = jnp.arange(R)[:, None]
    columns_Rxk = block_Rxk[rows_Rx1, at_Rxk // TOP_K_BLOCK] * TOP_K_BLOCK + at_Rxk % TOP_K_BLOCK
    return values_Rxk, columns_Rxk


def _beam_choices(
    logp_BWxV: Array,
    state: BeamState,
    limit_B: Array,
    min_length: int,
    alpha: float,
    W: int,
    start_id: int,
) -> tuple[Array, Array, Array, dict[str, Array]]:
    """One step's (tokens, parents, log-probs) of the new alive beams and the finished fields.

    Masked after the softmax, not renormalized: scores stay the model's own log-probs.
    """
    i = state.step
    B = state.alive_logp_BxW.shape[0]
    rows_Bx1 = jnp.arange(B)[:, None]
    eos_BxW = logp_BWxV[:, EOS_ID].reshape(B, W)  # at the cap EOS is allowed whatever min_length
    masked_BWxV = _mask_columns(logp_BWxV, i, min_length, start_id)
    # Each beam's best 2W tokens hold every one of the joint best 2W among W x V. Ranked on
    # the totals (alive + token), so float ties break exactly as one top-k over W x V would.
    k = min(2 * W, masked_BWxV.shape[-1])
    total_BWxV = state.alive_logp_BxW.reshape(-1)[:, None] + masked_BWxV
    top_total_BWxk, top_token_BWxk = top_k_rows(total_BWxV, k)
    cand_logp_Bx2W, flat_Bx2W = jax.lax.top_k(top_total_BWxk.reshape(B, W * k), 2 * W)
    cand_parent_Bx2W = flat_Bx2W // k
    cand_token_Bx2W = top_token_BWxk.reshape(B, W * k)[rows_Bx1, flat_Bx2W]
    # At its cap a sentence's only candidates are its beams' EOS extensions.
    cap_logp_Bx2W, cap_parent_Bx2W = jax.lax.top_k(
        jnp.concatenate(
            [state.alive_logp_BxW + eos_BxW, jnp.full((B, W), -jnp.inf, jnp.float32)], axis=1
        ),
        2 * W,
    )
    at_cap_Bx1 = (i + 1 >= limit_B)[:, None]
    cand_logp_Bx2W = jnp.where(at_cap_Bx1, cap_logp_Bx2W, cand_logp_Bx2W)
    cand_parent_Bx2W = jnp.where(at_cap_Bx1, cap_parent_Bx2W % W, cand_parent_Bx2W)
    cand_token_Bx2W = jnp.where(at_cap_Bx1, EOS_ID, cand_token_Bx2W).astype(jnp.int32)
    cand_eos_Bx2W = cand_token_Bx2W == EOS_ID

    # Alive: the best W extensions that did not end (each parent gives at most one EOS).
    alive_logp_BxW, pick_BxW = jax.lax.top_k(jnp.where(cand_eos_Bx2W, -jnp.inf, cand_logp_Bx2W), W)
    token_BxW = cand_token_Bx2W[rows_Bx1, pick_BxW]
    parent_BxW = cand_parent_Bx2W[rows_Bx1, pick_BxW]

    # Finished: merge the new EOS extensions into the W best so far.
    cand_score_Bx2W = jnp.where(
        cand_eos_Bx2W, cand_logp_Bx2W / length_penalty(i + 1, alpha), -jnp.inf
    )
    done_score_BxW, keep_BxW = jax.lax.top_k(
        jnp.concatenate([state.done_score_BxW, cand_score_Bx2W], axis=1), W
    )
    merged_step = jnp.concatenate(
        [state.done_step_BxW, jnp.broadcast_to(i, cand_score_Bx2W.shape)], axis=1
    )
    merged_parent = jnp.concatenate([state.done_parent_BxW, cand_parent_Bx2W], axis=1)
    finished = {
        "done_score_BxW": done_score_BxW,
        "done_step_BxW": merged_step[rows_Bx1, keep_BxW],
        "done_parent_BxW": merged_parent[rows_Bx1, keep_BxW],
    }
    return token_BxW, parent_BxW, alive_logp_BxW, finished


def _best_hypotheses(state: BeamState, count: int, alpha: float) -> tuple[Array, Array]:
    """The `count` best hypotheses per sentence ([B, N, T], [B, N]), read back from the tables.

    Finished ones first (best first); where fewer than N finished, the best alive ones follow,
    scored at their length (state.step tokens, no EOS).
    """
    B, W = state.done_score_BxW.shape
    n_N = jnp.arange(count)
    finished_B = jnp.sum(state.done_score_BxW > -jnp.inf, axis=1)
    from_done_BxN = n_N[None, :] < finished_B[:, None]
    done_slot_BxN = jnp.minimum(n_N[None, :], W - 1)
    alive_slot_BxN = jnp.clip(n_N[None, :] - finished_B[:, None], 0, W - 1)
    rows_Bx1 = jnp.arange(B)[:, None]
    end_BxN = jnp.where(from_done_BxN, state.done_step_BxW[rows_Bx1, done_slot_BxN], state.step)
    slot_BxN = jnp.where(
        from_done_BxN, state.done_parent_BxW[rows_Bx1, done_slot_BxN], alive_slot_BxN
    )
    alive_score_BxN = state.alive_logp_BxW[rows_Bx1, alive_slot_BxN] / length_penalty(
        state.step, alpha
    )
    score_BxN = jnp.where(
        from_done_BxN, state.done_score_BxW[rows_Bx1, done_slot_BxN], alive_score_BxN
    )
    seqs_BxNxT = _follow_parents(state.tokens_TxBxW, state.parents_TxBxW, end_BxN, slot_BxN)
    # A finished hypothesis ends with its EOS, at the step that emitted it.
    T = seqs_BxNxT.shape[-1]
    at_end_BxNxT = jnp.arange(T)[None, None, :] == end_BxN[:, :, None]
    seqs_BxNxT = jnp.where(at_end_BxNxT & from_done_BxN[:, :, None], EOS_ID, seqs_BxNxT)
    return seqs_BxNxT, score_BxN


def _follow_parents(
    tokens_TxBxW: Array, parents_TxBxW: Array, end_BxN: Array, slot_BxN: Array
) -> Array:
    """Tokens before each end step, read backwards through the parent beams: [B, N, T]."""
    T = tokens_TxBxW.shape[0]
    B, N = end_BxN.shape

    def back(j: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        out_BxNxT, slot_BxN = carry
        t = T - 1 - j
        active_BxN = t < end_BxN
        token_BxN = jnp.take_along_axis(tokens_TxBxW[t], slot_BxN, axis=1)
        parent_BxN = jnp.take_along_axis(parents_TxBxW[t], slot_BxN, axis=1)
        column_BxNx1 = jnp.where(active_BxN, token_BxN, PAD_ID)[:, :, None]
        out_BxNxT = jax.lax.dynamic_update_slice(out_BxNxT, column_BxNx1, (0, 0, t))
        return out_BxNxT, jnp.where(active_BxN, parent_BxN, slot_BxN)

    init = (jnp.full((B, N, T), PAD_ID, jnp.int32), slot_BxN)
    return jax.lax.fori_loop(0, T, back, init)[0]
