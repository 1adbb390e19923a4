"""python -m transformer_jax.translate --workdir DIR < input > output: one line per line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax.cli import add_decoding_flags, decoding_kwargs, quiet_libraries


def main(argv: Sequence[str] | None = None) -> int:
    """Translate stdin (or --input) to stdout (or --output), keeping line alignment."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_decoding_flags(parser)
    parser.add_argument("--input", default=None, help="file to translate (default: stdin)")
    parser.add_argument("--output", default=None, help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    quiet_libraries()
    decoding = decoding_kwargs(args)

    from transformer_jax import evaluation
    from transformer_jax.data.sources import read_lines
    from transformer_jax.inference.translator import load

    try:
        lines = read_lines(args.input or sys.stdin.buffer, None if args.input else "<stdin>")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    translator = load(args.workdir, args.step)
    # A progress bar for files and pipes; not when someone types lines interactively.
    progress = bool(args.input) or not sys.stdin.isatty()
    outputs = translator.translate(lines, progress=progress, **decoding)
    text = evaluation.as_lines(outputs)  # one line out per line in
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
