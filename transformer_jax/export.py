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

from transformer_jax.cli import quiet_libraries
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

    from transformer_jax import sharding
    from transformer_jax.interop.ctranslate2 import build_spec
    from transformer_jax.state import abstract_train_state
    from transformer_jax.workdir import Workdir

    output = Path(os.path.abspath(output))
    run = Workdir(workdir)
    _check_output(output, Path(os.fspath(run.path)), force)
    config = run.read_model_config()
    tokenizer = run.load_tokenizer(config.vocab_size)
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL)
    abstract = abstract_train_state(config, mesh, sharding.DEFAULT_RULES).params
    params, found = run.restore_params(step, abstract)
    spec = build_spec(config, params, tokenizer)
    experiment = run.read_experiment_config()
    meta = {
        "format_version": 1,
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
        try:
            if output.exists():  # --force, checked to be an earlier export or empty
                old = Path(tmp) / "old"
                output.rename(old)  # deleted with the temporary folder, after the swap
            staged.rename(output)
        except OSError as e:
            raise ValueError(f"{output}: cannot write the model there ({e})") from e
    return output


def _check_output(output: Path, workdir: Path, force: bool) -> None:
    """Refuse an output that would overwrite a workdir, or anything but an earlier export."""
    if not workdir.is_absolute():
        return  # a URL workdir (gs://...) cannot be a local output folder
    if output == workdir or workdir in output.parents or output in workdir.parents:
        raise ValueError(f"{output}: is, holds or lies inside the workdir {workdir}; pick another")
    if not output.exists():
        return
    if not force:
        raise ValueError(f"{output}: already exists; pass --force to overwrite it")
    if output.is_dir() and ((output / EXPORT_META).exists() or not any(output.iterdir())):
        return
    raise ValueError(
        f"{output}: --force replaces only an earlier export (a folder with {EXPORT_META}) or an "
        "empty folder; this is neither, so it is left alone"
    )


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
