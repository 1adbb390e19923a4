"""python -m transformer_jax.translate --workdir DIR < input > output: one line per line.

Input must be UTF-8. A line that is not stops the command with its line number (nothing is
written), unless --on_invalid_utf8=empty: then such lines come out as empty lines, so the
output stays aligned, and a warning lists them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Literal

from transformer_jax.cli import (
    add_decoding_flags,
    decoding_kwargs,
    load_translator,
    quiet_libraries,
)


def nbest_lines(hypotheses: Sequence[Sequence[tuple[str, float]]], nbest: int) -> str:
    """fairseq-style n-best: `H-<line>\t<score>\t<text>`, nbest lines per input line, best first.

    An empty input line gets nbest lines with an empty text and score -inf.
    """
    lines = []
    for i, found in enumerate(hypotheses):
        padded = [*found, *[("", -math.inf)] * (nbest - len(found))]
        for text, score in padded[:nbest]:
            lines.append(f"H-{i}\t{score:.6f}\t{text.replace(chr(10), ' ')}\n")
    return "".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Translate stdin (or --input) to stdout (or --output), keeping line alignment."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_decoding_flags(parser)
    parser.add_argument("--input", default=None, help="file to translate (default: stdin)")
    parser.add_argument("--output", default=None, help="file to write (default: stdout)")
    parser.add_argument(
        "--nbest",
        type=int,
        default=0,
        help="N > 0: print the N best per line with scores, fairseq style (H-i, score, text)",
    )
    parser.add_argument(
        "--on_invalid_utf8",
        choices=["stop", "empty"],
        default="stop",
        help="a line that is not UTF-8: stop naming it, or translate it as an empty line",
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.nbest < 0:
        raise SystemExit(f"error: --nbest={args.nbest}: must be >= 0")
    decoding = decoding_kwargs(args)  # checks --nbest against --method and --beam_size too

    from transformer_jax import evaluation
    from transformer_jax.data.sources import read_lines

    invalid: Literal["raise", "empty"] = "raise" if args.on_invalid_utf8 == "stop" else "empty"
    try:
        name = None if args.input else "<stdin>"
        lines = read_lines(args.input or sys.stdin.buffer, name, invalid=invalid)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    translator = load_translator(args)
    # A progress bar for files and pipes; not when someone types lines interactively.
    progress = bool(args.input) or not sys.stdin.isatty()
    if args.nbest:
        found = translator.translate_nbest(lines, nbest=args.nbest, progress=progress, **decoding)
        text = nbest_lines(found, args.nbest)
    else:
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
