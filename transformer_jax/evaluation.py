"""Evaluation shared by the training loop, the evaluate command and Translator.

Loss over a split, batched translation on one host or many, corpus scores and hypothesis files
live here once. Nothing here knows how a sentence is decoded: translation takes a `DecodeRows`
function (the JAX engine's, or another engine's) that turns this process's padded source rows
into token rows, so the same batching, length bucketing, ordering and multi-host gathering
serve every caller.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import sacrebleu
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm import tqdm

from transformer_jax import sharding
from transformer_jax.config import PAD_ID
from transformer_jax.data import pipeline
from transformer_jax.data.tokenizer import Tokenizer

Pair = tuple[str, str]
Hypotheses = list[tuple[str, float]]  # one sentence's n best (text, engine score), best first


@dataclasses.dataclass(frozen=True)
class Decoded:
    """What an engine returns for this process's rows: the n best per row and their scores."""

    tokens: np.ndarray  # [b, N, T] int32: each hypothesis, EOS then PAD
    scores: np.ndarray  # [b, N] float32, best first; the engine's own score (see its docs)


# (this process's source rows [b, S] int32, EOS then PAD; batch number) -> its Decoded rows.
DecodeRows = Callable[[np.ndarray, int], Decoded]

# Source rows are padded to a power of two from here up, so a few compiled shapes serve every
# batch, and short batches do not pay for the longest possible sentence.
_MIN_BUCKET = 16


def source_bucket(longest: int, limit: int) -> int:
    """The padded source length for sources of `longest` tokens (EOS included), at most limit."""
    bucket = _MIN_BUCKET
    while bucket < longest:
        bucket *= 2
    return min(bucket, limit)


def translate(
    decode_rows: DecodeRows,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int,
    max_source_length: int,
    progress: bool = False,
) -> list[str]:
    """The best translation of every sentence, in order (see translate_nbest)."""
    best = translate_nbest(
        decode_rows,
        tokenizer,
        sentences,
        batch_size=batch_size,
        max_source_length=max_source_length,
        progress=progress,
    )
    return [hypotheses[0][0] if hypotheses else "" for hypotheses in best]


def translate_nbest(
    decode_rows: DecodeRows,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int,
    max_source_length: int,
    progress: bool = False,
) -> list[Hypotheses]:
    """Every sentence's hypotheses, in input order, on every process (each decodes a share).

    Blank lines get no hypotheses and are not decoded; sources longer than max_source_length
    tokens (EOS included) are truncated, with a warning. Sentences are sorted by length and
    cut into global batches of batch_size rows per process, each padded to its own length
    bucket: every process computes the same order and buckets, then decodes its rows of each
    batch; one gather at the end gives every process every result.
    """
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    results: list[Hypotheses] = [[] for _ in sentences]
    if not todo:
        return results
    ids, truncated = pipeline.encode_truncated(
        tokenizer, [sentences[i] for i in todo], max_source_length
    )
    if truncated:
        logging.warning(
            "Translating: truncated %d of %d sentences to max_source_length=%d tokens (EOS "
            "kept); they are still translated.",
            truncated,
            len(todo),
            max_source_length,
        )
    index_N, tokens_NxKxT, scores_NxK = _decode_sorted(
        decode_rows, ids, batch_size, max_source_length, progress
    )
    for row, i in enumerate(index_N):
        if i >= 0:
            results[todo[int(i)]] = [
                (tokenizer.decode(tokens), float(score))
                for tokens, score in zip(tokens_NxKxT[row], scores_NxK[row], strict=True)
            ]
    return results


def _decode_sorted(
    decode_rows: DecodeRows,
    ids: list[np.ndarray],
    batch_size: int,
    max_source_length: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example index, tokens, scores) of every row of every process, shortest sources first."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    processes, me = jax.process_count(), jax.process_index()
    per_batch = batch_size * processes
    num_batches = -(-len(order) // per_batch)
    decoded: list[tuple[np.ndarray, Decoded]] = []
    bar = tqdm(
        range(num_batches),
        desc="translating",
        unit="batch",
        file=sys.stderr,
        disable=not progress or me != 0,
        leave=False,
    )
    for number in bar:
        batch = order[number * per_batch : (number + 1) * per_batch]
        width = source_bucket(max(len(ids[i]) for i in batch), max_source_length)
        mine = batch[me * batch_size : (me + 1) * batch_size]
        rows = np.full((batch_size, width), PAD_ID, np.int32)
        index = np.full(batch_size, -1, np.int32)
        for row, i in enumerate(mine):
            rows[row, : len(ids[i])] = ids[i]
            index[row] = i
        decoded.append((index, decode_rows(rows, number)))
    return _gather(decoded)


def _gather(
    decoded: list[tuple[np.ndarray, Decoded]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every process's rows on every process, outputs padded to one length."""
    width = max(d.tokens.shape[-1] for _, d in decoded)
    index = np.concatenate([i for i, _ in decoded])
    tokens = np.concatenate(
        [np.pad(d.tokens, ((0, 0), (0, 0), (0, width - d.tokens.shape[-1]))) for _, d in decoded]
    )
    scores = np.concatenate([d.scores for _, d in decoded])
    if jax.process_count() == 1:
        return index, tokens, scores
    # Every process decoded the same number of rows per batch (padding rows have index -1).
    gathered = multihost_utils.process_allgather((index, tokens, scores))
    index, tokens, scores = (np.asarray(x) for x in gathered)
    return (
        index.reshape(-1),
        tokens.reshape(-1, *tokens.shape[2:]),
        scores.reshape(-1, scores.shape[-1]),
    )


def loss_sums(
    eval_step: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]],
    params: Any,
    batches: pipeline.EvalBatches,
    rows: NamedSharding,
) -> dict[str, float]:
    """Summed losses and token counts of eval_step over every batch (all processes together).

    eval_step takes global arrays; its sums are replicated, so every process gets the totals.
    """
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(eval_step(params, sharding.to_global(batch.arrays, rows)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus sacreBLEU and chrF (detokenized, cased; BLEU with 13a) with their signatures."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"score: {len(hypotheses)} hypotheses for {len(references)} references; "
            "they must be line-aligned"
        )
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_details": str(bleu_score),
        "num_sentences": len(hypotheses),
    }


def as_lines(texts: Sequence[str]) -> str:
    """One text per line; a newline inside a text (never made by the tokenizer) becomes a space."""
    return "".join(t.replace("\n", " ") + "\n" for t in texts)


def write_hypotheses(path: epath.PathLike, hypotheses: Sequence[str]) -> None:
    """One hypothesis per line, UTF-8; only process 0 writes (every process has them all)."""
    if jax.process_index() == 0:
        epath.Path(path).write_text(as_lines(hypotheses), encoding="utf-8")
