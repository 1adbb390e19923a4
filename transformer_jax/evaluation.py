"""Evaluation shared by the training loop, the evaluate command and Translator.

Loss over a split, batched translation on one host or many, corpus scores and hypothesis files
live here once. Nothing here knows how a sentence is decoded: translation takes a `DecodeRows`
function (the JAX engine's, or another engine's) that turns this process's padded source rows
into token rows, so the same batching, length bucketing, ordering and multi-host gathering
serve every caller.
"""

from __future__ import annotations

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
from transformer_jax.data import pipeline
from transformer_jax.data.tokenizer import Tokenizer

# (this process's source rows [b, S] int32, batch number) -> its output token rows [b, T].
DecodeRows = Callable[[np.ndarray, int], np.ndarray]
Pair = tuple[str, str]

# Source rows are padded to a power of two from here up, so a few compiled shapes serve every
# batch, and short test sets do not pay for the longest possible sentence.
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
    """Translate every sentence, in order, on every process (each decodes its own share).

    Empty or blank lines give empty translations without being decoded; sources longer than
    max_source_length tokens (EOS included) are truncated, with a warning. batch_size is the
    number of rows per process and batch.
    """
    outputs = ["" for _ in sentences]
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    if not todo:
        return outputs
    texts = [sentences[i] for i in todo]
    # Every process sees every sentence, so all agree on the bucket (one global shape).
    longest = max(len(ids) for ids in tokenizer.encode_batch(texts)) + 1
    batches = pipeline.make_eval_batches(
        [(text, "") for text in texts],
        tokenizer,
        batch_size=batch_size,
        max_source_length=source_bucket(longest, max_source_length),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    indices, rows = [], []
    iterator = tqdm(
        batches,
        desc="translating",
        unit="batch",
        file=sys.stderr,
        disable=not progress or jax.process_index() != 0,
        leave=False,
    )
    for number, batch in enumerate(iterator):
        indices.append(batch.index)
        rows.append(decode_rows(batch.arrays["inputs"], number))
    index_N, tokens_NxT = _gather_rows(np.concatenate(indices), np.concatenate(rows))
    for i, tokens in zip(index_N, tokens_NxT, strict=True):
        if i >= 0:
            outputs[todo[int(i)]] = tokenizer.decode(tokens)
    return outputs


def _gather_rows(index_N: np.ndarray, tokens_NxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every process's (index, tokens) rows on every process."""
    if jax.process_count() == 1:
        return index_N, tokens_NxT
    # Every process decoded the same number of padded rows (make_eval_batches pads to it).
    index_PxN, tokens_PxNxT = multihost_utils.process_allgather((index_N, tokens_NxT))
    return np.asarray(index_PxN).reshape(-1), np.asarray(tokens_PxNxT).reshape(
        -1, tokens_NxT.shape[-1]
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
