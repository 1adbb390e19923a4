"""python -m transformer_jax.export --workdir DIR --format ctranslate2 --output OUT.

Writes a CTranslate2 model directory from one checkpoint of a workdir (default: the newest
readable one; post-LN or pre-LN, scanned or not, averaged or not): the weights (optionally
quantized), CTranslate2's config and vocabulary, the workdir's sentencepiece model and
`transformer_jax.json` (our model config and where the weights came from). Serve it with
CTranslate2 directly, or with `python -m transformer_jax.translate --engine ctranslate2
--workdir OUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformer_jax.cli import check_output, move_into_place, quiet_libraries
from transformer_jax.interop.ctranslate2 import EXPORT_META, EXPORT_TOKENIZER

FORMATS = ("ctranslate2",)
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16")


def export_ctranslate2(
    workdir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    step: int | None = None,
    quantization: str | None = None,
    force: bool = False,
) -> Path:
    """Convert one checkpoint of workdir into a CTranslate2 model directory at output."""
    try:
        import ctranslate2  # noqa: F401  (the spec classes below need it)
    except ImportError as e:
        raise ValueError(
            'ctranslate2 is not installed: pip install -e ".[serve]" (or pip install ctranslate2)'
        ) from e

    from transformer_jax.inference.translator import load
    from transformer_jax.interop.ctranslate2 import build_spec
    from transformer_jax.workdir import Workdir

    output = Path(os.path.abspath(output))
    run = Workdir(workdir)
    check_output(output, Path(os.fspath(run.path)), force, marker=EXPORT_META)
    config = run.read_model_config()
    if run.has_marian_vocabulary:
        # Our CTranslate2 engine reads one shared sentencepiece model; this vocabulary has two.
        raise ValueError(
            f"{run.path}: its vocabulary is an imported Marian one ({Workdir.VOCAB}, "
            f"{Workdir.SOURCE_SPM}, {Workdir.TARGET_SPM}), which --format ctranslate2 does not "
            "export; write a Hugging Face folder (python -m transformer_jax.convert --workdir "
            "DIR --to-huggingface OUT, Marian's layout again) and convert that with CTranslate2's "
            "ct2-transformers-converter --model OUT --output_dir OUT.ct2"
        )
    model = load(run, step)
    found = model.step
    spec = build_spec(config, model.params, model.tokenizer)
    experiment = run.read_experiment_config()
    meta = {
        # 2: the folder's config.json appends EOS to sources (add_source_eos); 1 did not.
        "format_version": 2,
        "model_config": config.to_dict(),
        "workdir": str(run),
        "step": found,
        "quantization": quantization,
        # So `evaluate --engine ctranslate2 --split test` finds the data source here too.
        "experiment_config": None if experiment is None else experiment.to_dict(),
    }
    spec.validate()
    spec.optimize(quantization=quantization)
    # Written beside its final name and renamed into place: a crash leaves no half model.
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        (Path(tmp) / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        spec.register_file(str(Path(tmp) / EXPORT_META), EXPORT_META)
        (Path(tmp) / EXPORT_TOKENIZER).write_bytes(run.tokenizer_path.read_bytes())
        spec.register_file(str(Path(tmp) / EXPORT_TOKENIZER), EXPORT_TOKENIZER)
        staged = Path(tmp) / "model"
        staged.mkdir()
        spec.save(str(staged))
        move_into_place(staged, output, Path(tmp))
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, export, say where the model is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a workdir written by train.py")
    parser.add_argument("--format", choices=FORMATS, required=True, help="only ctranslate2")
    parser.add_argument("--output", required=True, help="the model directory to write")
    parser.add_argument("--step", type=int, default=None, help="default: newest readable")
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, default=None, help="default: float32 weights"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        output = export_ctranslate2(
            args.workdir,
            args.output,
            step=args.step,
            quantization=args.quantization,
            force=args.force,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"Wrote a CTranslate2 model ({args.quantization or 'float32'}) to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
