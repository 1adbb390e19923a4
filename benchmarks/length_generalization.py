"""How far each position scheme generalises past the training length (sacreBLEU per length).

    python benchmarks/length_generalization.py [--output runs/length_generalization]
        [--num_steps 1200] [--cap 24] [--schemes sinusoidal,learned,rope,alibi,rope_window]
        [--window 16] [--png docs/length_generalization.png]

Trains the default model (configs/default.py: the built-in EN->DE corpus, the tiny 2+2-layer
model) once per scheme with every row capped at --cap tokens, so no training sentence is
longer than that (longer pairs are dropped, and the count is logged). Then it translates test
inputs made by joining 1, 2, 4 and 8 consecutive test sentences (the references joined the
same way), greedily, and reports sacreBLEU per source-length bucket, up to well past 4x the cap.
Every model's max_len is 512, so sinusoidal, rope and alibi can run at any length here; the
learned table's rows past the cap are never trained (they keep their N(0, 0.02) init). Each
run is an ordinary workdir under --output; a finished one is reused, so a rerun only
evaluates. Prints one table and writes a PNG (matplotlib) of BLEU against source length.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMES: dict[str, dict[str, Any]] = {
    "sinusoidal": {"position_encoding": "sinusoidal"},
    "learned": {"position_encoding": "learned"},
    "rope": {"position_encoding": "rope"},
    "alibi": {"position_encoding": "alibi"},
    "rope_window": {"position_encoding": "rope"},  # attention_window from --window
    "none": {"position_encoding": "none"},
}
JOINS = (1, 2, 4, 8)
MAX_LEN = 512


def experiment(args: argparse.Namespace, scheme: str) -> Any:
    """configs/default.py with this scheme, rows capped at --cap tokens."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from configs import default

    config = default.get_config()
    for field, value in SCHEMES[scheme].items():
        config.model[field] = value
    if scheme == "rope_window":
        config.model.attention_window = args.window
    config.model.max_len = MAX_LEN
    config.data.max_source_length = args.cap
    config.data.max_target_length = args.cap
    config.data.test_split = ""  # the joined test inputs are evaluated below
    config.train.num_steps = args.num_steps
    config.train.eval_every = 0
    config.decode.max_length = MAX_LEN
    return config


def train(args: argparse.Namespace, scheme: str) -> Path:
    """The scheme's workdir, trained (or reused when it reached --num_steps)."""
    from transformer_jax.training.loop import train_and_evaluate
    from transformer_jax.workdir import Workdir

    workdir = Path(args.output) / scheme
    if workdir.exists() and args.num_steps in Workdir(workdir).steps():
        print(f"{scheme}: reusing {workdir}", flush=True)
        return workdir
    start = time.time()
    train_and_evaluate(experiment(args, scheme), workdir)
    print(f"{scheme}: trained in {time.time() - start:.0f} s -> {workdir}", flush=True)
    return workdir


def joined_test_set() -> tuple[list[str], list[str]]:
    """Sources and references of 1, 2, 4 and 8 consecutive test sentences joined by spaces."""
    from transformer_jax.data.corpus import builtin_corpus

    pairs = builtin_corpus(seed=0)["test"]
    sources, references = [], []
    for n in JOINS:
        for i in range(0, len(pairs) - n + 1, n):
            group = pairs[i : i + n]
            sources.append(" ".join(s for s, _ in group))
            references.append(" ".join(t for _, t in group))
    return sources, references


def buckets(cap: int) -> list[tuple[int, int]]:
    """Source-length buckets (tokens, EOS included): within the cap, then doubling past it."""
    edges = [1, cap, 2 * cap, 4 * cap, 8 * cap, 16 * cap]
    return [(lo + (0 if i == 0 else 1), hi) for i, (lo, hi) in enumerate(itertools.pairwise(edges))]


def evaluate(workdir: Path, cap: int, sources: list[str], refs: list[str]) -> dict[str, Any]:
    """sacreBLEU per source-length bucket of the joined test set (greedy decoding)."""
    import sacrebleu

    from transformer_jax import load

    translator = load(workdir)
    lengths = [len(ids) + 1 for ids in translator.tokenizer.encode_batch(sources)]
    hyps = translator.translate(sources, method="greedy", max_source_length=MAX_LEN)
    rows = {}
    for lo, hi in buckets(cap):
        picked = [i for i, n in enumerate(lengths) if lo <= n <= hi]
        if not picked:
            continue
        bleu = sacrebleu.corpus_bleu([hyps[i] for i in picked], [[refs[i] for i in picked]])
        rows[f"{lo}-{hi}"] = {
            "bleu": round(bleu.score, 2),
            # Output length over reference length: below 1, the model stops early.
            "length_ratio": round(bleu.sys_len / max(bleu.ref_len, 1), 3),
            "sentences": len(picked),
        }
    return rows


def plot(results: dict[str, dict[str, Any]], cap: int, path: str) -> None:
    """BLEU against source length, one line per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for scheme, rows in results.items():
        mids = [np.sqrt(int(k.split("-")[0]) * int(k.split("-")[1])) for k in rows]
        ax.plot(mids, [r["bleu"] for r in rows.values()], marker="o", label=scheme)
    ax.axvline(cap, color="grey", linestyle="--", linewidth=1)
    ax.text(cap, 2, f" training cap ({cap} tokens)", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("source length (tokens, bucket midpoint)")
    ax.set_ylabel("sacreBLEU")
    ax.set_ylim(0, 100)
    ax.set_title("Length generalisation on the built-in corpus (greedy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Train every scheme, evaluate, print the table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/length_generalization")
    parser.add_argument("--num_steps", type=int, default=1200)
    parser.add_argument("--cap", type=int, default=24, help="tokens per training row")
    parser.add_argument("--schemes", default="sinusoidal,learned,rope,alibi,rope_window")
    parser.add_argument("--window", type=int, default=16, help="rope_window's window")
    parser.add_argument("--png", default=None, help="default: OUTPUT/length_generalization.png")
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    schemes = args.schemes.split(",")
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        raise SystemExit(f"error: --schemes: unknown {unknown}; choose from {sorted(SCHEMES)}")
    sources, refs = joined_test_set()
    results = {}
    for scheme in schemes:
        results[scheme] = evaluate(train(args, scheme), args.cap, sources, refs)
        print(f"{scheme}: {results[scheme]}", flush=True)
    columns = list(dict.fromkeys(k for rows in results.values() for k in rows))
    counts = {k: next(r[k]["sentences"] for r in results.values() if k in r) for k in columns}
    print(f"\nsacreBLEU by source length (tokens incl. EOS; training rows <= {args.cap} tokens)")
    print("| scheme | " + " | ".join(f"{k} ({counts[k]})" for k in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for scheme, rows in results.items():
        cells = [
            f"{rows[k]['bleu']:.1f} ({rows[k]['length_ratio']:.2f})" if k in rows else ""
            for k in columns
        ]
        print(f"| {scheme} | " + " | ".join(cells) + " |")
    print("(in brackets: output length / reference length)")
    png = args.png or str(Path(args.output) / "length_generalization.png")
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.cap, png)
    print(f"plot: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
