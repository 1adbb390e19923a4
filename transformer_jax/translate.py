"""python -m transformer_jax.translate --workdir DIR < input > output: one line per line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax.cli import add_decoding_flags, decoding_kwargs, quiet_libraries


def read_lines(stream: object) -> list[str]:
    """Lines without their newline; a final line without one is kept."""
    text = stream.read()  # type: ignore[attr-defined]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def main(argv: Sequence[str] | None = None) -> int:
    """Translate stdin (or --input) to stdout (or --output), keeping line alignment."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_decoding_flags(parser)
    parser.add_argument("--input", default=None, help="file to translate (default: stdin)")
    parser.add_argument("--output", default=None, help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    quiet_libraries()

    from transformer_jax.inference.translator import load

    if args.input:
        with open(args.input, encoding="utf-8") as f:
            lines = read_lines(f)
    else:
        lines = read_lines(sys.stdin)
    translator = load(args.workdir, args.step)
    # A progress bar for files and pipes; not when someone types lines interactively.
    progress = bool(args.input) or not sys.stdin.isatty()
    outputs = translator.translate(lines, progress=progress, **decoding_kwargs(args))
    # A newline inside a translation would break line alignment; it cannot come from the
    # tokenizer, but guard the contract anyway.
    text = "".join(out.replace("\n", " ") + "\n" for out in outputs)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
