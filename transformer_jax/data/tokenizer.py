"""One shared sentencepiece vocabulary for source and target (paper section 5.1).

The special ids are fixed by `transformer_jax.config`: PAD 0, EOS 1, UNK 2, BOS 3. `encode` adds
no EOS (the pipeline appends it); `decode` stops at the first EOS and drops PAD and BOS.

Training caps its input: at most `max_sentences` sentences and `max_chars` characters, drawn
uniformly (seeded reservoir sample) from the whole stream, so a WMT-sized corpus trains in
minutes and the same sentences always give the same model. The vocabulary limit is soft
(`hard_vocab_limit=False`): a small corpus yields fewer pieces than asked, never an error. The
model's `vocab_size` must then be >= `Tokenizer.vocab_size`; `check_vocab` enforces it.

`VocabTokenizer` is the other layout a workdir can hold: the source and target sentencepiece
models and the piece -> id vocabulary of a model imported from Marian (transformer_jax.convert).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm
from absl import logging
from etils import epath

from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID

ModelType = Literal["bpe", "unigram"]
# Which side a text is on: vocabularies imported from Marian cut each side with its own model.
Side = Literal["source", "target"]
PathLike = str | os.PathLike

# sentencepiece's word-start mark, which MarianTokenizer turns into a space after decoding.
_WORD_START = "\u2581"
# sentencepiece skips (and only logs) training sentences over its max_sentence_length bytes;
# we drop them ourselves, with a count, and raise its limit so none is lost silently.
_MAX_SENTENCE_BYTES = 16384


class Tokenizer:
    """A sentencepiece model with the project's fixed special ids."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str) -> None:
        self._sp = processor
        self._path = path
        self._check_special_ids()

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Read a `.model` file; a missing, corrupt or foreign model raises a clear error."""
        model_path = epath.Path(path)
        if not model_path.exists():
            raise FileNotFoundError(
                f"{model_path}: no sentencepiece model here; train one with train_tokenizer() "
                "or point at the workdir's tokenizer.model"
            )
        # Loading from bytes (not model_file=) also works for gs:// paths via epath.
        proto = model_path.read_bytes()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{model_path}: not a valid sentencepiece model ({e}); the file is corrupt or "
                "truncated. Delete it to retrain, or copy it again from its source."
            ) from e
        return cls(processor, str(model_path))

    @property
    def path(self) -> str:
        """Where the model file lives."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of pieces, the four special ids included."""
        return self._sp.get_piece_size()

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The wrapped sentencepiece processor."""
        return self._sp

    def encode(self, text: str, side: Side = "source") -> list[int]:
        """Piece ids of one sentence, without EOS (one shared model: side changes nothing)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = -1, side: Side = "source"
    ) -> list[list[int]]:
        """Piece ids of many sentences (sentencepiece's threaded batch encoder), without EOS."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def id_to_piece(self, i: int) -> str:
        """The piece of one id (for vocabularies and attention-map labels)."""
        return self._sp.id_to_piece(i)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ids up to the first EOS; PAD and BOS are skipped."""
        size = self.vocab_size
        kept: list[int] = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            # A model's vocab may be larger than this tokenizer's (vocab is padded for sharding);
            # ids past the last piece print as the unknown mark instead of crashing a decode.
            kept.append(i if 0 <= i < size else UNK_ID)
        return self._sp.decode(kept)

    def decode_batch(self, ids_BxL: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """`decode` applied to each row."""
        return [self.decode(row) for row in ids_BxL]

    def _check_special_ids(self) -> None:
        found = {
            "pad": self._sp.pad_id(),
            "eos": self._sp.eos_id(),
            "unk": self._sp.unk_id(),
            "bos": self._sp.bos_id(),
        }
        expected = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "bos": BOS_ID}
        if found != expected:
            raise ValueError(
                f"{self._path}: special ids are {found} but transformer_jax needs {expected}; "
                "this model was trained elsewhere. Retrain it with train_tokenizer()."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self._path!r}, vocab_size={self.vocab_size})"


class VocabTokenizer(Tokenizer):
    """Two sentencepiece models (source, target) whose pieces map to ids through one vocabulary.

    The layout of Marian / OPUS-MT models: source.spm and target.spm cut the text, vocab.json
    numbers the pieces (the sentencepiece models' own ids are not used). The import writes the
    vocabulary with pad, EOS and unk renumbered to PAD_ID, EOS_ID and UNK_ID; a piece missing
    from it encodes as UNK_ID, as MarianTokenizer does. A leading language code such as
    `>>fra<<` is kept as one token (multilingual OPUS-MT models read it), as MarianTokenizer does.
    """

    def __init__(
        self,
        source: spm.SentencePieceProcessor,
        target: spm.SentencePieceProcessor,
        pieces: list[str],
        path: str,
    ) -> None:
        self._source = source
        self._sp = target
        self._pieces = pieces
        self._ids = {piece: i for i, piece in enumerate(pieces)}
        self._path = path

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Not for this class: its vocabulary is three files (load_files)."""
        raise TypeError(f"{path}: VocabTokenizer reads three files; call load_files()")

    @classmethod
    def load_files(
        cls, source_spm: PathLike, target_spm: PathLike, vocab_json: PathLike
    ) -> VocabTokenizer:
        """Read source.spm, target.spm and vocab.json; a bad file is named with what is wrong."""
        vocab_path = epath.Path(vocab_json)
        pieces = read_vocab_json(vocab_path)
        return cls(
            load_processor(epath.Path(source_spm)),
            load_processor(epath.Path(target_spm)),
            pieces,
            str(vocab_path),
        )

    @property
    def vocab_size(self) -> int:
        """Entries of the vocabulary (special pieces included)."""
        return len(self._pieces)

    @property
    def source_processor(self) -> spm.SentencePieceProcessor:
        """The sentencepiece model that cuts source text (`processor` cuts target text)."""
        return self._source

    @property
    def pieces(self) -> list[str]:
        """Every piece, in id order."""
        return list(self._pieces)

    def encode(self, text: str, side: Side = "source") -> list[int]:
        """Ids of one sentence, without EOS, cut by that side's sentencepiece model."""
        return self.encode_batch([text], side=side)[0]

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = -1, side: Side = "source"
    ) -> list[list[int]]:
        """Ids of many sentences, without EOS."""
        processor = self._source if side == "source" else self._sp
        split = [_split_language_code(text) for text in texts]
        cut = processor.encode([rest for _, rest in split], out_type=str, num_threads=num_threads)
        ids = self._ids
        return [
            [ids.get(piece, UNK_ID) for piece in (code + pieces)]
            for (code, _), pieces in zip(split, cut, strict=True)
        ]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ids up to the first EOS, as MarianTokenizer.decode(skip_special_tokens=True).

        Its rule, so an imported model prints what it printed in transformers: PAD and UNK are
        dropped, the pieces are joined by the source model (MarianTokenizer's choice for one
        shared vocabulary), and any `▁` left (a piece that model does not know, such as a
        target-only piece) becomes a space, the ends stripped.
        """
        kept: list[str] = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == EOS_ID:
                break
            if i in (PAD_ID, UNK_ID) or not 0 <= i < len(self._pieces):
                continue
            kept.append(self._pieces[i])
        return self._source.decode_pieces(kept).replace(_WORD_START, " ").strip()

    def id_to_piece(self, i: int) -> str:
        """The vocabulary's piece of one id (ids past it read as the unknown piece)."""
        return self._pieces[i] if 0 <= i < len(self._pieces) else self._pieces[UNK_ID]


def read_vocab_json(path: PathLike) -> list[str]:
    """A Marian vocab.json ({piece: id}) as pieces in id order; ids must be 0..n-1 once each."""
    return _pieces_in_id_order(epath.Path(path))


def _pieces_in_id_order(path: epath.Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; a Marian vocabulary needs vocab.json")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in table.items()
    ):
        raise ValueError(f"{path}: expected one JSON object of piece -> integer id")
    pieces: list[str | None] = [None] * len(table)
    for piece, i in table.items():
        if not 0 <= i < len(table) or pieces[i] is not None:
            raise ValueError(
                f"{path}: id {i} of {piece!r} is repeated or outside 0..{len(table) - 1}; the "
                "ids must number the pieces 0, 1, 2, ... once each"
            )
        pieces[i] = piece
    return [p for p in pieces if p is not None]


def _split_language_code(text: str) -> tuple[list[str], str]:
    """(['>>xx<<'], rest) for a text starting with a language code, else ([], text)."""
    if text.startswith(">>") and (end := text.find("<<")) != -1:
        return [text[: end + 2]], text[end + 2 :]
    return [], text


def load_processor(path: epath.Path) -> spm.SentencePieceProcessor:
    """A sentencepiece model file as a processor; missing or corrupt files are named."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing sentencepiece model")
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, OSError) as e:
        raise ValueError(
            f"{path}: not a valid sentencepiece model ({e}); the file is corrupt or truncated"
        ) from e
    return processor


def train_tokenizer(
    sentences: Iterable[str],
    model_prefix: PathLike,
    vocab_size: int,
    model_type: ModelType = "bpe",
    max_sentences: int = 1_000_000,
    max_chars: int = 300_000_000,
    character_coverage: float = 1.0,
    seed: int = 0,
    num_threads: int = 2,
) -> Tokenizer:
    """Train one shared vocabulary and write `<model_prefix>.model` and `.vocab` (local paths).

    Args:
      sentences: source and target sentences, in any order; empty ones are ignored.
      model_prefix: output path without extension.
      vocab_size: the number of pieces asked for; a small corpus may give fewer (soft limit).
      model_type: 'bpe' as in the paper, or 'unigram'.
      max_sentences: sample size; sentences are drawn uniformly (seeded) from the stream.
      max_chars: character budget of the sample, applied after sampling.
      character_coverage: fraction of characters covered; 1.0 suits the Latin-script WMT pairs.
      seed: the sampling seed; same sentences and seed give the same model.
      num_threads: sentencepiece trainer threads.

    Returns:
      The trained tokenizer, loaded from `<model_prefix>.model`.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"train_tokenizer: model_type {model_type!r} is not 'bpe' or 'unigram'")
    if vocab_size <= BOS_ID + 1:
        raise ValueError(
            f"train_tokenizer: vocab_size={vocab_size} leaves no room past the 4 special ids"
        )
    sample = _sample_sentences(sentences, max_sentences, max_chars, seed)
    if not sample:
        raise ValueError("train_tokenizer: no non-empty sentences to train on")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text_path = Path(tmp) / "sentences.txt"
        with text_path.open("w", encoding="utf-8") as f:
            for sentence in sample:
                f.write(sentence + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text_path),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            # The sample is already capped and in a seeded order; sentencepiece must not resample.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            hard_vocab_limit=False,
            num_threads=num_threads,
            # The C++ trainer logs pages to stderr at INFO; keep errors only.
            minloglevel=2,
        )
    tokenizer = Tokenizer.load(f"{model_prefix}.model")
    if tokenizer.vocab_size < vocab_size:
        logging.info(
            "Tokenizer %s has %d pieces (asked for %d): the corpus is too small for more.",
            tokenizer.path,
            tokenizer.vocab_size,
            vocab_size,
        )
    return tokenizer


def load_or_train_tokenizer(
    model_path: PathLike,
    sentences_fn: Callable[[], Iterable[str]],
    vocab_size: int,
    **train_kwargs: Any,
) -> Tokenizer:
    """Reuse the sentencepiece model at `model_path` (a `.model` file) or train it there.

    `sentences_fn` is only called when training is needed. The model is trained in a local
    temporary folder, copied next to its final name and renamed, so a crash never leaves a
    partial model; the `.vocab` file lands beside it first. Training is deterministic, so hosts
    racing to write it write the same vocabulary (the bytes differ only in the recorded
    temporary input path).
    """
    final = epath.Path(model_path)
    if final.suffix != ".model":
        raise ValueError(f"{final}: a sentencepiece model file name ends in .model")
    if final.exists():
        logging.info("Reusing tokenizer %s (not retraining).", final)
        return Tokenizer.load(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / final.stem
        train_tokenizer(sentences_fn(), prefix, vocab_size, **train_kwargs)
        for suffix in (".vocab", ".model"):  # .model last: its presence means "complete".
            partial = final.parent / f".{final.stem}{suffix}.tmp-{uuid.uuid4().hex}"
            partial.write_bytes((prefix.parent / f"{prefix.name}{suffix}").read_bytes())
            partial.rename(final.with_suffix(suffix))
    logging.info("Trained tokenizer %s.", final)
    return Tokenizer.load(final)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, source: str) -> None:
    """Raise ValueError if the tokenizer has more pieces than the model has embeddings."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"{source}: model vocab_size={model_vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} pieces ({tokenizer.path}). The tokenizer probably belongs to "
            "another model or workdir: use a fresh workdir, delete that tokenizer.model to "
            f"retrain it, or set vocab_size >= {tokenizer.vocab_size}."
        )


def _sample_sentences(
    sentences: Iterable[str], max_sentences: int, max_chars: int, seed: int
) -> list[str]:
    """A seeded uniform sample (reservoir) of the non-empty sentences, capped in count and size."""
    if max_sentences <= 0 or max_chars <= 0:
        raise ValueError(
            f"train_tokenizer: max_sentences={max_sentences} and max_chars={max_chars} "
            "must be positive"
        )
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    too_long = 0
    for sentence in sentences:
        # One sentence per line in the trainer's input file: embedded newlines would split it.
        sentence = " ".join(sentence.split())
        if not sentence:
            continue
        if len(sentence.encode("utf-8")) > _MAX_SENTENCE_BYTES:
            too_long += 1
            continue
        seen += 1
        if len(reservoir) < max_sentences:
            reservoir.append(sentence)
        else:
            slot = rng.randrange(seen)
            if slot < max_sentences:
                reservoir[slot] = sentence
    if too_long:
        logging.warning(
            "Tokenizer training: skipped %d sentences over %d bytes.", too_long, _MAX_SENTENCE_BYTES
        )
    # The reservoir's order depends on the stream; shuffle so the char budget cuts uniformly.
    rng.shuffle(reservoir)
    sample: list[str] = []
    chars = 0
    for sentence in reservoir:
        chars += len(sentence)
        if chars > max_chars:
            break
        sample.append(sentence)
    if len(sample) < seen:
        logging.info(
            "Tokenizer training on a sample of %d of %d sentences (max_sentences=%d, "
            "max_chars=%d).",
            len(sample),
            seen,
            max_sentences,
            max_chars,
        )
    return sample
