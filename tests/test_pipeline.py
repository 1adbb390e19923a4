"""Tests for transformer_jax.data.pipeline: packing, determinism, resume, shards, eval batches."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import random
from typing import Any

import numpy as np
import pytest
import tensorflow_datasets as tfds

from transformer_jax.config import EOS_ID, PAD_ID
from transformer_jax.data.pipeline import (
    filter_counts,
    make_eval_batches,
    make_train_dataset,
    packing_stats,
    rows_for_token_budget,
    unpack_batch,
)
from transformer_jax.data.sources import tfds_pairs
from transformer_jax.data.tokenizer import Tokenizer, train_tokenizer

_EN = ["the", "a", "cat", "dog", "house", "tree", "sees", "big", "red", "over", "under"]
_DE = ["der", "die", "katze", "hund", "haus", "baum", "sieht", "groß", "rot", "über"]
_KEYS = {
    "inputs",
    "inputs_segment_ids",
    "inputs_positions",
    "targets",
    "targets_segment_ids",
    "targets_positions",
}
Example = tuple[tuple[int, ...], tuple[int, ...]]


def _make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct pairs of 2-16 words; the trailing number makes every pair unique."""
    rng = random.Random(seed)
    return [
        (
            " ".join(rng.choice(_EN) for _ in range(rng.randint(1, 15))) + f" {i}",
            " ".join(rng.choice(_DE) for _ in range(rng.randint(1, 15))) + f" {i}",
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    """300 distinct training pairs."""
    return _make_pairs(300)


@pytest.fixture(scope="module")
def tokenizer(pairs: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A small shared vocabulary over the pairs."""
    sentences = [s for pair in pairs for s in pair]
    return train_tokenizer(sentences, tmp_path_factory.mktemp("tok") / "m", vocab_size=200)


def _dataset(pairs: list[tuple[str, str]], tokenizer: Tokenizer, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "batch_size": 4,
        "max_source_length": 32,
        "max_target_length": 40,
        "seed": 0,
        "shard_index": 0,
        "shard_count": 1,
        "num_epochs": 1,
    }
    return make_train_dataset(pairs, tokenizer, **{**options, **overrides})


def _tokenized(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> list[Example]:
    return [((*tokenizer.encode(s), EOS_ID), (*tokenizer.encode(t), EOS_ID)) for s, t in pairs]


def _examples(batches: list[dict[str, np.ndarray]]) -> list[Example]:
    return [(tuple(s), tuple(t)) for batch in batches for s, t in unpack_batch(batch)]


def _assert_same_batches(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_format(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> None:
    """Static int32 [B, S] / [B, T] arrays; segments 1, 2, ...; positions restart at 0."""
    batches = list(_dataset(pairs, tokenizer))
    for batch in batches:
        assert set(batch) == _KEYS
        for key, value in batch.items():
            length = 32 if key.startswith("inputs") else 40
            assert value.shape == (4, length) and value.dtype == np.int32, key
        for side in ("inputs", "targets"):
            ids, seg, pos = (batch[side], batch[f"{side}_segment_ids"], batch[f"{side}_positions"])
            # Padding is PAD_ID with segment 0 and position 0.
            assert np.all(ids[seg == 0] == PAD_ID) and np.all(pos[seg == 0] == 0)
            for row in range(ids.shape[0]):
                used = seg[row][seg[row] > 0]
                # Segments are 1, 2, 3, ... in order, contiguous, padding only at the end.
                assert list(np.unique(used)) == list(range(1, len(np.unique(used)) + 1))
                assert np.all(np.diff(used) >= 0) and np.all(seg[row][len(used) :] == 0)
                for segment in np.unique(used):
                    where = seg[row] == segment
                    assert list(pos[row][where]) == list(range(where.sum()))
                    assert ids[row][where][-1] == EOS_ID
                    assert np.count_nonzero(ids[row][where] == EOS_ID) == 1
        # Source and target of an example share the row and segment id.
        np.testing.assert_array_equal(
            batch["inputs_segment_ids"].max(axis=1), batch["targets_segment_ids"].max(axis=1)
        )


def test_packing_keeps_every_token_and_reports_fill(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer
) -> None:
    """Unpacking one epoch gives back exactly the tokenized examples; fill is reported."""
    batches = list(_dataset(pairs, tokenizer))
    recovered = _examples(batches)
    assert collections.Counter(recovered) == collections.Counter(_tokenized(pairs, tokenizer))
    stats = packing_stats(batches)
    assert stats["examples"] == len(pairs)
    total_target = sum(len(t) for _, t in recovered)
    assert stats["target_tokens"] == total_target
    assert stats["target_fill"] == pytest.approx(total_target / (len(batches) * 4 * 40))
    assert stats["source_fill"] == pytest.approx(
        sum(len(s) for s, _ in recovered) / (len(batches) * 4 * 32)
    )
    # Packing earns its keep: more than one example per row, rows mostly full.
    assert stats["examples_per_row"] > 2 and stats["target_fill"] > 0.6


def test_last_batch_is_padded_not_dropped(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer
) -> None:
    """With finite epochs the final short batch keeps its shape with all-PAD rows."""
    batches = list(_dataset(pairs[:13], tokenizer, batch_size=16))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["inputs"].shape == (16, 32)
    empty_rows = batch["targets_segment_ids"].max(axis=1) == 0
    assert empty_rows.any() and np.all(batch["targets"][empty_rows] == PAD_ID)
    assert packing_stats(batches)["examples"] == 13


def test_over_long_and_empty_examples_are_dropped_and_counted(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Examples longer than a row (EOS included) are dropped, counted and logged."""
    data = [*_make_pairs(60, seed=4), ("", "leer"), ("empty target", "")]
    lengths = _tokenized(data, tokenizer)
    too_long = sum(
        1 for s, t in lengths if len(s) > 1 and len(t) > 1 and (len(s) > 12 or len(t) > 10)
    )
    assert too_long > 0
    with caplog.at_level(logging.WARNING):
        iterator = iter(_dataset(data, tokenizer, max_source_length=12, max_target_length=10))
        batches = list(iterator)
    assert filter_counts(iterator) == {"kept": 60 - too_long, "empty": 2, "too_long": too_long}
    assert packing_stats(batches)["examples"] == 60 - too_long
    assert "dropped 1 too-long" in caplog.text and "dropped 1 empty" in caplog.text
    # The counts are part of the checkpointed state (as of the last packed group's start).
    saved = iterator.get_state()["parent"]["counts"]
    assert set(saved) == {"kept", "empty", "too_long"} and 0 < saved["too_long"] <= too_long


def test_same_seed_same_batches_other_seed_other_batches(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer
) -> None:
    """Determinism: one seed fixes the batches; another seed changes them."""
    a = list(itertools.islice(_dataset(pairs, tokenizer, num_epochs=None, seed=3), 8))
    b = list(itertools.islice(_dataset(pairs, tokenizer, num_epochs=None, seed=3), 8))
    c = list(itertools.islice(_dataset(pairs, tokenizer, num_epochs=None, seed=4), 8))
    _assert_same_batches(a, b)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    # Reader threads change the speed, not the order.
    threaded = _dataset(pairs, tokenizer, num_epochs=None, seed=3, read_threads=2)
    _assert_same_batches(a, list(itertools.islice(threaded, 8)))


def test_every_epoch_is_reshuffled(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> None:
    """Two epochs hold every example twice, in unrelated orders."""
    examples = _examples(list(_dataset(pairs, tokenizer, num_epochs=2)))
    counts = collections.Counter(examples)
    assert len(counts) == len(pairs) and set(counts.values()) == {2}
    first_seen: dict[Example, int] = {}
    second_seen: dict[Example, int] = {}
    for position, example in enumerate(examples):
        (second_seen if example in first_seen else first_seen)[example] = position
    order = list(first_seen)
    first = np.argsort(np.argsort([first_seen[e] for e in order]))
    second = np.argsort(np.argsort([second_seen[e] for e in order]))
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.5


@pytest.mark.parametrize("num_packing_bins", [None, 7])
@pytest.mark.parametrize("num_epochs", [None, 2])
def test_resume_sees_the_batches_of_an_uninterrupted_run(
    pairs: list[tuple[str, str]],
    tokenizer: Tokenizer,
    num_packing_bins: int | None,
    num_epochs: int | None,
) -> None:
    """A state saved as JSON and restored on a new iterator continues identically."""
    overrides = {"num_epochs": num_epochs, "num_packing_bins": num_packing_bins, "seed": 11}
    iterator = iter(_dataset(pairs, tokenizer, **overrides))
    for _ in range(23):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    if num_packing_bins == 7:
        # 7 packed rows per group, 4 per batch: the state falls inside a packing group.
        assert state["next_row"] != 0
    uninterrupted = list(itertools.islice(iterator, 60))
    resumed_iterator = iter(_dataset(pairs, tokenizer, **overrides))
    resumed_iterator.set_state(state)
    resumed = list(itertools.islice(resumed_iterator, 60))
    _assert_same_batches(uninterrupted, resumed)
    assert filter_counts(resumed_iterator) == filter_counts(iterator)


def test_shards_are_disjoint_and_cover_the_data(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer
) -> None:
    """shard_count=2: each example of the epoch lands on exactly one host."""
    shards = [
        collections.Counter(
            _examples(list(_dataset(pairs, tokenizer, shard_index=i, shard_count=2)))
        )
        for i in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert shards[0] + shards[1] == collections.Counter(_tokenized(pairs, tokenizer))
    assert abs(sum(shards[0].values()) - sum(shards[1].values())) <= 1


def test_start_index_drops_a_prefix_of_the_global_order_for_any_number_of_shards(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer
) -> None:
    """How a resume on another number of hosts continues: the same examples however split."""

    def seen(start: int, count: int) -> collections.Counter[Example]:
        return collections.Counter(
            example
            for i in range(count)
            for example in _examples(
                list(
                    _dataset(pairs, tokenizer, shard_index=i, shard_count=count, start_index=start)
                )
            )
        )

    after_40 = seen(40, 1)
    assert sum(after_40.values()) == len(pairs) - 40
    assert seen(40, 3) == seen(40, 2) == after_40
    assert sum(seen(100, 2).values()) == len(pairs) - 100
    assert (
        seen(100, 2) <= after_40 < seen(0, 1) == collections.Counter(_tokenized(pairs, tokenizer))
    )
    with pytest.raises(ValueError, match="start_index"):
        _dataset(pairs, tokenizer, start_index=-1)


def test_train_dataset_rejects_bad_arguments(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer
) -> None:
    """Invalid arguments are ValueErrors naming the argument."""
    with pytest.raises(ValueError, match="shard_index"):
        _dataset(pairs, tokenizer, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        _dataset(pairs, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="num_epochs"):
        _dataset(pairs, tokenizer, num_epochs=0)
    with pytest.raises(ValueError, match="pairs"):
        _dataset([], tokenizer)


def test_rows_for_token_budget() -> None:
    """The paper's 25k target tokens in rows of 256 at 90% fill, split over hosts."""
    assert rows_for_token_budget(25_000, 256, 1) == 109
    assert rows_for_token_budget(25_000, 256, 8) == 14
    assert rows_for_token_budget(25_000, 256, 8, multiple_of=4) == 16
    assert rows_for_token_budget(25_000, 256, 1, fill_ratio=1.0) == 98
    assert rows_for_token_budget(10, 256, 64) == 1
    with pytest.raises(ValueError, match="fill_ratio"):
        rows_for_token_budget(25_000, 256, 1, fill_ratio=0.0)


def test_eval_batches_keep_every_example_in_order(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """No packing and no filtering: all examples, in order, a mask and an index; long ones cut."""
    data = pairs[:21]
    with caplog.at_level(logging.WARNING):
        eval_batches = make_eval_batches(
            data, tokenizer, batch_size=8, max_source_length=10, max_target_length=64
        )
    batches = list(eval_batches)
    assert len(batches) == len(eval_batches) == 3
    expected_cut = sum(1 for s, _ in _tokenized(data, tokenizer) if len(s) > 10)
    assert eval_batches.num_truncated == expected_cut > 0
    assert f"truncated {expected_cut} of 21" in caplog.text
    mask = np.concatenate([b.mask for b in batches])
    index = np.concatenate([b.index for b in batches])
    assert mask.dtype == bool and mask.sum() == 21 and list(mask) == [True] * 21 + [False] * 3
    assert list(index) == [*range(21), -1, -1, -1]
    assert eval_batches.references == [t for _, t in data]
    assert eval_batches.sources == [s for s, _ in data]
    for batch in batches:
        assert batch.arrays["inputs"].shape == (8, 10) and batch.arrays["targets"].shape == (8, 64)
        for row in range(8):
            i = batch.index[row]
            if i < 0:
                assert (
                    not batch.arrays["inputs"][row].any()
                    and not batch.arrays["inputs_segment_ids"][row].any()
                )
                continue
            n = int(batch.arrays["inputs_segment_ids"][row].sum())
            assert batch.arrays["inputs"][row][n - 1] == EOS_ID
            assert list(batch.arrays["inputs_positions"][row][:n]) == list(range(n))
            source_ids = tokenizer.encode(data[i][0])
            if len(source_ids) < 10:
                assert list(batch.arrays["inputs"][row][: n - 1]) == source_ids
            else:
                assert list(batch.arrays["inputs"][row][: n - 1]) == source_ids[:9]
            # Targets are never cut here (64 is enough), so they decode to the reference.
            assert tokenizer.decode(batch.arrays["targets"][row]) == data[i][1]
    # Re-iterable: a second evaluation sees the same batches.
    flat = [{**b.arrays, "index": b.index} for b in batches]
    _assert_same_batches(flat, [{**b.arrays, "index": b.index} for b in eval_batches])


def test_eval_batches_without_targets(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> None:
    """Without max_target_length only the source side is batched."""
    batch = next(iter(make_eval_batches(pairs[:3], tokenizer, batch_size=4, max_source_length=64)))
    assert set(batch.arrays) == {"inputs", "inputs_segment_ids", "inputs_positions"}
    assert list(batch.index) == [0, 1, 2, -1] and list(batch.mask) == [True] * 3 + [False]


def test_eval_batches_sharded_over_hosts(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer
) -> None:
    """Hosts split the examples, get equally many batches, and indices restore the order."""
    hosts = [
        list(
            make_eval_batches(
                pairs[:21],
                tokenizer,
                batch_size=4,
                max_source_length=64,
                shard_index=i,
                shard_count=2,
            )
        )
        for i in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == 3
    indices = [int(i) for host in hosts for b in host for i in b.index[b.mask]]
    assert sorted(indices) == list(range(21))


def test_mock_tfds_end_to_end(tmp_path: Any) -> None:
    """Mocked WMT14 -> pairs -> tokenizer -> packed training batches and eval batches."""
    with tfds.testing.mock_data(num_examples=40):
        train = tfds_pairs(split="train")
        test = tfds_pairs(split="test")
        tokenizer = train_tokenizer(
            (s for pair in train for s in pair), tmp_path / "wmt", vocab_size=64
        )
        iterator = iter(
            make_train_dataset(
                train,
                tokenizer,
                batch_size=4,
                max_source_length=64,
                max_target_length=64,
                seed=0,
                shard_index=0,
                shard_count=1,
                num_epochs=1,
            )
        )
        batches = list(iterator)
        eval_batches = make_eval_batches(test, tokenizer, batch_size=16, max_source_length=64)
        eval_list = list(eval_batches)
    counts = filter_counts(iterator)
    assert counts["kept"] + counts["empty"] + counts["too_long"] == 40
    assert packing_stats(batches)["examples"] == counts["kept"] > 0
    assert sum(int(b.mask.sum()) for b in eval_list) == len(test) == 40
    assert len(eval_batches.references) == 40
