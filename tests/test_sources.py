"""Tests for transformer_jax.data.sources (no test touches the network)."""

from __future__ import annotations

import gzip
import logging
import socket
import sys
import types
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

import transformer_jax.data as data_package
from transformer_jax.data import sources
from transformer_jax.data.sources import (
    DropCounts,
    load_pairs,
    text_file_pairs,
    tfds_pairs,
    tsv_pairs,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------
# text files


def test_text_files_are_line_aligned(tmp_path: Path) -> None:
    """Lines pair by number; CRLF, a BOM and surrounding spaces are removed."""
    en = _write(tmp_path / "a.en", "\ufeffHello world\r\n  Good day \nA\u2028B\n")
    de = _write(tmp_path / "a.de", "Hallo Welt\r\nGuten Tag\nA\u2028B\n")
    pairs = text_file_pairs(en, de)
    # U+2028 stays inside its line: only "\n" separates sentences.
    assert list(pairs) == [
        ("Hello world", "Hallo Welt"),
        ("Good day", "Guten Tag"),
        ("A\u2028B", "A\u2028B"),
    ]
    assert pairs.dropped == DropCounts() and len(pairs) == 3 and pairs[1] == pairs[1:2][0]


def test_text_files_gzip(tmp_path: Path) -> None:
    """`.gz` files are decompressed."""
    en = tmp_path / "a.en.gz"
    en.write_bytes(gzip.compress(b"one\ntwo\n"))
    de = _write(tmp_path / "a.de", "eins\nzwei\n")
    assert list(text_file_pairs(en, de)) == [("one", "eins"), ("two", "zwei")]


def test_line_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    """Misaligned files fail with both counts and both names."""
    en = _write(tmp_path / "train.en", "a\nb\nc\n")
    de = _write(tmp_path / "train.de", "a\nb\n")
    with pytest.raises(ValueError, match="line-aligned") as e:
        text_file_pairs(en, de)
    message = str(e.value)
    assert f"{en} has 3 lines" in message and f"{de} has 2" in message


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    """Bad bytes name the file and the 1-based line."""
    en = _write(tmp_path / "ok.en", "a\nb\nc\n")
    de = tmp_path / "bad.de"
    de.write_bytes(b"eins\nzwei\ndr\xe9i\n")
    with pytest.raises(ValueError, match=rf"{de}:3: invalid UTF-8"):
        text_file_pairs(en, de)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is named."""
    with pytest.raises(FileNotFoundError, match=r"nope\.en"):
        text_file_pairs(tmp_path / "nope.en", tmp_path / "nope.de")


def test_empty_and_over_long_pairs_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rules drop pairs; the counts are returned and logged."""
    en = _write(tmp_path / "x.en", "keep\n\nfine\n" + "x" * 31 + "\nok\n   \n")
    de = _write(tmp_path / "x.de", "behalten\nleer\n\nkurz\n" + "y" * 31 + "\nauch\n")
    with caplog.at_level(logging.WARNING):
        pairs = text_file_pairs(en, de, max_chars=30)
    assert list(pairs) == [("keep", "behalten")]
    assert pairs.dropped == DropCounts(empty=3, too_long=2)
    assert pairs.dropped.total == 5
    assert "dropped 3 with an empty side and 2 with a side over 30 chars" in caplog.text
    # No length limit at all.
    unlimited = text_file_pairs(en, de, max_chars=None)
    assert unlimited.dropped == DropCounts(empty=3, too_long=0)
    with pytest.raises(ValueError, match="max_chars=0"):
        text_file_pairs(en, de, max_chars=0)


# ---------------------------------------------------------------------------------------------
# tsv


def test_tsv_columns_and_blank_lines(tmp_path: Path) -> None:
    """Chosen columns become the pair; extra columns are ignored; blank lines count as empty."""
    path = _write(tmp_path / "c.tsv", "Hallo\tHello\t0.9\n\nTag\tDay\t0.5\n")
    pairs = tsv_pairs(path, source_column=1, target_column=0)
    assert list(pairs) == [("Hello", "Hallo"), ("Day", "Tag")]
    assert pairs.dropped == DropCounts(empty=1)


def test_tsv_missing_column_names_file_and_line(tmp_path: Path) -> None:
    """A line without enough columns names the file and line."""
    path = _write(tmp_path / "c.tsv", "a\tb\nonly one column\n")
    with pytest.raises(ValueError, match=rf"{path}:2: 1 tab-separated column"):
        tsv_pairs(path)


# ---------------------------------------------------------------------------------------------
# built-in corpus


def test_builtin_pairs_uses_the_corpus_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """builtin_pairs picks the split of corpus.builtin_corpus(seed) (a stand-in corpus here)."""
    seen = []

    def builtin_corpus(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
        seen.append(seed)
        return {"train": [("a", "b")], "validation": [("c", "d")], "test": [("e", "f")]}

    fake = types.ModuleType("transformer_jax.data.corpus")
    fake.builtin_corpus = builtin_corpus  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformer_jax.data.corpus", fake)
    monkeypatch.setattr(data_package, "corpus", fake, raising=False)
    assert list(sources.builtin_pairs("validation", seed=5)) == [("c", "d")]
    assert list(load_pairs("builtin", "test")) == [("e", "f")]
    assert seen == [5, 0]
    with pytest.raises(ValueError, match="split='dev'"):
        sources.builtin_pairs("dev")


def test_builtin_pairs_real_corpus() -> None:
    """The real built-in corpus gives non-empty text pairs for every split."""
    pytest.importorskip("transformer_jax.data.corpus")
    for split in ("train", "validation", "test"):
        pairs = sources.builtin_pairs(split)
        assert len(pairs) > 0
        source, target = pairs[0]
        assert isinstance(source, str) and isinstance(target, str) and source and target


# ---------------------------------------------------------------------------------------------
# tfds


def test_tfds_pairs_mock_data_en_to_de() -> None:
    """Mocked wmt14_translate/de-en reads as (en, de) by default and (de, en) on request."""
    with tfds.testing.mock_data(num_examples=7):
        en_de = tfds_pairs(split="test")
        de_en = tfds_pairs(split="test", source_lang="de", target_lang="en")
        assert len(en_de) == 7
        first = en_de[0]
        assert isinstance(first[0], str) and isinstance(first[1], str)
        assert de_en[0] == (first[1], first[0])
        assert en_de[1:3] == [en_de[1], en_de[2]]
        assert list(en_de)[-1] == en_de[6]


def test_tfds_pairs_rejects_unknown_language() -> None:
    """A language the dataset lacks names the field."""
    with (
        tfds.testing.mock_data(num_examples=2),
        pytest.raises(ValueError, match="source_lang='fr'"),
    ):
        tfds_pairs(source_lang="fr")


def test_tfds_not_prepared_says_how_to_build(tmp_path: Path) -> None:
    """An empty data_dir explains `tfds build ... --file_format=array_record` and data_dir."""
    with pytest.raises(FileNotFoundError, match="not prepared") as e:
        tfds_pairs(split="test", data_dir=str(tmp_path))
    message = str(e.value)
    assert "tfds build wmt14_translate/de-en --file_format=array_record" in message
    assert str(tmp_path) in message and "data_dir" in message


def test_tfds_unknown_dataset() -> None:
    """A name tfds does not know is a ValueError naming it."""
    with pytest.raises(ValueError, match="no_such_dataset"):
        tfds_pairs(name="no_such_dataset")


# ---------------------------------------------------------------------------------------------
# dispatcher


def test_load_pairs_text_and_tsv_fill_in_the_split(tmp_path: Path) -> None:
    """'{split}' in a path becomes the split name."""
    _write(tmp_path / "validation.en", "hi\n")
    _write(tmp_path / "validation.de", "hallo\n")
    _write(tmp_path / "test.tsv", "a\tb\n")
    text = load_pairs(
        "text",
        "validation",
        source_path=str(tmp_path / "{split}.en"),
        target_path=str(tmp_path / "{split}.de"),
    )
    assert list(text) == [("hi", "hallo")]
    assert list(load_pairs("tsv", "test", path=str(tmp_path / "{split}.tsv"))) == [("a", "b")]


def test_load_pairs_tfds() -> None:
    """kind='tfds' passes its options through."""
    with tfds.testing.mock_data(num_examples=3):
        assert len(load_pairs("tfds", "validation", name="wmt14_translate/de-en")) == 3


def test_load_pairs_errors_name_the_field() -> None:
    """Unknown kinds and options, and missing options, are ValueErrors naming them."""
    with pytest.raises(ValueError, match="'kind': unknown value 'csv'"):
        load_pairs("csv", "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        load_pairs("builtin", "train", colour="red")
    with pytest.raises(ValueError, match=r"\['target_path'\] must be set"):
        load_pairs("text", "train", source_path="x")


def test_read_lines_from_a_stream_follows_the_file_rules() -> None:
    import io

    from transformer_jax.data.sources import read_lines

    # The translate command reads stdin as bytes through the same rules as files.
    text = b"\xef\xbb\xbfone\r\ntwo\xe2\x80\xa8still two\nthree"
    assert read_lines(io.BytesIO(text), "<stdin>") == ["one", "two\u2028still two", "three"]
    with pytest.raises(ValueError, match=r"<stdin>:2: invalid UTF-8 \(bytes b'\\xff"):
        read_lines(io.BytesIO(b"fine\nbad \xff byte\n"), "<stdin>")
