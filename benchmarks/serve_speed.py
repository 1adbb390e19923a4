"""Serving speed: our decoders against the same weights exported to CTranslate2, in one run.

    python benchmarks/serve_speed.py [--rounds 3] [--lengths 16 128] [--workdir DIR]

(a) The paper's base shape (V = 37000) with random weights: B = 8 sources of 16 tokens, EOS
blocked until L tokens so every sentence decodes exactly L (ours: min_length; CTranslate2:
min/max_decoding_length), greedy and beam 4, target tokens/s for transformer-jax float32 and
int8 (model/quant.py: int8 weights and products, float KV cache, as CTranslate2's int8) and
for the same weights exported to CTranslate2 float32 and int8. Engines alternate round by round
and each figure is the median of --rounds timed runs after one warm-up (compiling) run.

(b) With --workdir (a workdir trained by `python train.py`): its whole test split end to end
through `Translator.translate` with each engine and precision (ours: float32, int8, int8 KV
cache, both; CTranslate2: float32, int8; the same batching and length rules), sentences/s,
target tokens/s and sacreBLEU, beam 4 and greedy.

CTranslate2 runs with intra_threads = the machine's cores and its own OpenMP settings;
--passive_threads sets OMP_WAIT_POLICY=PASSIVE, so its idle threads do not spin while the JAX
rounds run (which also makes its own wake-ups slower: both are reported in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import EOS_ID, ModelConfig
from transformer_jax.inference.decode import beam_search, greedy_decode
from transformer_jax.model import Transformer
from transformer_jax.model.quant import quantize_params

SOURCE_LENGTH = 16
BATCH = 8


def _random_workdir(directory: Path, preset: str) -> tuple[ModelConfig, Any, Any]:
    """A workdir with random weights and a small tokenizer (for the export)."""
    from transformer_jax.data.sources import builtin_pairs
    from transformer_jax.data.tokenizer import train_tokenizer
    from transformer_jax.workdir import Workdir

    config = ModelConfig.preset(preset)
    model = Transformer(config)
    dummy = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), dummy, dummy)["params"])
    run = Workdir(directory)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_model_config(config)
    pairs = builtin_pairs("train")[:5000]
    tokenizer = train_tokenizer(
        (s for pair in pairs for s in pair), directory / "tokenizer", vocab_size=1024
    )
    run.save_params(1, params)
    return config, params, tokenizer


def _median_times(rounds: int, runs: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median wall time per run over `rounds`, the runs alternating within each round."""
    for fn in runs.values():
        fn()  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def random_weights_table(args: argparse.Namespace, root: Path) -> None:
    """Part (a): tokens/s at the base shape, ours vs CTranslate2 float32 and int8."""
    import ctranslate2

    from transformer_jax.export import export_ctranslate2

    config, params, tokenizer = _random_workdir(root / "random", args.model)
    exported = {
        name: ctranslate2.Translator(
            str(export_ctranslate2(root / "random", root / name, quantization=quant)),
            device="cpu",
            intra_threads=os.cpu_count() or 1,
        )
        for name, quant in (("ct2_float32", None), ("ct2_int8", "int8"))
    }
    model = Transformer(config)
    int8_model = Transformer(config.replace(quantization="int8"))
    int8_params = jax.jit(
        lambda p: quantize_params(p, jax.eval_shape(lambda: _init(int8_model))["params"])
    )(params)
    rng = np.random.default_rng(0)
    src = rng.integers(4, tokenizer.vocab_size, (BATCH, SOURCE_LENGTH)).astype(np.int32)
    src[:, -1] = EOS_ID
    pieces = [[tokenizer.processor.id_to_piece(int(i)) for i in row] for row in src]
    print(
        f"\n(a) {args.model} shape, random weights: {BATCH} sources x {SOURCE_LENGTH} tokens, "
        f"V={config.vocab_size}; target tokens/s, median of {args.rounds} rounds\n"
    )
    print(
        "| decoder | L | ours float32 | ours int8 | CT2 float32 | CT2 int8 | ours / CT2 fp32 "
        "| ours int8 / CT2 int8 | ours int8 / ours fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for decoder, beam in (("greedy", 1), ("beam 4", 4)):
        per_length = {}
        for length in args.lengths:
            runs: dict[str, Callable[[], Any]] = {
                "ours": _jax_run(model, params, src, length, beam),
                "ours_int8": _jax_run(int8_model, int8_params, src, length, beam),
            }
            for name, translator in exported.items():
                runs[name] = _ct2_run(translator, pieces, length, beam)
            times = _median_times(args.rounds, runs)
            rate = {name: BATCH * length / t for name, t in times.items()}
            per_length[length] = rate
            print(
                f"| {decoder} | {length} | {rate['ours']:,.0f} | {rate['ours_int8']:,.0f} | "
                f"{rate['ct2_float32']:,.0f} | {rate['ct2_int8']:,.0f} | "
                f"{rate['ours'] / rate['ct2_float32']:.2f} | "
                f"{rate['ours_int8'] / rate['ct2_int8']:.2f} | "
                f"{rate['ours_int8'] / rate['ours']:.2f} |",
                flush=True,
            )
        if len(args.lengths) > 1:
            short, long = min(args.lengths), max(args.lengths)
            cost = per_length[short]["ours"] / per_length[long]["ours"]
            print(
                f"|  | cost per token at L={long} vs L={short} (ours fp32) | {cost:.2f}x "
                "|  |  |  |  |  |  |"
            )


def _init(model: Transformer) -> Any:
    dummy = jnp.ones((1, 4), jnp.int32)
    return model.init(jax.random.key(0), dummy, dummy)


def _jax_run(
    model: Transformer, params: Any, src: np.ndarray, length: int, beam: int
) -> Callable[[], Any]:
    """Our decoder, jitted, forced to exactly `length` tokens (then EOS)."""
    common = {
        "max_length": length + 1,
        "extra_length": length + 1 - SOURCE_LENGTH,
        "min_length": length,
    }
    if beam == 1:
        fn = jax.jit(lambda p, s: greedy_decode(model, p, s, **common))
    else:
        fn = jax.jit(lambda p, s: beam_search(model, p, s, beam_size=beam, alpha=0.6, **common)[0])
    source = jnp.asarray(src)

    def run() -> Any:
        return jax.block_until_ready(fn(params, source))

    return run


def _ct2_run(translator: Any, pieces: list[list[str]], length: int, beam: int) -> Callable[[], Any]:
    """CTranslate2 forced to exactly `length` tokens."""

    def run() -> Any:
        return translator.translate_batch(
            pieces,
            beam_size=beam,
            length_penalty=0.6,
            min_decoding_length=length,
            max_decoding_length=length,
            max_input_length=0,
        )

    return run


def end_to_end_table(args: argparse.Namespace, root: Path) -> None:
    """Part (b): the test split of a trained workdir through Translator with each engine."""
    from transformer_jax import evaluation, experiment, load
    from transformer_jax.export import export_ctranslate2
    from transformer_jax.workdir import Workdir

    config = Workdir(args.workdir).experiment_config_or_raise("the test split is unknown")
    pairs = list(experiment.load_split(config, config.data.test_split or "test"))
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    translators = {
        "ours float32": load(args.workdir),
        "ours int8": load(args.workdir, quantization="int8"),
        "ours float32, int8 KV": load(args.workdir, kv_cache="int8"),
        "ours int8, int8 KV": load(args.workdir, quantization="int8", kv_cache="int8"),
    }
    for name, quant in (("CT2 float32", None), ("CT2 int8", "int8")):
        out = export_ctranslate2(args.workdir, root / f"e2e_{quant}", quantization=quant)
        translators[name] = load(out, engine="ctranslate2")
    print(
        f"\n(b) end to end: {args.workdir}, {len(sources)} test sentences through "
        "Translator.translate (batch 32, length-sorted buckets); warm-up run first\n"
    )
    print("| decoding | engine | sentences/s | target tokens/s | sacreBLEU |")
    print("|---|---|---|---|---|")
    for decoding, options in (("beam 4", {"method": "beam"}), ("greedy", {"method": "greedy"})):
        rates = {}
        for name, translator in translators.items():
            translator.translate(sources, **options)  # compile every bucket
            start = time.perf_counter()
            hypotheses = translator.translate(sources, **options)
            seconds = time.perf_counter() - start
            tokens = sum(len(translator.tokenizer.encode(h, side="target")) + 1 for h in hypotheses)
            bleu = evaluation.score(hypotheses, references)["bleu"]
            rates[name] = len(sources) / seconds
            print(
                f"| {decoding} | {name} | {len(sources) / seconds:,.1f} | "
                f"{tokens / seconds:,.0f} | {bleu:.2f} |",
                flush=True,
            )
        for ours, theirs in (
            ("ours float32", "CT2 float32"),
            ("ours int8", "CT2 int8"),
            ("ours int8", "ours float32"),
        ):
            print(f"| {decoding} | {ours} / {theirs} | {rates[ours] / rates[theirs]:.2f}x | | |")


def main() -> None:
    """Parse flags, print the machine and the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--workdir", default=None, help="a trained workdir for part (b)")
    parser.add_argument("--skip_random", action="store_true", help="part (b) only")
    parser.add_argument("--model", choices=["base", "tiny"], default="base", help="for part (a)")
    parser.add_argument("--passive_threads", action="store_true", help="OMP_WAIT_POLICY=PASSIVE")
    args = parser.parse_args()
    if args.passive_threads:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when ctranslate2 starts its threads
    try:
        import ctranslate2
    except ImportError:
        sys.exit('error: ctranslate2 is not installed: pip install -e ".[serve]"')
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; ctranslate2 "
        f"{ctranslate2.__version__} ({os.cpu_count()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'default')})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_random:
            random_weights_table(args, Path(tmp))
        if args.workdir:
            end_to_end_table(args, Path(tmp))


if __name__ == "__main__":
    main()
