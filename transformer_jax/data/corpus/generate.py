"""The built-in corpus: disjoint seeded splits of distinct pairs, files, statistics and the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformer_jax.data.corpus.sampling import generate_pair, max_distinct_pairs


@dataclasses.dataclass(frozen=True)
class CorpusSizes:
    """Number of pairs per split of the built-in corpus."""

    train: int = 50_000
    validation: int = 1_000
    test: int = 1_000


SPLITS = ("train", "validation", "test")


@functools.lru_cache(maxsize=4)
def _corpus(seed: int, sizes: CorpusSizes) -> dict[str, tuple[tuple[str, str], ...]]:
    counts = {split: getattr(sizes, split) for split in SPLITS}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"corpus sizes must be non-negative, got {sizes}")
    total = sum(counts.values())
    capacity = max_distinct_pairs()
    if total > capacity:
        raise ValueError(
            f"{sizes} asks for {total:,} distinct pairs; the grammar can make at most {capacity:,}"
        )
    rng = random.Random(seed)
    seen_en: set[str] = set()
    seen_de: set[str] = set()
    pairs: list[tuple[str, str]] = []
    # The capacity is astronomically larger than any practical size, so repeats stay rare; the
    # cap on attempts only turns a bug into an error instead of an endless loop.
    for _ in range(20 * total + 1000):
        if len(pairs) == total:
            break
        en, de = generate_pair(rng)
        # Dropping a repeat on either side keeps every English and every German string in one
        # split only.
        if en in seen_en or de in seen_de:
            continue
        seen_en.add(en)
        seen_de.add(de)
        pairs.append((en, de))
    else:
        raise RuntimeError(f"could not sample {total:,} distinct pairs")
    # Test and validation come first, so they do not change when only the train size does.
    test, rest = pairs[: sizes.test], pairs[sizes.test :]
    validation, train = rest[: sizes.validation], rest[sizes.validation :]
    return {"train": tuple(train), "validation": tuple(validation), "test": tuple(test)}


def builtin_corpus(
    seed: int = 0, sizes: CorpusSizes = CorpusSizes()
) -> dict[str, list[tuple[str, str]]]:
    """Deterministic disjoint splits {'train', 'validation', 'test'} of distinct (en, de) pairs."""
    return {split: list(pairs) for split, pairs in _corpus(seed, sizes).items()}


def write_builtin_corpus(
    directory: str | Path, seed: int = 0, sizes: CorpusSizes = CorpusSizes()
) -> dict[str, tuple[Path, Path]]:
    """Write {split}.en / {split}.de files (one sentence per line, UTF-8) and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, tuple[Path, Path]] = {}
    for split, pairs in builtin_corpus(seed, sizes).items():
        en_path, de_path = directory / f"{split}.en", directory / f"{split}.de"
        for path, side in ((en_path, 0), (de_path, 1)):
            path.write_text("".join(p[side] + "\n" for p in pairs), encoding="utf-8")
        paths[split] = (en_path, de_path)
    return paths


_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")


def words(sentence: str) -> list[str]:
    """The words of a sentence, without punctuation ('twenty-four' and "o'clock" are one)."""
    return _WORD.findall(sentence)


def corpus_stats(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Pair count, word types and mean/max words per sentence on each side."""
    stats: dict[str, float] = {"pairs": 0}
    sides: dict[str, tuple[set[str], list[int]]] = {"en": (set(), []), "de": (set(), [])}
    for pair in pairs:
        stats["pairs"] += 1
        for side, sentence in zip(("en", "de"), pair, strict=True):
            tokens = words(sentence)
            sides[side][0].update(tokens)
            sides[side][1].append(len(tokens))
    for side, (types, lengths) in sides.items():
        stats[f"{side}_types"] = len(types)
        stats[f"{side}_mean_words"] = sum(lengths) / len(lengths) if lengths else 0.0
        stats[f"{side}_max_words"] = max(lengths, default=0)
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the built-in corpus to --out and print its statistics."""
    parser = argparse.ArgumentParser(
        prog="python -m transformer_jax.data.corpus",
        description="Write the built-in English->German corpus and print its statistics.",
    )
    parser.add_argument("--out", required=True, help="directory for {split}.en / {split}.de")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=CorpusSizes.train)
    parser.add_argument("--validation", type=int, default=CorpusSizes.validation)
    parser.add_argument("--test", type=int, default=CorpusSizes.test)
    args = parser.parse_args(argv)
    sizes = CorpusSizes(args.train, args.validation, args.test)
    start = time.perf_counter()
    paths = write_builtin_corpus(args.out, args.seed, sizes)
    print(f"wrote {sum(vars(sizes).values()):,} pairs in {time.perf_counter() - start:.1f} s")
    for split, (en_path, de_path) in paths.items():
        pairs = builtin_corpus(args.seed, sizes)[split]
        print(f"{split}: {en_path}, {de_path}: {corpus_stats(pairs)}")
    print(f"the grammar can make {max_distinct_pairs():,} distinct pairs")
