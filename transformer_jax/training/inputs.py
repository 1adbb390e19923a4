"""A run's data: its splits, its tokenizer, the packed training stream and the eval batches."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from transformer_jax import experiment
from transformer_jax.config import ModelConfig
from transformer_jax.data import pipeline
from transformer_jax.data.tokenizer import Tokenizer, check_vocab
from transformer_jax.workdir import Workdir

log = logging.getLogger(__name__)

Pair = tuple[str, str]


@dataclasses.dataclass
class TrainingData:
    """What the loop reads: the packed training iterator and the validation split."""

    tokenizer: Tokenizer
    train_iter: Any  # a checkpointable grain.DatasetIterator of packed batches
    rows_per_host: int
    valid_pairs: Sequence[Pair]
    valid_batches: pipeline.EvalBatches  # with targets: the validation loss


def prepare(
    config: ml_collections.ConfigDict, run: Workdir, model_config: ModelConfig
) -> TrainingData:
    """Load the splits, load or train the tokenizer, and build this host's pipelines."""
    train_pairs = experiment.load_split(config, config.data.train_split)
    valid_pairs = experiment.load_split(config, config.data.validation_split)
    tokenizer = prepare_tokenizer(config, run, train_pairs, model_config)
    log.info(
        "Data: %d train pairs, %d validation pairs; tokenizer %s (%d pieces).",
        len(train_pairs),
        len(valid_pairs),
        tokenizer.path,
        tokenizer.vocab_size,
    )
    rows_per_host = experiment.rows_per_host(config, jax.process_count(), jax.local_device_count())
    train_iter = iter(
        pipeline.make_train_dataset(
            train_pairs,
            tokenizer,
            batch_size=rows_per_host,
            max_source_length=config.data.max_source_length,
            max_target_length=config.data.max_target_length,
            seed=config.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
    )
    valid_batches = pipeline.make_eval_batches(
        valid_pairs,
        tokenizer,
        batch_size=config.data.eval_batch_size,
        max_source_length=config.data.max_source_length,
        max_target_length=config.data.max_target_length,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    return TrainingData(tokenizer, train_iter, rows_per_host, valid_pairs, valid_batches)


def prepare_tokenizer(
    config: ml_collections.ConfigDict,
    run: Workdir,
    train_pairs: Sequence[Pair],
    model_config: ModelConfig,
) -> Tokenizer:
    """The workdir's tokenizer, trained on both sides of the training pairs if it has none."""
    tok = config.data.tokenizer

    def sentences() -> Iterator[str]:
        for source_text, target_text in train_pairs:
            yield source_text
            yield target_text

    def load_or_train() -> Tokenizer:
        return run.load_or_train_tokenizer(
            sentences, tok.vocab_size, model_type=tok.model_type, max_sentences=tok.max_sentences
        )

    if jax.process_count() > 1:
        # Hosts sharing a workdir would race to rename the model into place (the loser fails):
        # process 0 trains it, the others wait, then load it (or train their own if the
        # workdir is not shared).
        if jax.process_index() == 0:
            load_or_train()
        multihost_utils.sync_global_devices("transformer_jax:tokenizer")
    tokenizer = load_or_train()
    check_vocab(tokenizer, model_config.vocab_size, str(run))
    return tokenizer
