"""python -m transformer_jax.translate --workdir DIR < input > output: one line per line.

Input must be UTF-8. A line that is not stops the command with its line number (nothing is
written), unless --on_invalid_utf8=empty: then such lines come out as empty lines, so the
output stays aligned, and a warning lists them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Literal

from transformer_jax.cli import add_decoding_flags, decoding_kwargs, quiet_libraries


def main(argv: Sequence[str] | None = None) -> int:
    """Translate stdin (or --input) to stdout (or --output), keeping line alignment."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_decoding_flags(parser)
    parser.add_argument("--input", default=None, help="file to translate (default: stdin)")
    parser.add_argument("--output", default=None, help="file to write (default: stdout)")
    parser.add_argument(
        "--on_invalid_utf8",
        choices=["stop", "empty"],
        default="stop",
        help="a line that is not UTF-8: stop naming it, or translate it as an empty line",
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    decoding = decoding_kwargs(args)

    from transformer_jax import evaluation
    from transformer_jax.data.sources import read_lines
    from transformer_jax.inference.translator import load

    invalid: Literal["raise", "empty"] = "raise" if args.on_invalid_utf8 == "stop" else "empty"
    try:
        name = None if args.input else "<stdin>"
        lines = read_lines(args.input or sys.stdin.buffer, name, invalid=invalid)
        translator = load(args.workdir, args.step)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
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
