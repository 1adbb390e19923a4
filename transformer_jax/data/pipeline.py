"""grain input pipelines: packed training batches and ordered, complete evaluation batches.

Training (`make_train_dataset`):

    pairs -> shuffle(seed; a new order every epoch) -> repeat(num_epochs)
    -> [start_index + shard_index::shard_count] -> tokenize (+EOS)
    -> drop empty / over-long (counted) -> first-fit packing -> batch

Every batch is a dict of int32 numpy arrays with static shapes:

    inputs, inputs_segment_ids, inputs_positions      [B, S]
    targets, targets_segment_ids, targets_positions   [B, T]

These are grain's packer names, kept unchanged up to the model call (`training.step.model_inputs`
is the one place they meet the model's argument names). Several examples share a row; the
segment ids number them 1, 2, 3, ... within the row
(0 marks padding) and positions restart at 0 for each example. An example's source and target
are in the same row under the same segment id. Targets end with EOS and carry no BOS: the model
shifts them right, putting BOS at every position 0. With a finite `num_epochs` the last batch
is filled with all-PAD rows (segment id 0 everywhere) instead of being dropped.

The iterator (`iter(dataset)`) is a `grain.DatasetIterator`: `get_state()` returns a dict of
ints (JSON-serializable) and `set_state(state)` on a fresh iterator of the same dataset resumes
exactly where the state was taken.

Evaluation (`make_eval_batches`) keeps every example in input order without packing: rows of
one example each, the last batch padded with all-PAD rows, a `mask` marking real rows and an
`index` giving each row's position in the input (-1 for padding rows), apart from the arrays
the model reads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from transformer_jax.config import EOS_ID, PAD_ID
from transformer_jax.data.tokenizer import Side, Tokenizer

Batch = dict[str, np.ndarray]
Pair = tuple[str, str]

# First-fit packing fills 94-98% of the target slots of the built-in corpus (rows of 64-256,
# benchmarks/pipeline_throughput.py); 0.9 leaves room for WMT's wider length spread. Measure a
# new corpus with packing_stats().
DEFAULT_FILL_RATIO = 0.9

# The six [rows, length] int32 arrays of every packed batch (the train step's input contract),
# named as grain's packer names them: <feature>, <feature>_segment_ids, <feature>_positions.
SOURCE_KEYS = ("inputs", "inputs_segment_ids", "inputs_positions")
TARGET_KEYS = ("targets", "targets_segment_ids", "targets_positions")
BATCH_KEYS = SOURCE_KEYS + TARGET_KEYS


# ---------------------------------------------------------------------------------------------
# training


def make_train_dataset(
    pairs: Sequence[Pair],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_source_length: int,
    max_target_length: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None = None,
    num_packing_bins: int | None = None,
    read_threads: int = 0,
    worker_count: int = 0,
    start_index: int = 0,
) -> grain.IterDataset:
    """Packed training batches of this host's shard; see the module docstring for the format.

    Args:
      pairs: random-access (source, target) text pairs (a list, `Pairs` or `TfdsPairs`).
      tokenizer: the shared sentencepiece tokenizer.
      batch_size: rows per batch on this host (see `rows_for_token_budget`).
      max_source_length: S, tokens per source row, EOS included; longer examples are dropped.
      max_target_length: T, the same for targets.
      seed: shuffles the pairs (a new order every epoch) and the packed rows.
      shard_index: this host's shard, usually `jax.process_index()`.
      shard_count: the number of shards, usually `jax.process_count()`.
      num_epochs: passes over the data; None repeats forever (train by steps; needed for
        multi-host runs, where packing gives hosts different numbers of batches per epoch).
      num_packing_bins: rows filled at once by first-fit packing; more fills rows better but
        mixes examples further apart. Defaults to batch_size.
      read_threads: grain reader threads; 0 (in-memory pairs) avoids GIL contention, a few help
        when `pairs` reads from disk (tfds array_record).
      worker_count: grain worker processes (`mp_prefetch`), each running the whole pipeline on
        its slice of this host's shard; 0 runs it in the calling thread. One core manages about
        150k target tokens/s (docs/data.md), so a fast accelerator host may need several.
        Workers need absl flags parsed (train.py runs under absl.app), and a state restores
        only into a dataset with the same worker_count.
      start_index: skip the first start_index examples of the global (shuffled, repeated)
        order before the hosts split it: how a run resumed on another number of hosts
        continues the stream (`training.inputs.resume_position`).

    Returns:
      A `grain.IterDataset`; `iter()` of it is a checkpointable `grain.DatasetIterator`.
    """
    _require(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    _require(max_source_length >= 2, "max_source_length", f"must be >= 2, got {max_source_length}")
    _require(max_target_length >= 2, "max_target_length", f"must be >= 2, got {max_target_length}")
    _require(0 <= seed < 2**32, "seed", f"must be in [0, 2**32), got {seed}")
    _require(shard_count >= 1, "shard_count", f"must be >= 1, got {shard_count}")
    _require(
        0 <= shard_index < shard_count,
        "shard_index",
        f"must be in [0, shard_count={shard_count}), got {shard_index}",
    )
    _require(
        num_epochs is None or num_epochs >= 1,
        "num_epochs",
        f"must be >= 1 or None, got {num_epochs}",
    )
    _require(
        len(pairs) >= shard_count,
        "pairs",
        f"{len(pairs)} pairs cannot feed {shard_count} shards",
    )
    bins = batch_size if num_packing_bins is None else num_packing_bins
    _require(bins >= 1, "num_packing_bins", f"must be >= 1, got {bins}")
    _require(read_threads >= 0, "read_threads", f"must be >= 0, got {read_threads}")
    _require(worker_count >= 0, "worker_count", f"must be >= 0, got {worker_count}")
    _require(start_index >= 0, "start_index", f"must be >= 0, got {start_index}")

    ds = grain.MapDataset.source(pairs)
    # Shuffle before repeat: grain's shuffle reseeds per epoch from the global index, so
    # every epoch gets its own order. Shard after repeat: the hosts split each epoch's order.
    # grain seeds epoch e with seed + e; mixing the seed first keeps runs with neighbouring
    # seeds from seeing the same epoch orders one epoch apart.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    ds = ds.shuffle(seed=shuffle_seed).repeat(num_epochs)
    ds = ds[start_index + shard_index :: shard_count]
    ds = ds.map(_Tokenize(tokenizer))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64 * read_threads)
    )
    it = LengthFilterIterDataset(it, max_source_length, max_target_length)
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"inputs": max_source_length, "targets": max_target_length},
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=True,
    )
    it = it.batch(batch_size, drop_remainder=False, batch_fn=_PadRows(batch_size))
    if worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


class _Tokenize(grain.transforms.Map):
    """(source, target) text -> {'inputs', 'targets'} int32 ids, each ending in EOS."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def map(self, element: Pair) -> dict[str, np.ndarray]:
        """Tokenize one pair."""
        source, target = element
        return {
            "inputs": _ids_with_eos(self._tokenizer, source, "source"),
            "targets": _ids_with_eos(self._tokenizer, target, "target"),
        }


def _ids_with_eos(tokenizer: Tokenizer, text: str, side: Side) -> np.ndarray:
    ids = tokenizer.encode(text, side=side)
    ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int32)


class LengthFilterIterDataset(grain.IterDataset):
    """Drops examples with an empty side or a side longer than the row, counting both."""

    def __init__(
        self, parent: grain.IterDataset, max_source_length: int, max_target_length: int
    ) -> None:
        super().__init__(parent)
        self._max_source_length = max_source_length
        self._max_target_length = max_target_length

    def __iter__(self) -> LengthFilterIterator:
        return LengthFilterIterator(
            self._parent.__iter__(), self._max_source_length, self._max_target_length
        )

    def __str__(self) -> str:
        return (
            f"LengthFilterIterDataset(max_source_length={self._max_source_length}, "
            f"max_target_length={self._max_target_length})"
        )


class LengthFilterIterator(grain.DatasetIterator):
    """Iterator of `LengthFilterIterDataset`; its counts are part of the checkpointed state."""

    def __init__(
        self, parent: grain.DatasetIterator, max_source_length: int, max_target_length: int
    ) -> None:
        super().__init__(parent)
        self._max_source_length = max_source_length
        self._max_target_length = max_target_length
        self._counts = {"kept": 0, "empty": 0, "too_long": 0}

    @property
    def counts(self) -> dict[str, int]:
        """Examples kept and dropped (by reason) so far, across resumes."""
        return dict(self._counts)

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            example = next(self._parent)
            source_length, target_length = len(example["inputs"]), len(example["targets"])
            # Length 1 is EOS alone: an empty sentence teaches nothing but "stop".
            if source_length <= 1 or target_length <= 1:
                self._drop("empty")
            elif source_length > self._max_source_length or (
                target_length > self._max_target_length
            ):
                self._drop("too_long")
            else:
                self._counts["kept"] += 1
                return example

    def _drop(self, reason: str) -> None:
        self._counts[reason] += 1
        dropped = self._counts[reason]
        # Log the 1st, 10th, 100th, ... drop: visible without flooding a long run's log.
        if dropped == 10 ** int(math.log10(dropped)):
            logging.warning(
                "Training pipeline dropped %d %s example(s) so far (max_source_length=%d, "
                "max_target_length=%d, tokens incl. EOS); counts %s.",
                dropped,
                reason.replace("_", "-"),
                self._max_source_length,
                self._max_target_length,
                self._counts,
            )

    def get_state(self) -> dict[str, Any]:
        """Parent state plus the counts."""
        return {"parent": self._parent.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the parent and the counts."""
        self._parent.set_state(state["parent"])
        self._counts = dict(state["counts"])

    def __str__(self) -> str:
        return "LengthFilterIterator"


class _PadRows:
    """grain batch_fn: stack packed rows and pad a short final batch with empty rows."""

    def __init__(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> Batch:
        batch: Batch = {}
        for key in BATCH_KEYS:
            stacked = np.stack([row[key] for row in rows]).astype(np.int32, copy=False)
            missing = self._batch_size - len(rows)
            if missing:
                # PAD_ID 0 with segment id 0 everywhere: rows the loss and attention ignore.
                stacked = np.pad(stacked, ((0, missing), (0, 0)), constant_values=PAD_ID)
            batch[key] = stacked
        return batch


def filter_counts(iterator: grain.DatasetIterator) -> dict[str, int]:
    """Kept/empty/too_long example counts of a `make_train_dataset` iterator, so far.

    Exact when the pipeline runs in this process; with worker processes the sum of the counts
    in the workers' checkpoint states (which trail by at most one packing group).
    """
    pending = [iterator]
    while pending:
        node = pending.pop()
        if isinstance(node, LengthFilterIterator):
            return node.counts
        pending.extend(getattr(node, "_parents", ()))
    total = {"kept": 0, "empty": 0, "too_long": 0}
    states: list[Any] = [iterator.get_state()]
    while states:
        state = states.pop()
        if isinstance(state, dict):
            counts = state.get("counts")
            if isinstance(counts, dict) and set(counts) == set(total):
                for key in total:
                    total[key] += counts[key]
            states.extend(v for k, v in state.items() if k != "counts")
        elif isinstance(state, list):
            states.extend(state)
    return total


def rows_for_token_budget(
    tokens_per_batch: int,
    max_target_length: int,
    process_count: int,
    *,
    fill_ratio: float = DEFAULT_FILL_RATIO,
    multiple_of: int = 1,
) -> int:
    """Rows per host so a global batch holds about `tokens_per_batch` target tokens.

    A packed row of T slots holds about fill_ratio * T real tokens, so the global batch needs
    tokens_per_batch / (fill_ratio * T) rows, split over the hosts and rounded up to
    `multiple_of` (e.g. the local device count, so the batch shards evenly). The paper's
    ~25,000 target tokens with T=256 at the default fill gives 109 rows globally. Source
    tokens follow: a row of S=T slots holds about as many source as target tokens.
    """
    _require(tokens_per_batch >= 1, "tokens_per_batch", f"must be >= 1, got {tokens_per_batch}")
    _require(max_target_length >= 1, "max_target_length", f"must be >= 1, got {max_target_length}")
    _require(process_count >= 1, "process_count", f"must be >= 1, got {process_count}")
    _require(0 < fill_ratio <= 1, "fill_ratio", f"must be in (0, 1], got {fill_ratio}")
    _require(multiple_of >= 1, "multiple_of", f"must be >= 1, got {multiple_of}")
    global_rows = math.ceil(tokens_per_batch / (fill_ratio * max_target_length))
    rows = math.ceil(global_rows / process_count)
    return max(multiple_of, math.ceil(rows / multiple_of) * multiple_of)


def packing_stats(batches: Iterable[Batch]) -> dict[str, float]:
    """Fill of packed batches: the fraction of non-pad slots, examples per row, totals."""
    stats = {"batches": 0, "rows": 0, "examples": 0, "source_tokens": 0, "target_tokens": 0}
    source_slots = target_slots = 0
    for batch in batches:
        segments = batch["targets_segment_ids"]
        stats["batches"] += 1
        stats["rows"] += segments.shape[0]
        stats["examples"] += int(segments.max(axis=1).sum())
        stats["source_tokens"] += int(np.count_nonzero(batch["inputs_segment_ids"]))
        stats["target_tokens"] += int(np.count_nonzero(segments))
        source_slots += batch["inputs_segment_ids"].size
        target_slots += segments.size
    return {
        **stats,
        "source_fill": stats["source_tokens"] / max(source_slots, 1),
        "target_fill": stats["target_tokens"] / max(target_slots, 1),
        "examples_per_row": stats["examples"] / max(stats["rows"], 1),
    }


def unpack_batch(batch: Batch) -> list[tuple[list[int], list[int]]]:
    """The (source ids, target ids) of every example packed in a batch, row by row."""
    examples = []
    for row in range(batch["inputs"].shape[0]):
        for segment in range(1, int(batch["targets_segment_ids"][row].max()) + 1):
            source = batch["inputs"][row][batch["inputs_segment_ids"][row] == segment]
            target = batch["targets"][row][batch["targets_segment_ids"][row] == segment]
            examples.append((source.tolist(), target.tolist()))
    return examples


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """One evaluation batch: the model's arrays and, apart from them, which example each row is."""

    arrays: Batch  # SOURCE_KEYS [B, S], and TARGET_KEYS [B, T] when targets were asked for
    index: np.ndarray  # [B] int32: the example's position in the input pairs; -1 for padding

    @property
    def mask(self) -> np.ndarray:
        """[B] bool: True for rows that hold an example."""
        return self.index >= 0


@dataclasses.dataclass
class EvalBatches:
    """Every example of an eval split, in order; iterate for `EvalBatch`es (re-iterable).

    `sources[i]` and `references[i]` are the raw texts of example i of `pairs` (all of them, on
    every host); `indices` are this host's examples.
    """

    batch_size: int
    max_source_length: int
    max_target_length: int | None
    sources: list[str]
    references: list[str]
    indices: list[int]
    num_batches: int
    num_truncated: int
    _inputs: list[np.ndarray] = dataclasses.field(repr=False)
    _targets: list[np.ndarray] | None = dataclasses.field(repr=False)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[EvalBatch]:
        for b in range(self.num_batches):
            start = b * self.batch_size
            chunk = range(start, min(start + self.batch_size, len(self.indices)))
            arrays = _pad_examples(
                [self._inputs[i] for i in chunk], self.batch_size, self.max_source_length, "inputs"
            )
            if self._targets is not None and self.max_target_length is not None:
                targets = [self._targets[i] for i in chunk]
                arrays |= _pad_examples(targets, self.batch_size, self.max_target_length, "targets")
            index = np.full(self.batch_size, -1, dtype=np.int32)
            index[: len(chunk)] = [self.indices[i] for i in chunk]
            yield EvalBatch(arrays, index)


def make_eval_batches(
    pairs: Sequence[Pair],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_source_length: int,
    max_target_length: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> EvalBatches:
    """Unpacked batches of every example, in order; over-long sides are truncated (counted).

    With shard_count > 1 this host takes examples shard_index, shard_index + shard_count, ...
    and every host gets the same number of batches (padding rows make up the difference);
    gather the rows' `index` to put results back in input order.
    """
    _require(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    _require(max_source_length >= 2, "max_source_length", f"must be >= 2, got {max_source_length}")
    _require(
        max_target_length is None or max_target_length >= 2,
        "max_target_length",
        f"must be >= 2 or None, got {max_target_length}",
    )
    _require(shard_count >= 1, "shard_count", f"must be >= 1, got {shard_count}")
    _require(
        0 <= shard_index < shard_count,
        "shard_index",
        f"must be in [0, shard_count={shard_count}), got {shard_index}",
    )
    sources = [source for source, _ in pairs]
    references = [target for _, target in pairs]
    indices = list(range(shard_index, len(pairs), shard_count))
    truncated = 0
    inputs, count = encode_truncated(tokenizer, [sources[i] for i in indices], max_source_length)
    truncated += count
    targets = None
    if max_target_length is not None:
        host_references = [references[i] for i in indices]
        targets, count = encode_truncated(
            tokenizer, host_references, max_target_length, side="target"
        )
        truncated += count
    if truncated:
        logging.warning(
            "Eval: truncated %d of %d examples' sides to max_source_length=%d / "
            "max_target_length=%s tokens (EOS kept); they are still evaluated.",
            truncated,
            len(indices),
            max_source_length,
            max_target_length,
        )
    per_host = math.ceil(len(pairs) / shard_count)
    return EvalBatches(
        batch_size=batch_size,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
        sources=sources,
        references=references,
        indices=indices,
        num_batches=math.ceil(per_host / batch_size),
        num_truncated=truncated,
        _inputs=inputs,
        _targets=targets,
    )


def encode_truncated(
    tokenizer: Tokenizer, texts: Sequence[str], max_length: int, side: Side = "source"
) -> tuple[list[np.ndarray], int]:
    """EOS-terminated ids, cut to max_length with EOS kept last; also how many were cut.

    The one rule for every evaluation and translation input (EOS counts toward the length).
    """
    encoded = []
    cut = 0
    for ids in tokenizer.encode_batch(list(texts), side=side):
        if len(ids) >= max_length:
            ids = ids[: max_length - 1]
            cut += 1
        encoded.append(np.asarray([*ids, EOS_ID], dtype=np.int32))
    return encoded, cut


def _pad_examples(examples: list[np.ndarray], rows: int, length: int, name: str) -> Batch:
    ids = np.full((rows, length), PAD_ID, dtype=np.int32)
    segmentation = np.zeros((rows, length), dtype=np.int32)
    position = np.zeros((rows, length), dtype=np.int32)
    for row, example in enumerate(examples):
        n = len(example)
        ids[row, :n] = example
        segmentation[row, :n] = 1
        position[row, :n] = np.arange(n, dtype=np.int32)
    return {name: ids, f"{name}_segment_ids": segmentation, f"{name}_positions": position}


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")
