"""Training-pipeline throughput on the built-in corpus: target tokens per second per host core.

    python benchmarks/pipeline_throughput.py [--batches 200] [--warmup 20] [--vocab_size 1024]

Trains a tokenizer into a temporary folder, then for each row shape times `--batches` packed
batches after `--warmup` batches. The pipeline runs in this one Python thread (read_threads=0),
so wall-clock throughput is the throughput of one host core; CPU seconds are printed too.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from transformer_jax.data.pipeline import make_train_dataset, packing_stats
from transformer_jax.data.sources import builtin_pairs
from transformer_jax.data.tokenizer import train_tokenizer

# (rows per batch, max_source_length, max_target_length)
SHAPES = [(64, 64, 64), (128, 128, 128), (64, 256, 256)]


def main() -> None:
    """Print one table row per batch shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="timed batches per shape")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    parser.add_argument("--vocab_size", type=int, default=1024, help="tokenizer pieces")
    args = parser.parse_args()

    pairs = builtin_pairs("train")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tokenizer = train_tokenizer(
            (s for pair in pairs for s in pair), Path(tmp) / "spm", args.vocab_size
        )
        train_s = time.perf_counter() - start
    print(
        f"built-in corpus: {len(pairs)} train pairs; tokenizer {tokenizer.vocab_size} pieces "
        f"trained in {train_s:.1f} s; {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )
    header = (
        f"{'B':>4} {'S':>4} {'T':>4} {'batches/s':>10} {'tgt tok/s':>10} "
        f"{'tgt tok/cpu-s':>14} {'ex/s':>8} {'tgt fill':>9} {'src fill':>9}"
    )
    print(header)
    print("-" * len(header))
    for batch_size, source_length, target_length in SHAPES:
        dataset = make_train_dataset(
            pairs,
            tokenizer,
            batch_size=batch_size,
            max_source_length=source_length,
            max_target_length=target_length,
            seed=0,
            shard_index=0,
            shard_count=1,
        )
        iterator = iter(dataset)
        for _ in range(args.warmup):
            next(iterator)
        wall, cpu = time.perf_counter(), time.process_time()
        batches = list(itertools.islice(iterator, args.batches))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = packing_stats(batches)
        target_tokens = stats["target_tokens"]
        print(
            f"{batch_size:>4} {source_length:>4} {target_length:>4} "
            f"{len(batches) / wall:>10.1f} {target_tokens / wall:>10,.0f} "
            f"{target_tokens / cpu:>14,.0f} {stats['examples'] / wall:>8,.0f} "
            f"{stats['target_fill']:>9.3f} {stats['source_fill']:>9.3f}"
        )
        assert all(b["inputs"].dtype == np.int32 for b in batches)


if __name__ == "__main__":
    main()
