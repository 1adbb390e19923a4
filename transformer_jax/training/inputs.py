"""A run's data: its splits, its tokenizer, the packed training stream and the eval batches."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
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
    """What the loop reads: the training pairs and pipeline settings, and the validation split."""

    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    train_pairs: Sequence[Pair]
    rows_per_host: int
    valid_pairs: Sequence[Pair]
    valid_batches: pipeline.EvalBatches  # with targets: the validation loss

    def train_iterator(self, start_index: int = 0) -> Any:
        """This host's packed training batches: a checkpointable grain.DatasetIterator."""
        data = self.config.data
        return iter(
            pipeline.make_train_dataset(
                self.train_pairs,
                self.tokenizer,
                batch_size=self.rows_per_host,
                max_source_length=data.max_source_length,
                max_target_length=data.max_target_length,
                seed=self.config.seed,
                shard_index=jax.process_index(),
                shard_count=jax.process_count(),
                start_index=start_index,
            )
        )


def prepare(
    config: ml_collections.ConfigDict, run: Workdir, model_config: ModelConfig
) -> TrainingData:
    """Load the splits, load or train the tokenizer, and batch the validation split."""
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
    valid_batches = pipeline.make_eval_batches(
        valid_pairs,
        tokenizer,
        batch_size=config.data.eval_batch_size,
        max_source_length=config.data.max_source_length,
        max_target_length=config.data.max_target_length,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    return TrainingData(config, tokenizer, train_pairs, rows_per_host, valid_pairs, valid_batches)


@dataclasses.dataclass
class StreamPosition:
    """Where a run is in the training stream: what each process has read and trained on.

    Process p of P reads the global (shuffled, repeated) order from `start`, taking examples
    start + p, start + p + P, ...; `read[p]` counts the examples it has taken, `kept[p]` those
    that passed the length filter, `emitted[p]` those in batches the loop has trained on (the
    rest of the kept ones wait in rows still being packed).
    """

    start: int
    read: list[int]
    kept: list[int]
    emitted: list[int]

    def to_json(self) -> dict[str, Any]:
        """The checkpoint meta record's "data" field."""
        return dataclasses.asdict(self)

    def resume_point(self) -> tuple[int, int, int]:
        """(global index to continue from, examples re-read past it, examples lost in rows).

        Continuing from the first example some process has not read repeats the examples the
        processes ahead of it had read (the part of them already trained on repeats) and drops
        the kept examples that sat in unfinished rows (they were never trained on).
        """
        count = len(self.read)
        point = min(self.start + p + count * r for p, r in enumerate(self.read))
        # Process p's examples before the point: ceil((point - start - p) / count) of them.
        before = [max(0, -(-(point - self.start - p) // count)) for p in range(count)]
        reread = sum(max(0, r - b) for r, b in zip(self.read, before, strict=True))
        lost = sum(k - e for k, e in zip(self.kept, self.emitted, strict=True))
        return point, reread, lost


class StreamCounter:
    """This process's count of examples trained on, and the all-process position at a save."""

    def __init__(self, start: int = 0, emitted: int = 0) -> None:
        self.start = start
        self.emitted = emitted

    def count(self, batch: dict[str, np.ndarray]) -> None:
        """Count the examples packed in one training batch (its segment ids number them)."""
        self.emitted += int(batch["targets_segment_ids"].max(axis=1).sum())

    def position(self, iterator: Any) -> StreamPosition:
        """Every process's counts (a collective: all processes call it together)."""
        counts = pipeline.filter_counts(iterator)
        mine = np.asarray([sum(counts.values()), counts["kept"], self.emitted], np.int64)
        if jax.process_count() > 1:
            mine = np.asarray(multihost_utils.process_allgather(mine))
        table = mine.reshape(-1, 3)
        return StreamPosition(self.start, *(table[:, i].astype(int).tolist() for i in range(3)))


def resume_start(
    config: ml_collections.ConfigDict, meta: dict[str, Any] | None
) -> tuple[int, bool]:
    """(start index for this run's pipeline, whether the saved iterator state applies exactly).

    The same number of processes continues exactly. Another number continues from the first
    example some process had not read, which repeats and skips a few: refused with the counts
    unless config.data.reshard_on_resume is set.
    """
    if meta is None:
        return 0, False
    saved_by = meta.get("process_count")
    position = meta.get("data")
    if saved_by is None or saved_by == jax.process_count():
        return (position or {}).get("start", 0), True
    if position is None:
        plan = "its stream position was not recorded, so the data stream starts over"
        point = 0
    else:
        point, reread, lost = StreamPosition(**position).resume_point()
        plan = (
            f"continuing from example {point:,} of the stream re-reads at most {reread:,} "
            f"examples (those already trained on repeat) and skips {lost:,} that waited in "
            "unfinished rows"
        )
    message = (
        f"the checkpoint was saved by {saved_by} process(es), this run has "
        f"{jax.process_count()}: grain's per-process iterator state does not carry over, and "
        f"{plan}"
    )
    if not config.data.reshard_on_resume:
        raise ValueError(
            f"config.data.reshard_on_resume: {message}. Set --config.data.reshard_on_resume=True "
            f"to accept that, or resume on {saved_by} process(es)."
        )
    log.warning("Resuming on another number of processes: %s.", message)
    return point, False


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
