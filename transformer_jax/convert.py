"""python -m transformer_jax.convert: Hugging Face Marian (OPUS-MT) folders in and out.

    python -m transformer_jax.convert --from-huggingface HF_DIR --workdir DIR
        reads a local MarianMTModel folder (config.json, model.safetensors or pytorch_model.bin,
        source.spm, target.spm, vocab.json) and writes a new workdir: model_config.json, the
        vocabulary, and one parameters-only checkpoint (step 0) that train.py fine-tunes
        (configs/finetune.py) and translate, evaluate, average and load() read.
    python -m transformer_jax.convert --workdir DIR --to-huggingface OUT [--step N] [--force]
        writes one checkpoint of a workdir as a folder that MarianMTModel.from_pretrained(OUT)
        and MarianTokenizer.from_pretrained(OUT) load with no custom code.

Nothing is downloaded: a hub id is refused with the command that downloads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformer_jax.cli import check_output, move_into_place, quiet_libraries

log = logging.getLogger(__name__)

# Written into every exported folder: which workdir and step it came from (and our config).
# (Its name differs from the CTranslate2 export's, so --force never replaces one with the other.)
EXPORT_META = "transformer_jax_export.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def local_folder(text: str) -> Path:
    """The local folder a --from-huggingface value names; a hub id or URL is refused."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    hub_id = text.removeprefix("https://huggingface.co/").removeprefix("hf://").strip("/")
    if not path.exists() and _HUB_ID.fullmatch(hub_id):
        name = hub_id.rpartition("/")[2]
        raise ValueError(
            f"{text}: no such folder. convert never downloads; if this is a Hugging Face hub id, "
            f"download it first (hf download {hub_id} --local-dir {name}) and pass "
            f"--from-huggingface {name}"
        )
    if path.exists():
        raise ValueError(f"{text}: not a folder; pass the folder holding config.json")
    raise FileNotFoundError(f"{text}: no such folder")


def _local(path: str | os.PathLike[str], flag: str) -> Path:
    """An absolute local path; a URL (gs://...) is refused rather than made a local folder."""
    text = os.fspath(path)
    if "://" in text:
        raise ValueError(
            f"{flag}={text}: convert writes local folders only; write it here and copy it "
            "(gsutil -m cp -r) to the bucket"
        )
    return Path(os.path.abspath(text))


def import_marian(folder: str | os.PathLike[str], workdir: str | os.PathLike[str]) -> Path:
    """Write a new workdir holding the Marian model in folder; returns the workdir's path."""
    import jax

    from transformer_jax.interop.huggingface import read_marian
    from transformer_jax.workdir import Workdir

    source = local_folder(os.fspath(folder))
    target = _local(workdir, "--workdir")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(
            f"{target}: exists and is not an empty folder; convert writes a new workdir"
        )
    imported = read_marian(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: a crash leaves no half workdir.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staged = Workdir(Path(tmp) / "workdir")
        staged.path.mkdir()
        staged.write_model_config(imported.config)
        (staged.path / Workdir.SOURCE_SPM).write_bytes(imported.source_spm)
        (staged.path / Workdir.TARGET_SPM).write_bytes(imported.target_spm)
        vocab = {piece: i for i, piece in enumerate(imported.pieces)}
        text = json.dumps(vocab, indent=2, ensure_ascii=False) + "\n"
        (staged.path / Workdir.VOCAB).write_text(text, encoding="utf-8")
        order = imported.order
        staged.write_imported_from(
            f"{source} (Hugging Face MarianMTModel). Ids renumbered so that pad, eos and unk are "
            f"0, 1, 2: their ids there were {order[0]}, {order[1]}, {order[2]}; every other "
            "piece keeps its order. Channels of d_model renamed from Marian's sin-then-cos "
            "layout to the interleaved one."
        )
        staged.save_params(0, jax.tree.map(jax.numpy.asarray, imported.params))
        if target.exists():
            target.rmdir()  # empty, checked above
        Path(staged.path).rename(target)
    return target


def export_marian(
    workdir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    step: int | None = None,
    force: bool = False,
) -> Path:
    """Write one checkpoint of workdir as a Hugging Face Marian folder at output."""
    import jax
    import numpy as np

    from transformer_jax.inference.translator import load
    from transformer_jax.interop.huggingface import (
        MARIAN_LAYER_NORM_EPSILON,
        marian_files,
        spm_models_of,
    )
    from transformer_jax.model import unstack_layer_params
    from transformer_jax.workdir import Workdir

    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ValueError(
            'writing a Hugging Face folder needs safetensors: pip install -e ".[hf]"'
        ) from e
    output = _local(output, "--to-huggingface")
    run = Workdir(workdir)
    check_output(output, Path(os.fspath(run.path)), force, marker=EXPORT_META)
    model = load(run, step)
    config, tokenizer, found = model.config, model.tokenizer, model.step
    params = unstack_layer_params(model.params) if config.scan_layers else model.params
    host = jax.tree.map(np.asarray, params)
    files, tensors, (source_spm, target_spm) = marian_files(
        config, host, tokenizer, spm_models_of(tokenizer)
    )
    if config.layer_norm_epsilon != MARIAN_LAYER_NORM_EPSILON:
        log.warning(
            "MarianMTModel's LayerNorm uses epsilon %g, this model %g: its logits there differ "
            "from ours slightly (by 7e-6 at most on the tested model; docs/interop.md).",
            MARIAN_LAYER_NORM_EPSILON,
            config.layer_norm_epsilon,
        )
    meta = {"workdir": str(run), "step": found, "model_config": config.to_dict()}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        for name, text in files.items():
            (staged / name).write_text(text, encoding="utf-8")
        (staged / "source.spm").write_bytes(source_spm)
        (staged / "target.spm").write_bytes(target_spm)
        save_file(tensors, str(staged / "model.safetensors"), metadata={"format": "pt"})
        (staged / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        move_into_place(staged, output, Path(tmp))
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, convert one way or the other, say where the result is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the workdir to write (import) or read")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-huggingface", metavar="HF_DIR", help="a local MarianMTModel folder to import"
    )
    direction.add_argument(
        "--to-huggingface", metavar="OUT", help="the Hugging Face folder to write"
    )
    parser.add_argument("--step", type=int, default=None, help="export: default newest readable")
    parser.add_argument("--force", action="store_true", help="export: overwrite an earlier OUT")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        if args.from_huggingface is not None:
            if args.step is not None or args.force:
                raise ValueError("--step and --force apply to --to-huggingface only")
            path = import_marian(args.from_huggingface, args.workdir)
            print(
                f"Wrote workdir {path} (step 0, parameters only). Fine-tune it with: python "
                f"train.py --config configs/finetune.py --workdir {path}"
            )
        else:
            path = export_marian(
                args.workdir, args.to_huggingface, step=args.step, force=args.force
            )
            print(f"Wrote a Hugging Face Marian model to {path}")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
