"""Where (source, target) sentence pairs come from: tfds, text files, or the built-in corpus.

Every loader returns a random-access `Sequence[tuple[str, str]]` (source first), which is what
the grain pipeline shuffles globally. Split names are 'train', 'validation' and 'test' for all
kinds. `load_pairs(kind, split, **options)` is the one entry the training loop calls.

Text and TSV files are read whole and strictly: line counts must agree, bytes must be UTF-8,
and pairs with an empty side or a side over `max_chars` characters (characters, not words, so
the rule means the same for every script) are dropped by rule, counted, logged and kept on the
returned `Pairs.dropped`. tfds pairs are passed through as stored; the pipeline drops (and
counts) empty or over-long examples after tokenizing.
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, get_args, overload

from absl import logging

if TYPE_CHECKING:
    from transformer_jax.data.corpus import CorpusSizes

Pair = tuple[str, str]
SourceKind = Literal["builtin", "tfds", "text", "tsv"]
Split = str

# Generous for a sentence (WMT14 EN-DE sentences average ~130 characters); it removes
# paragraphs and concatenated garbage that would only be dropped after tokenizing anyway.
DEFAULT_MAX_CHARS = 1024


@dataclasses.dataclass(frozen=True)
class DropCounts:
    """How many pairs a loader dropped, by rule."""

    empty: int = 0
    too_long: int = 0

    @property
    def total(self) -> int:
        """All dropped pairs."""
        return self.empty + self.too_long


class Pairs(Sequence[Pair]):
    """In-memory (source, target) pairs with where they came from and what was dropped."""

    def __init__(self, pairs: list[Pair], origin: str, dropped: DropCounts | None = None) -> None:
        self._pairs = pairs
        self.origin = origin
        self.dropped = dropped or DropCounts()

    @overload
    def __getitem__(self, index: int) -> Pair: ...
    @overload
    def __getitem__(self, index: slice) -> list[Pair]: ...
    def __getitem__(self, index: int | slice) -> Pair | list[Pair]:
        return self._pairs[index]

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._pairs)

    def __repr__(self) -> str:
        return f"Pairs({self.origin}, {len(self)} pairs, dropped={self.dropped})"


# ---------------------------------------------------------------------------------------------
# tfds


class TfdsPairs(Sequence[Pair]):
    """A random-access view of a tfds translation split as (source, target) strings."""

    def __init__(self, source: Any, source_lang: str, target_lang: str, origin: str) -> None:
        self._source = source
        self._source_lang = source_lang
        self._target_lang = target_lang
        self.origin = origin

    def _pair(self, example: dict[str, Any]) -> Pair:
        return _as_text(example[self._source_lang]), _as_text(example[self._target_lang])

    @overload
    def __getitem__(self, index: int) -> Pair: ...
    @overload
    def __getitem__(self, index: slice) -> list[Pair]: ...
    def __getitem__(self, index: int | slice) -> Pair | list[Pair]:
        if isinstance(index, slice):
            return [self._pair(self._source[i]) for i in range(*index.indices(len(self)))]
        return self._pair(self._source[index])

    def __iter__(self) -> Iterator[Pair]:
        # Sequence's default __iter__ reads until IndexError, which not every source raises.
        for i in range(len(self)):
            yield self[i]

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsPairs({self.origin}, {len(self)} pairs)"


def tfds_pairs(
    name: str = "wmt14_translate/de-en",
    split: Split = "train",
    source_lang: str = "en",
    target_lang: str = "de",
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = False,
) -> TfdsPairs:
    """Pairs of a prepared tfds translation dataset, read through array_record (no TensorFlow).

    EN->DE by default, although the tfds config is named de-en. For wmt14_translate/de-en,
    'validation' is newstest2013 (3000 lines) and 'test' is newstest2014 (3003 lines). tfds
    split slicing ('train[:1%]') works. With `download=True` the dataset is downloaded and
    prepared in array_record format under `data_dir` (`manual_dir` holds files that some WMT
    subsets need to be fetched by hand); otherwise nothing touches the network.
    """
    import tensorflow_datasets as tfds

    # tfds registers its dataset builders lazily when TensorFlow is absent; the translate
    # package holds wmt14_translate and the other WMT/TED translation builders.
    import tensorflow_datasets.translate

    where = data_dir or "~/tensorflow_datasets"
    origin = f"tfds {name} split={split!r} data_dir={where}"
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds_pairs: name={name!r} is not a tfds dataset ({e})") from e
    languages = getattr(builder.info.features, "languages", None)
    if languages is None:
        raise ValueError(f"tfds_pairs: {name} has no Translation feature; it is not parallel text")
    for field_name, lang in (("source_lang", source_lang), ("target_lang", target_lang)):
        if lang not in languages:
            raise ValueError(
                f"tfds_pairs: {field_name}={lang!r} is not in {name}'s languages {list(languages)}"
            )
    if download:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            file_format="array_record",
        )
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # tfds raises KeyError, NotImplementedError, ... for the same cause.
        if not builder.info.splits:
            raise FileNotFoundError(
                f"{origin}: not prepared (no array_record files under {builder.data_dir}). "
                f"Run `tfds build {name} --file_format=array_record --data_dir=DIR` "
                "(TensorFlow is not needed), then pass data_dir=DIR; or call with download=True."
            ) from e
        if isinstance(e, NotImplementedError):
            raise FileNotFoundError(
                f"{origin}: prepared at {builder.data_dir} in {builder.info.file_format} format, "
                "which has no random access; rebuild it with `tfds build "
                f"{name} --file_format=array_record` into another data_dir."
            ) from e
        raise ValueError(f"{origin}: cannot read the split ({e})") from e
    return TfdsPairs(source, source_lang, target_lang, origin)


def _as_text(value: str | bytes) -> str:
    # Prepared array_record data decodes text to bytes; tfds.testing.mock_data gives str.
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------
# text files


def text_file_pairs(
    source_path: str | Path, target_path: str | Path, max_chars: int | None = DEFAULT_MAX_CHARS
) -> Pairs:
    """Line-aligned pairs from two files (one sentence per line; `.gz` is read transparently)."""
    source_lines = read_lines(source_path)
    target_lines = read_lines(target_path)
    if len(source_lines) != len(target_lines):
        raise ValueError(
            f"{source_path} has {len(source_lines)} lines but {target_path} has "
            f"{len(target_lines)}; the files must be line-aligned (line i of one translates "
            "line i of the other)."
        )
    return _filter_pairs(
        zip(source_lines, target_lines, strict=True), f"{source_path} + {target_path}", max_chars
    )


def tsv_pairs(
    path: str | Path,
    source_column: int = 0,
    target_column: int = 1,
    max_chars: int | None = DEFAULT_MAX_CHARS,
) -> Pairs:
    """Pairs from tab-separated lines (no quoting; extra columns such as scores are ignored)."""
    needed = max(source_column, target_column) + 1
    rows: list[Pair] = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            rows.append(("", ""))  # Counted as empty by _filter_pairs, like a blank text line.
            continue
        fields = line.split("\t")
        if len(fields) < needed:
            raise ValueError(
                f"{path}:{number}: {len(fields)} tab-separated column(s), but source_column="
                f"{source_column} and target_column={target_column} need {needed}; "
                "is the file tab-separated?"
            )
        rows.append((fields[source_column], fields[target_column]))
    return _filter_pairs(rows, str(path), max_chars)


def read_lines(
    source: str | Path | BinaryIO,
    name: str | None = None,
    invalid: Literal["raise", "empty"] = "raise",
) -> list[str]:
    """All lines of UTF-8 text, without line ends: a file (`.gz` read transparently) or a stream.

    The one set of line rules for every command and source: lines end at "\\n" only (a "\\r"
    before it is dropped), a final line without one is kept, a byte-order mark is not part of
    the first line. Invalid UTF-8 is a ValueError naming the file (or `name`) and line; with
    invalid="empty" such lines become empty strings instead (keeping the line count) and one
    warning names them.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        name = name or str(path)
    else:
        data = source.read()
        name = name or str(getattr(source, "name", "<stream>"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        if invalid == "raise":
            bad = data[e.start : e.start + 4]
            raise ValueError(
                f"{name}:{line}: invalid UTF-8 (bytes {bad!r}); re-encode the text as UTF-8, "
                "e.g. `iconv -f latin1 -t utf-8`."
            ) from e
        text = _blank_invalid_lines(data, name)
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085, form feeds, ...,
    # which occur inside WMT sentences and would misalign the two sides.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]  # A byte-order mark is not part of the first sentence.
    return [line.rstrip("\r") for line in lines]


def _blank_invalid_lines(data: bytes, name: str) -> str:
    """The text with every line that is not valid UTF-8 emptied; warns naming those lines."""
    lines, bad = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append("")
            bad.append(number)
    shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
    logging.warning(
        "%s: %d line(s) are not valid UTF-8 and were replaced by empty lines (line %s).",
        name,
        len(bad),
        shown,
    )
    return "\n".join(lines)


def _filter_pairs(rows: Any, origin: str, max_chars: int | None) -> Pairs:
    """Strip both sides; drop (and count) pairs with an empty side or a side over max_chars."""
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"{origin}: max_chars={max_chars} must be positive (or None for no limit)")
    kept: list[Pair] = []
    empty = too_long = 0
    for source, target in rows:
        source, target = source.strip(), target.strip()
        if not source or not target:
            empty += 1
        elif max_chars is not None and (len(source) > max_chars or len(target) > max_chars):
            too_long += 1
        else:
            kept.append((source, target))
    dropped = DropCounts(empty=empty, too_long=too_long)
    if dropped.total:
        logging.warning(
            "%s: kept %d pairs; dropped %d with an empty side and %d with a side over %s chars.",
            origin,
            len(kept),
            empty,
            too_long,
            max_chars,
        )
    else:
        logging.info("%s: kept all %d pairs.", origin, len(kept))
    return Pairs(kept, origin, dropped)


# ---------------------------------------------------------------------------------------------
# built-in corpus


def builtin_pairs(split: Split, seed: int = 0, sizes: CorpusSizes | None = None) -> Pairs:
    """Pairs of the built-in synthetic EN->DE corpus (no download; for CPU runs and tests)."""
    from transformer_jax.data import corpus

    splits = (
        corpus.builtin_corpus(seed=seed)
        if sizes is None
        else corpus.builtin_corpus(seed=seed, sizes=sizes)
    )
    if split not in splits:
        raise ValueError(f"builtin_pairs: split={split!r} is not one of {sorted(splits)}")
    return Pairs(list(splits[split]), f"builtin corpus split={split!r} seed={seed}")


# ---------------------------------------------------------------------------------------------
# dispatcher


def load_pairs(kind: SourceKind, split: Split, **options: Any) -> Sequence[Pair]:
    """Pairs of one split from the source `kind` names, configured by `options`.

    kind='builtin': seed, sizes.
    kind='tfds': name, source_lang, target_lang, data_dir, manual_dir, download.
    kind='text': source_path, target_path, max_chars; '{split}' in a path becomes the split.
    kind='tsv': path, source_column, target_column, max_chars; '{split}' as for 'text'.
    """
    loaders: dict[str, Callable[..., Sequence[Pair]]] = {
        "builtin": builtin_pairs,
        "tfds": tfds_pairs,
        "text": text_file_pairs,
        "tsv": tsv_pairs,
    }
    if kind not in loaders:
        raise ValueError(
            f"data source field 'kind': unknown value {kind!r}; "
            f"choose one of {list(get_args(SourceKind))}"
        )
    loader = loaders[kind]
    parameters = {n: p for n, p in inspect.signature(loader).parameters.items() if n != "split"}
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ValueError(
            f"data source kind={kind!r}: unknown option(s) {unknown}; it takes {list(parameters)}"
        )
    missing = [n for n, p in parameters.items() if p.default is p.empty and n not in options]
    if missing:
        raise ValueError(f"data source kind={kind!r}: option(s) {missing} must be set")
    if kind in ("text", "tsv"):
        options = {
            k: v.format(split=split) if k.endswith("path") and isinstance(v, str) else v
            for k, v in options.items()
        }
        return loader(**options)
    return loader(split=split, **options)
