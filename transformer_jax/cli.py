"""Shared command-line pieces: decoding flags, quiet library logging, safe output folders."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any


def quiet_libraries() -> None:
    """Keep orbax/absl INFO chatter off the console; keep warnings and our own messages."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformer_jax").setLevel(logging.INFO)


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """--workdir, --step and the decoding settings (paper defaults: beam 4, alpha 0.6, +50)."""
    parser.add_argument(
        "--workdir",
        required=True,
        nargs="+",
        help="a workdir written by train.py (with --engine ctranslate2: the exported folder); "
        "several decode as one ensemble (the mean of their log-probabilities per step)",
    )
    parser.add_argument(
        "--step",
        type=int,
        nargs="+",
        default=None,
        help="checkpoint step (default: newest); one per --workdir, or several steps of one "
        "workdir (an ensemble of them)",
    )
    parser.add_argument(
        "--engine",
        choices=["jax", "ctranslate2"],
        default="jax",
        help="ctranslate2: a model written by python -m transformer_jax.export",
    )
    parser.add_argument(
        "--compute_type",
        default=None,
        help="with --engine ctranslate2: CTranslate2's compute type (default, int8, float32...)",
    )
    parser.add_argument(
        "--device", default=None, help="with --engine ctranslate2: cpu (default) or cuda"
    )
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=None,
        help="JAX engine: int8 quantizes the model in memory (int8 weights and products; "
        "docs/inference.md); none (default) decodes in float",
    )
    parser.add_argument(
        "--kv_cache",
        default=None,
        help="JAX engine: int8 stores the decoding cache's keys and values as int8; float "
        "(default) in the model's dtype",
    )
    parser.add_argument("--method", choices=["beam", "greedy", "sample"], default="beam")
    parser.add_argument("--beam_size", type=int, default=4, help="paper: 4")
    parser.add_argument("--alpha", type=float, default=0.6, help="length penalty; paper: 0.6")
    parser.add_argument("--extra_length", type=int, default=50, help="max output = input + this")
    parser.add_argument("--batch_size", type=int, default=32, help="sentences per batch")
    parser.add_argument(
        "--max_source_length",
        type=int,
        default=None,
        help="longer inputs are truncated (default: the model's max_len)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="with --method=sample")
    parser.add_argument("--top_k", type=int, default=0, help="with --method=sample; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="with --method=sample")


def load_translator(args: argparse.Namespace) -> Any:
    """transformer_jax.load for --workdir/--step/--engine; one error line if it cannot."""
    from transformer_jax.inference.quantize import check_names
    from transformer_jax.inference.translator import load

    if args.engine == "ctranslate2" and args.step is not None:
        raise SystemExit("error: --step: an exported CTranslate2 model holds one step already")
    if args.engine == "jax" and (args.compute_type or args.device):
        raise SystemExit(
            "error: --compute_type and --device are CTranslate2's; add --engine ctranslate2 "
            "(the JAX engine runs where JAX_PLATFORMS says)"
        )
    if args.engine == "ctranslate2" and (args.quantization or args.kv_cache):
        flag = "--quantization" if args.quantization else "--kv_cache"
        raise SystemExit(
            f"error: {flag} is the JAX engine's; with --engine ctranslate2 the export's own "
            "quantization applies (export --quantization int8, or --compute_type int8)"
        )
    if args.engine == "ctranslate2" and len(args.workdir) > 1:
        raise SystemExit("error: --workdir: ensembles decode with --engine jax only")
    quantization = args.quantization or ["none"]
    kv_cache = args.kv_cache or "float"
    try:
        for name in quantization:
            check_names(name, kv_cache, flags=True)
        return load(
            args.workdir[0] if len(args.workdir) == 1 else args.workdir,
            args.step[0] if args.step and len(args.step) == 1 else args.step,
            engine=args.engine,
            compute_type=args.compute_type or "default",
            device=args.device or "cpu",
            quantization=quantization[0] if len(quantization) == 1 else quantization,
            kv_cache=kv_cache,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Translator.translate keyword arguments from parsed flags; bad values exit naming the flag."""
    from transformer_jax.inference.engine import DecodeSettings

    try:
        DecodeSettings(
            method=args.method,
            beam_size=args.beam_size,
            alpha=args.alpha,
            extra_length=args.extra_length,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            nbest=max(1, getattr(args, "nbest", 1)),
        )
    except ValueError as e:
        raise SystemExit(f"error: --{e}") from e
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch_size={args.batch_size}: must be >= 1")
    if args.max_source_length is not None and args.max_source_length < 2:
        raise SystemExit(
            f"error: --max_source_length={args.max_source_length}: must be >= 2 (a token and EOS)"
        )
    return {
        "method": args.method,
        "beam_size": args.beam_size,
        "alpha": args.alpha,
        "extra_length": args.extra_length,
        "batch_size": args.batch_size,
        "max_source_length": args.max_source_length,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "seed": args.seed,
    }


def check_output(output: Path, workdir: Path, force: bool, marker: str) -> None:
    """Refuse an output folder that would overwrite a workdir, or anything but an earlier export.

    An earlier export is a folder holding `marker` (the file each export writes); with --force
    it, or an empty folder, may be replaced. Everything else is left alone.
    """
    if not workdir.is_absolute():
        return  # a URL workdir (gs://...) cannot be a local output folder
    if output == workdir or workdir in output.parents or output in workdir.parents:
        raise ValueError(f"{output}: is, holds or lies inside the workdir {workdir}; pick another")
    if not output.exists():
        return
    if not force:
        raise ValueError(f"{output}: already exists; pass --force to overwrite it")
    if output.is_dir() and ((output / marker).exists() or not any(output.iterdir())):
        return
    raise ValueError(
        f"{output}: --force replaces only an earlier export (a folder with {marker}) or an "
        "empty folder; this is neither, so it is left alone"
    )


def move_into_place(staged: Path, output: Path, scratch: Path) -> None:
    """Rename a finished folder to output, moving an existing one into scratch first.

    scratch is a temporary folder on the same filesystem, deleted by the caller afterwards, so
    the old export is only gone once the new one is in place.
    """
    try:
        if output.exists():  # --force, checked by check_output to be an earlier export or empty
            output.rename(scratch / "old")
        staged.rename(output)
    except OSError as e:
        raise ValueError(f"{output}: cannot write the model there ({e})") from e
