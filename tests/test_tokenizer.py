"""Tests for transformer_jax.data.tokenizer."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from transformer_jax.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.data.tokenizer import (
    Tokenizer,
    VocabTokenizer,
    check_vocab,
    load_or_train_tokenizer,
    train_tokenizer,
)

_EN = ["the", "a", "cat", "dog", "house", "tree", "sees", "big", "red", "over", "under"]
_DE = ["der", "die", "katze", "hund", "haus", "baum", "sieht", "groß", "rot", "über"]


def _sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(" ".join(rng.choice(_EN) for _ in range(rng.randint(1, 12))))
        out.append(" ".join(rng.choice(_DE) for _ in range(rng.randint(1, 12))))
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A small BPE tokenizer shared by the tests of this file."""
    return train_tokenizer(_sentences(), tmp_path_factory.mktemp("tok") / "m", vocab_size=120)


def test_special_ids_and_files(tokenizer: Tokenizer) -> None:
    """The fixed ids of transformer_jax.config; .model and .vocab are written."""
    sp = tokenizer.processor
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD_ID, EOS_ID, UNK_ID, BOS_ID)
    assert tokenizer.vocab_size == 120
    assert Path(tokenizer.path).name == "m.model"
    assert Path(tokenizer.path).with_suffix(".vocab").exists()


def test_encode_decode_round_trip(tokenizer: Tokenizer) -> None:
    """encode adds no EOS; decode inverts it; encode_batch equals encode."""
    texts = ["the big cat sees der hund", "über rot groß"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert EOS_ID not in ids and all(i >= 4 for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_decode_stops_at_eos_and_skips_pad_bos(tokenizer: Tokenizer) -> None:
    """Ids after the first EOS are ignored; PAD and BOS vanish; numpy rows are accepted."""
    cat, dog = tokenizer.encode("cat"), tokenizer.encode("dog")
    ids = [BOS_ID, *cat, PAD_ID, *dog, EOS_ID, *cat, PAD_ID]
    assert tokenizer.decode(ids) == "cat dog"
    assert tokenizer.decode(np.asarray(ids, dtype=np.int32)) == "cat dog"
    rows = np.asarray([ids, [*dog, EOS_ID, *cat, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    assert tokenizer.decode_batch(rows) == ["cat dog", "dog"]


def test_decode_ids_past_the_vocab_print_unknown(tokenizer: Tokenizer) -> None:
    """A model vocab larger than the tokenizer's may emit ids it lacks: shown, not a crash."""
    text = tokenizer.decode([*tokenizer.encode("cat"), tokenizer.vocab_size + 5])
    assert text.startswith("cat") and text != "cat"


def test_unknown_characters_map_to_unk(tokenizer: Tokenizer) -> None:
    """Characters never seen in training become UNK_ID."""
    assert UNK_ID in tokenizer.encode("cat 猫")


def test_training_is_deterministic_and_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Same sentences and seed give the same pieces and scores; nothing reaches stderr."""
    sentences = _sentences(300, seed=1)
    a = train_tokenizer(sentences, tmp_path / "a", 100, max_sentences=200)
    b = train_tokenizer(iter(sentences), tmp_path / "b", 100, max_sentences=200)

    # The file bytes also record the temporary input path, so compare the vocabulary itself.
    def pieces(tok: Tokenizer) -> list[tuple[str, float]]:
        sp = tok.processor
        return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(tok.vocab_size)]

    assert pieces(a) == pieces(b)
    c = train_tokenizer(sentences, tmp_path / "c", 100, max_sentences=200, seed=7)
    assert pieces(c) != pieces(a)
    assert capfd.readouterr().err == ""


def test_small_corpus_gives_a_smaller_vocab(tmp_path: Path) -> None:
    """The vocabulary limit is soft: asking for too many pieces shrinks, never fails."""
    tok = train_tokenizer(["a b c", "abc cab"], tmp_path / "m", vocab_size=5000)
    assert 4 < tok.vocab_size < 5000


def test_unigram_model_type(tmp_path: Path) -> None:
    """The unigram model also gets the fixed special ids."""
    tok = train_tokenizer(_sentences(100), tmp_path / "u", 60, model_type="unigram")
    assert tok.processor.bos_id() == BOS_ID
    assert tok.decode(tok.encode("der hund")) == "der hund"


def test_sample_is_capped_uniform_and_seeded() -> None:
    """The training sample respects max_sentences and max_chars and depends only on seed."""
    stream = [f"sentence {i}" for i in range(1000)] + ["", "   "]
    a = tokenizer_lib._sample_sentences(stream, 100, 10**9, seed=3)
    assert a == tokenizer_lib._sample_sentences(iter(stream), 100, 10**9, seed=3)
    assert len(a) == 100 and len(set(a)) == 100 and set(a) <= set(stream)
    # Uniform over the stream, not its head.
    assert max(int(s.split()[1]) for s in a) > 500
    capped = tokenizer_lib._sample_sentences(stream, 100, 55, seed=3)
    assert sum(len(s) for s in capped) <= 55 and len(capped) >= 4


def test_train_rejects_bad_arguments(tmp_path: Path) -> None:
    """model_type and vocab_size are checked before training."""
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(["a"], tmp_path / "m", 100, model_type="word")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size=4"):
        train_tokenizer(["a"], tmp_path / "m", 4)
    with pytest.raises(ValueError, match="no non-empty sentences"):
        train_tokenizer(["", " "], tmp_path / "m", 100)


def test_load_missing_file(tmp_path: Path) -> None:
    """A missing file names the path."""
    with pytest.raises(FileNotFoundError, match=r"nothere\.model"):
        Tokenizer.load(tmp_path / "nothere.model")


def test_load_corrupt_file(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """A truncated model names the path and says it is corrupt."""
    bad = tmp_path / "bad.model"
    bad.write_bytes(Path(tokenizer.path).read_bytes()[:50])
    with pytest.raises(ValueError, match=r"bad\.model.*corrupt"):
        Tokenizer.load(bad)


def test_load_model_with_foreign_special_ids(tmp_path: Path) -> None:
    """A sentencepiece model with default ids (unk 0, bos 1, eos 2, no pad) is refused."""
    text = tmp_path / "in.txt"
    text.write_text("\n".join(_sentences(50)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "foreign"), vocab_size=40, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"foreign\.model: special ids"):
        Tokenizer.load(tmp_path / "foreign.model")


def test_pickle_round_trip(tokenizer: Tokenizer) -> None:
    """grain worker processes receive the tokenizer by pickling."""
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("the red tree") == tokenizer.encode("the red tree")
    assert clone.path == tokenizer.path


def test_load_or_train_reuses_the_workdir_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call trains and saves; the second loads without training or reading text."""
    calls = []

    def sentences() -> list[str]:
        calls.append(1)
        return _sentences(100)

    model = tmp_path / "work" / "tokenizer.model"
    first = load_or_train_tokenizer(model, sentences, vocab_size=80)
    assert Path(first.path) == model and len(calls) == 1
    assert sorted(p.name for p in model.parent.iterdir()) == ["tokenizer.model", "tokenizer.vocab"]
    mtime = model.stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained")

    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", fail)
    second = load_or_train_tokenizer(model, sentences, vocab_size=80)
    assert len(calls) == 1 and model.stat().st_mtime_ns == mtime
    assert second.encode("der hund") == first.encode("der hund")


def test_load_or_train_leaves_no_partial_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash during training leaves no tokenizer.model, so the next run trains again."""

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        load_or_train_tokenizer(tmp_path / "tokenizer.model", lambda: _sentences(10), vocab_size=80)
    assert not (tmp_path / "tokenizer.model").exists()


def test_check_vocab(tokenizer: Tokenizer) -> None:
    """More pieces than model embeddings is an error naming both sizes and the file."""
    check_vocab(tokenizer, tokenizer.vocab_size, "config")
    check_vocab(tokenizer, 1024, "config")
    with pytest.raises(ValueError, match=r"configs/x\.py") as e:
        check_vocab(tokenizer, 64, "configs/x.py")
    message = str(e.value)
    assert "vocab_size=64" in message and "120 pieces" in message and tokenizer.path in message


def _marian_style(tmp_path: Path, tokenizer: Tokenizer) -> tuple[Path, Path, Path]:
    """A source/target/vocab.json trio as an import writes it: our special ids, two models."""
    sp = tokenizer.processor
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())] + [">>deu<<"]
    (tmp_path / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    target = train_tokenizer(_sentences(seed=1), tmp_path / "target", vocab_size=100)
    return (tmp_path / "vocab.json"), Path(tokenizer.path), Path(target.path)


def test_vocab_tokenizer_cuts_each_side_with_its_model(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    vocab, source, target = _marian_style(tmp_path, tokenizer)
    vocab_tok = VocabTokenizer.load_files(source, target, vocab)
    table = json.loads(vocab.read_text())
    text = "the big red cat sees der hund"
    # Pieces of each side's model, numbered by vocab.json (a piece it lacks is unk).
    for side, model in (("source", source), ("target", target)):
        cut = spm.SentencePieceProcessor(model_file=str(model)).encode(text, out_type=str)
        assert vocab_tok.encode(text, side=side) == [table.get(p, UNK_ID) for p in cut]
    assert vocab_tok.encode_batch([text, "the cat"], side="target")[1] == vocab_tok.encode(
        "the cat", side="target"
    )
    # A leading language code is one token, as MarianTokenizer keeps it.
    assert vocab_tok.encode(">>deu<< the cat")[0] == table[">>deu<<"]
    assert vocab_tok.encode(">>deu<< the cat")[1:] == vocab_tok.encode(" the cat")
    ids = vocab_tok.encode("the red tree")
    assert vocab_tok.decode([*ids, EOS_ID, 7]) == "the red tree"
    assert vocab_tok.decode([PAD_ID, *ids]) == "the red tree"
    assert vocab_tok.vocab_size == len(table)
    clone = pickle.loads(pickle.dumps(vocab_tok))
    assert clone.encode(text, side="target") == vocab_tok.encode(text, side="target")


def test_bad_vocab_json_is_refused_naming_the_file(tmp_path: Path, tokenizer: Tokenizer) -> None:
    vocab, source, target = _marian_style(tmp_path, tokenizer)
    vocab.write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(ValueError, match=r"vocab\.json: id 0 of 'b' is repeated"):
        VocabTokenizer.load_files(source, target, vocab)
    vocab.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"vocab\.json: expected one JSON object"):
        VocabTokenizer.load_files(source, target, vocab)
    vocab.write_text("{")
    with pytest.raises(ValueError, match=r"vocab\.json: not valid JSON"):
        VocabTokenizer.load_files(source, target, vocab)
    with pytest.raises(FileNotFoundError, match="missing"):
        VocabTokenizer.load_files(source, target, tmp_path / "absent.json")
