"""Decoding speed: target tokens/s of greedy and beam search, and the cost per token vs length.

    python benchmarks/decode_speed.py [--repeats 3] [--models tiny base] [--lengths 16 32 64 128]

Random parameters. The output length is forced so every length is measured exactly: EOS is
blocked (min_length) and each sentence's cap, source length + extra_length, is set to L.
max_length (the output buffer) stays at the largest L for every row of the table; the
self-attention cache grows with the decoded tokens (inference/decode.py), so a second table,
at L = 16 with several buffer sizes, shows what a loose max_length still costs. Each figure is
the best of --repeats runs after one compiling run; one jit per decoder and buffer size
(extra_length and min_length are traced arguments).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import EOS_ID, PAD_ID, ModelConfig
from transformer_jax.inference.decode import beam_search, greedy_decode
from transformer_jax.model import Transformer

Array = jax.Array

SOURCE_LENGTH = 16
# (config, sentences per batch): the built-in-corpus model and the paper's base shape.
MODELS = {
    "tiny": (
        ModelConfig.preset(
            "tiny",
            vocab_size=1024,
            d_model=128,
            num_heads=4,
            d_ff=512,
            num_encoder_layers=2,
            num_decoder_layers=2,
            max_len=256,
        ),
        32,
    ),
    "base": (ModelConfig.preset("base"), 8),
}


def make_decoders(model: Transformer, max_length: int) -> dict[str, Callable[..., Any]]:
    """Jitted greedy and beam-4 decoders returning only the ids."""
    beam = functools.partial(beam_search, model, beam_size=4, alpha=0.6, max_length=max_length)
    return {
        "greedy": jax.jit(functools.partial(greedy_decode, model, max_length=max_length)),
        "beam4": jax.jit(lambda params, src, **kw: beam(params, src, **kw)[0]),
    }


def run_forced(decoder: Callable[..., Any], params: Any, src: np.ndarray, length: int) -> Array:
    """Decode exactly `length` tokens per sentence (EOS blocked until the cap forces it)."""
    out = decoder(
        params,
        src,
        extra_length=jnp.int32(length - SOURCE_LENGTH),
        min_length=jnp.int32(1 << 20),
    )
    return jax.block_until_ready(out)


def best_times(repeats: int, runs: dict[Any, Callable[[], Any]]) -> dict[Any, float]:
    """Fastest of `repeats` wall-clock times per run, taken round-robin.

    Interleaving spreads a burst of load on the shared machine over every run instead of
    spoiling one of them; the minimum is the least disturbed measurement.
    """
    times: dict[Any, float] = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key] = min(times[key], time.perf_counter() - start)
    return times


def check_lengths(out: Array, length: int) -> None:
    """Every sentence has exactly `length` tokens, EOS last."""
    out = np.asarray(out)
    assert (out[:, length - 1] == EOS_ID).all() and (out[:, : length - 1] != EOS_ID).all()
    assert (out[:, length:] == PAD_ID).all()


HEADER = (
    f"{'model':>5} {'decoder':>7} {'B':>3} {'T buf':>5} {'L out':>5} {'time s':>7} "
    f"{'steps/s':>8} {'tgt tok/s':>10} {'ms/token':>9}"
)


def row(model: str, decoder: str, batch: int, buffer: int, length: int, seconds: float) -> str:
    """One table line; ms/token is wall time per generated (returned) target token."""
    return (
        f"{model:>5} {decoder:>7} {batch:>3} {buffer:>5} {length:>5} {seconds:>7.3f} "
        f"{length / seconds:>8.1f} {batch * length / seconds:>10.0f} "
        f"{1e3 * seconds / (batch * length):>9.3f}"
    )


def main() -> None:
    """Print the per-length table and the buffer-size table for each model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--buffers", nargs="+", type=int, default=[16, 64, 256])
    args = parser.parse_args()
    lengths = sorted(args.lengths)
    shortest, longest = lengths[0], lengths[-1]
    print(
        f"{platform.machine()} {platform.processor() or ''}, {jax.devices()[0].device_kind}, "
        f"{len(jax.devices())} device(s), jax {jax.__version__}, python {platform.python_version()}"
    )
    for name in args.models:
        config, batch = MODELS[name]
        model = Transformer(config)
        src = np.random.default_rng(0).integers(4, config.vocab_size, (batch, SOURCE_LENGTH))
        src = src.astype(np.int32)
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), src, src)["params"])
        count = sum(x.size for x in jax.tree.leaves(params))
        print(f"\n{name}: {count:,} parameters; source length {SOURCE_LENGTH}\n{HEADER}")
        print("-" * len(HEADER))
        for decoder_name, decoder in make_decoders(model, longest).items():
            start = time.perf_counter()
            check_lengths(run_forced(decoder, params, src, shortest), shortest)
            compile_s = time.perf_counter() - start
            for length in lengths:
                check_lengths(run_forced(decoder, params, src, length), length)
            seconds = best_times(
                args.repeats,
                {n: functools.partial(run_forced, decoder, params, src, n) for n in lengths},
            )
            for length in lengths:
                print(row(name, decoder_name, batch, longest, length, seconds[length]))
            ratio = (seconds[longest] / longest) / (seconds[shortest] / shortest)
            print(
                f"{'':>5} {decoder_name:>7} time/token at L={longest} / at L={shortest}: "
                f"{ratio:.2f}x (first call incl. compile {compile_s:.1f} s)"
            )
        print(f"\n{name}: buffer size (max_length) at L = {shortest}\n{HEADER}")
        print("-" * len(HEADER))
        runs = {}
        for buffer in args.buffers:
            if shortest <= buffer <= config.max_len:
                for decoder_name, decoder in make_decoders(model, buffer).items():
                    run_forced(decoder, params, src, shortest)
                    runs[decoder_name, buffer] = functools.partial(
                        run_forced, decoder, params, src, shortest
                    )
        for (decoder_name, buffer), seconds in best_times(args.repeats, runs).items():
            print(row(name, decoder_name, batch, buffer, shortest, seconds))


if __name__ == "__main__":
    main()
