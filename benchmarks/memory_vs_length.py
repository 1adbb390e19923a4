"""Compiled train-step memory per chip against sequence length, with and without remat.

    python benchmarks/memory_vs_length.py [--config configs/wmt14_ende_base.py]
        [--topology v5e-8] [--lengths 256,1024,4096] [--remat none,full,dots]
        [--attention_impl einsum|dot_product|splash] [--tokens_per_batch 25000]
        [--jsonl out.jsonl]

Compiles the real train step ahead of time for a TPU slice (libtpu, no TPU needed; see
docs/tpu.md) at each (length, remat) pair and prints XLA's per-chip HBM use. `--topology local`
compiles for this machine's own devices instead (a GPU, where `--attention_impl dot_product`
takes cuDNN's fused attention; on CPU, host memory). `--attention_impl splash` compiles
Pallas splash attention's Mosaic kernel (TPU slices only: elsewhere it runs in interpret
mode, which says nothing about a TPU's memory). XLA's cost analysis counts no FLOPs inside a
Mosaic kernel, so the table also gives the analytic count (metrics.train_flops: 3x the forward
matmuls, attention's QK^T and PV included). Source and target
rows both get `length` tokens; the batch keeps `tokens_per_batch` target tokens (rounded up to
whole rows per chip), so every row of the table trains on about the same number of tokens and
only the shape changes: fewer, longer rows. Attention scores grow as rows x length^2, so this
is where the quadratic term shows. A pair that does not fit is a row saying so, not a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections

from transformer_jax import aot


def load_config(path: str) -> ml_collections.ConfigDict:
    """get_config() of a config file, imported by path (configs/ may import its siblings)."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--config {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sized(
    config: ml_collections.ConfigDict,
    length: int,
    remat: str,
    attention_impl: str,
    tokens_per_batch: int,
) -> ml_collections.ConfigDict:
    """A copy of config with both row lengths, remat, attention path and batch size set."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.max_source_length = length
    config.data.max_target_length = length
    config.data.tokens_per_batch = tokens_per_batch
    config.model.max_len = max(config.model.max_len, length)
    config.model.remat = remat
    config.model.attention_impl = attention_impl
    return config


def measure(config: ml_collections.ConfigDict, topology: str, name: str) -> dict[str, Any]:
    """One AOT compile: the report's fields, or the reason it does not fit."""
    try:
        report = aot.run(config, topology)
    except aot.DoesNotFitError as e:
        return {"config": name, "fits": False, "error": str(e).splitlines()[0]}
    return {"fits": report.fits, **dataclasses.asdict(report), "config": name}


def main() -> None:
    """Compile every (length, remat) pair and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/wmt14_ende_base.py")
    parser.add_argument("--topology", default="v5e-8", help="a TPU slice, or 'local'")
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--remat", default="none,full,dots")
    parser.add_argument(
        "--attention_impl", choices=["einsum", "dot_product", "splash"], default="einsum"
    )
    parser.add_argument("--tokens_per_batch", type=int, default=None)
    parser.add_argument("--jsonl", default=None, help="also append each result as a JSON line")
    args = parser.parse_args()
    # Compile-only TPU devices need no chip (and jax read the variable at import).
    if args.topology != "local" and "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")

    base = load_config(args.config)
    tokens = args.tokens_per_batch or int(base.data.tokens_per_batch)
    lengths = [int(x) for x in args.lengths.split(",")]
    remats = args.remat.split(",")
    print(
        f"{args.config} on {args.topology}, {tokens} target tokens per step, "
        f"attention {args.attention_impl}",
        flush=True,
    )
    try:
        rows = measure_all(base, args, lengths, remats, tokens)
    except aot.TopologyError as e:  # libtpu missing or a bad slice: one line, not a traceback
        raise SystemExit(f"error: {e}") from e
    print_table(rows)


def measure_all(
    base: ml_collections.ConfigDict,
    args: argparse.Namespace,
    lengths: list[int],
    remats: list[str],
    tokens: int,
) -> list[dict[str, Any]]:
    """Compile every (length, remat) pair, printing each result as it comes."""
    rows = []
    for length in lengths:
        for remat in remats:
            config = sized(base, length, remat, args.attention_impl, tokens)
            result = {
                "length": length,
                "remat": remat,
                **measure(config, args.topology, args.config),
            }
            rows.append(result)
            print(f"  length {length} remat {remat}: {_summary(result)}", flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(result) + "\n")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The markdown table of all results."""
    print(
        "\n| length | rows | remat | HBM per chip (GiB) | temporaries (GiB) | fits | "
        "GFLOP/step per chip (XLA) | GFLOP/step per chip (model) | compile (s) |"
    )
    print("|---:|---:|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        if "peak_gib" not in r:
            print(f"| {r['length']} | | {r['remat']} | | | no: {r['error']} | | | |")
            continue
        print(
            f"| {r['length']} | {r['rows']} | {r['remat']} | {r['peak_gib']:.2f} of "
            f"{r['capacity_gib']:.4g} | {r['temp_gib']:.2f} | {'yes' if r['fits'] else 'no'} | "
            f"{r['flops_per_chip'] / 1e9:,.0f} | {r['model_flops_per_chip'] / 1e9:,.0f} | "
            f"{r['compile_s']:.0f} |"
        )


def _summary(result: dict[str, Any]) -> str:
    if "peak_gib" not in result:
        return f"does not fit ({result['error']})"
    return (
        f"{result['peak_gib']:.2f} GiB per chip (temporaries {result['temp_gib']:.2f}), "
        f"{result['rows']} rows, compiled in {result['compile_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
