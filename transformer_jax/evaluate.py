"""python -m transformer_jax.evaluate --workdir DIR [--split test | --source F --reference F].

Decodes a split of the workdir's own data source (as configured for training) or a pair of
text files, writes the hypotheses, and prints sacreBLEU and chrF with their signatures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from etils import epath

from transformer_jax.cli import add_decoding_flags, decoding_kwargs, quiet_libraries


def score(hypotheses: list[str], references: list[str]) -> dict[str, object]:
    """Corpus sacreBLEU and chrF (detokenized, cased) with their signatures."""
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": round(bleu_score.score, 4),
        "chrf": round(chrf_score.score, 4),
        "signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_details": str(bleu_score),
        "num_sentences": len(hypotheses),
    }


def workdir_pairs(workdir: epath.Path, split: str) -> list[tuple[str, str]]:
    """The split from the data source recorded in the workdir's config.json."""
    import ml_collections

    from transformer_jax.training.loop import load_split

    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{config_path}: missing, so the workdir's data source is unknown; pass --source "
            "and --reference files instead"
        )
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    return list(load_split(config, split))


def read_text(path: str) -> list[str]:
    """One sentence per line, UTF-8, the file named on errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Decode, score, write hypotheses, print the scores (or one JSON object with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decoding_flags(parser)
    parser.add_argument("--split", default="test", help="split of the workdir's data source")
    parser.add_argument("--source", default=None, help="source-language text file instead")
    parser.add_argument("--reference", default=None, help="reference translations for --source")
    parser.add_argument(
        "--output", default=None, help="hypotheses file (default: WORKDIR/<split>.step<N>.hyp.txt)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if (args.source is None) != (args.reference is None):
        parser.error("--source and --reference go together")
    quiet_libraries()

    from transformer_jax.inference.translator import load
    from transformer_jax.training.checkpoint import workdir_path

    workdir = workdir_path(args.workdir)
    if args.source:
        sources, references = read_text(args.source), read_text(args.reference)
        if len(sources) != len(references):
            raise SystemExit(
                f"{args.source} has {len(sources)} lines but {args.reference} has "
                f"{len(references)}; they must be line-aligned"
            )
        name = Path(args.source).stem
    else:
        pairs = workdir_pairs(workdir, args.split)
        sources, references = [s for s, _ in pairs], [t for _, t in pairs]
        name = args.split
    if args.limit:
        sources, references = sources[: args.limit], references[: args.limit]
    translator = load(workdir, args.step)
    hypotheses = translator.translate(sources, progress=True, **decoding_kwargs(args))
    output = workdir_path(args.output or workdir / f"{name}.step{translator.step}.hyp.txt")
    output.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    result = score(hypotheses, references)
    result.update(
        {
            "step": translator.step,
            "workdir": str(workdir),
            "hypotheses": str(output),
            "method": args.method,
            "beam_size": args.beam_size,
            "alpha": args.alpha,
        }
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['bleu_details']}")
        print(f"BLEU {result['bleu']:.2f}  {result['signature']}")
        print(f"chrF {result['chrf']:.2f}  {result['chrf_signature']}")
        print(f"{result['num_sentences']} sentences, step {result['step']}; hypotheses in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
