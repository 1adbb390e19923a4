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

from transformer_jax.cli import (
    add_decoding_flags,
    decoding_kwargs,
    load_translator,
    quiet_libraries,
)


def workdir_pairs(workdir: str, split: str, engine: str = "jax") -> list[tuple[str, str]]:
    """The split from the data source the workdir (or export) records (checked first)."""
    import ml_collections

    from transformer_jax import experiment
    from transformer_jax.interop.ctranslate2 import EXPORT_META
    from transformer_jax.workdir import Workdir

    why = "the workdir's data source is unknown; pass --source and --reference files instead"
    if engine == "ctranslate2":
        recorded = json.loads((Path(workdir) / EXPORT_META).read_text()).get("experiment_config")
        if recorded is None:
            raise FileNotFoundError(
                f"{Path(workdir) / EXPORT_META}: no experiment config, so {why}"
            )
        config = ml_collections.ConfigDict(recorded)
    else:
        config = Workdir(workdir).experiment_config_or_raise(why)
    experiment.validate(config)
    return list(experiment.load_split(config, split))


def _hypotheses_path(workdir: str, name: str, step: int, engine: str) -> str:
    from transformer_jax.workdir import Workdir

    path = Workdir(workdir).hypotheses_path(name if engine == "jax" else f"{name}.{engine}", step)
    return str(path)


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
    decoding = decoding_kwargs(args)

    from transformer_jax import evaluation
    from transformer_jax.data.sources import read_lines

    try:
        if args.source:
            sources, references = read_lines(args.source), read_lines(args.reference)
            if len(sources) != len(references):
                raise ValueError(
                    f"{args.source} has {len(sources)} lines but {args.reference} has "
                    f"{len(references)}; they must be line-aligned"
                )
            name = Path(args.source).stem
        else:
            pairs = workdir_pairs(args.workdir[0], args.split, args.engine)
            sources, references = [s for s, _ in pairs], [t for _, t in pairs]
            name = args.split
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    if args.limit:
        sources, references = sources[: args.limit], references[: args.limit]
    translator = load_translator(args)
    hypotheses = translator.translate(sources, progress=True, **decoding)
    if translator.members:  # WORKDIR/<name>.ensemble<K>.step<N>.hyp.txt, N the first's step
        name = f"{name}.ensemble{len(translator.members)}"
    output = args.output or _hypotheses_path(args.workdir[0], name, translator.step, args.engine)
    evaluation.write_hypotheses(output, hypotheses)
    result = evaluation.score(hypotheses, references)
    result.update(
        {
            "step": translator.step,
            "workdir": str(translator.workdir),
            "ensemble": [{"workdir": w, "step": st} for w, st in translator.members] or None,
            "hypotheses": str(output),
            "engine": args.engine,
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
