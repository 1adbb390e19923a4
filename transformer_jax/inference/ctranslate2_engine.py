"""A model exported to CTranslate2 (`python -m transformer_jax.export`) behind our DecodeRows.

`evaluation.translate` drives it exactly as it drives the JAX engine: the same tokenization,
truncation, length-sorted batches and line alignment. The rows it hands over end in EOS; the
folder's own `add_source_eos` says who appends it (true since export format 2, as for any
program serving the folder: the engine then hands the pieces over without it; false in older
exports, which expect it in the input), and PAD and BOS are suppressed as our decoders never
emit them. What differs, and is documented in docs/inference.md:

* the length penalty: CTranslate2 divides a hypothesis's log-probability by |Y| ** alpha where
  ours uses ((5 + |Y|) / 6) ** alpha (GNMT), so beam search may rank hypotheses differently;
  the scores returned are CTranslate2's own;
* the output cap: CTranslate2 takes one maximum length per batch, the batch's padded source
  bucket + extra_length; a hypothesis longer than its own source's cap is cut there (EOS kept
  last), where ours would have scored a forced EOS;
* the stop rule: CTranslate2 ends a sentence's beam search once beam_size hypotheses finished
  (patience 1), ours once no alive one can still beat the worst finished.
Minimum length (none: an empty output is allowed) and never emitting PAD or BOS are the same.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from transformer_jax.config import EOS_ID, PAD_ID, ModelConfig
from transformer_jax.data.tokenizer import Tokenizer
from transformer_jax.evaluation import Decoded, DecodeRows
from transformer_jax.inference.engine import DecodeSettings
from transformer_jax.interop.ctranslate2 import EXPORT_META, EXPORT_TOKENIZER, vocabulary


class CTranslate2Engine:
    """Decodes with ctranslate2.Translator; the same interface as JaxEngine (no parameters)."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        device: str = "cpu",
        compute_type: str = "default",
        threads: int = 0,
    ) -> None:
        try:
            import ctranslate2
        except ImportError as e:
            raise ValueError(
                'ctranslate2 is not installed: pip install -e ".[serve]" (or pip install '
                "ctranslate2)"
            ) from e
        self.model_dir = Path(model_dir)
        meta_path = self.model_dir / EXPORT_META
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{meta_path}: missing, so {self.model_dir} is not a model exported by "
                "transformer_jax (python -m transformer_jax.export --format ctranslate2)"
            )
        self.meta = json.loads(meta_path.read_text())
        self.config = ModelConfig.from_dict(self.meta["model_config"], source=str(meta_path))
        self._source_eos_added = source_eos_added(self.model_dir)
        self.tokenizer = Tokenizer.load(self.model_dir / EXPORT_TOKENIZER)
        self.translator = ctranslate2.Translator(
            str(self.model_dir),
            device=device,
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=threads,
        )
        # The exported vocabulary itself: pieces, then the padding rows' names (their own ids).
        self._pieces = vocabulary(self.tokenizer, self.config.vocab_size)
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        start = self._pieces[self.config.decoder_start_id]
        self._suppressed = [[self._pieces[PAD_ID]], [start]]

    def bind(self, params: Any, settings: DecodeSettings) -> DecodeRows:
        """decode_rows with the settings fixed (params are ignored: the weights are exported)."""
        del params
        return functools.partial(self.decode_rows, settings)

    def decode_rows(self, settings: DecodeSettings, src_rows: np.ndarray, number: int) -> Decoded:
        """This process's rows [b, S] (EOS then PAD) -> their n best, in our token ids."""
        lengths = (src_rows != PAD_ID).sum(axis=1)
        real = [row for row in range(len(src_rows)) if lengths[row] > 0]
        width = settings.output_length(src_rows.shape[1], self.config.max_len)
        tokens_BxNxT = np.full((len(src_rows), settings.nbest, width), PAD_ID, np.int32)
        scores_BxN = np.full((len(src_rows), settings.nbest), -np.inf, np.float32)
        if not real:
            return Decoded(tokens_BxNxT, scores_BxN)
        # Rows end in EOS; a folder that appends it itself gets the pieces before it.
        keep = lengths - 1 if self._source_eos_added else lengths
        batch = [[self._pieces[i] for i in src_rows[row, : keep[row]]] for row in real]
        results = self.translator.translate_batch(batch, **self._options(settings, width, number))
        for row, result in zip(real, results, strict=True):
            cap = min(int(lengths[row]) + settings.extra_length, width)
            for n, (pieces, score) in enumerate(zip(result.hypotheses, result.scores, strict=True)):
                ids = [self._ids[p] for p in pieces][: cap - 1]
                tokens_BxNxT[row, n, : len(ids) + 1] = [*ids, EOS_ID]
                scores_BxN[row, n] = score
        return Decoded(tokens_BxNxT, scores_BxN)

    def _options(self, settings: DecodeSettings, width: int, number: int) -> dict[str, Any]:
        """translate_batch's keyword arguments for our settings (batch `number` of a call)."""
        options: dict[str, Any] = {
            # Our lengths count EOS; CTranslate2's maximum counts the tokens before it.
            "max_decoding_length": width - 1,
            "min_decoding_length": 0,  # its default 1 would forbid an empty output
            "max_input_length": 0,  # the sources were truncated by our own rule already
            "num_hypotheses": settings.nbest,
            "return_scores": True,
            "suppress_sequences": self._suppressed,
        }
        if settings.method == "sample" and settings.temperature > 0:
            import ctranslate2

            # Its sampling draws from one global seed; ours folds in the batch number too.
            ctranslate2.set_random_seed(settings.seed + number)
            options.update(
                beam_size=1,
                sampling_topk=settings.top_k,  # 0: the whole vocabulary, as ours
                sampling_temperature=settings.temperature,
            )
        elif settings.method != "beam":  # greedy, and sampling at temperature 0 (argmax)
            options["beam_size"] = 1
        else:
            options.update(beam_size=settings.beam_size, length_penalty=settings.alpha)
        return options


def source_eos_added(model_dir: Path) -> bool:
    """Whether the folder's CTranslate2 config appends EOS to each source (add_source_eos).

    Exports since format 2 say true; earlier ones said false and expect EOS in the input. A
    config that adds BOS was not written by our export, and is refused rather than misread.
    """
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable CTranslate2 config ({e}); export again") from e
    if config.get("add_source_bos", False):
        raise ValueError(
            f"{path}: add_source_bos is true, which no transformer_jax export writes; export "
            "again with python -m transformer_jax.export --format ctranslate2 --force"
        )
    return bool(config.get("add_source_eos", False))
