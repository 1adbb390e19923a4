"""Tests for transformer_jax.data.corpus: exact German rules, then properties of the splits."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from transformer_jax.data.corpus import (
    Clause,
    CorpusSizes,
    NounPhrase,
    Sentence,
    builtin_corpus,
    corpus_stats,
    english_number,
    english_ordinal,
    generate,
    generate_pair,
    german_number,
    german_ordinal,
    lexicon,
    max_distinct_pairs,
    render,
    render_clock_time,
    render_date,
    sampling,
    write_builtin_corpus,
)

SMALL = CorpusSizes(train=2_000, validation=200, test=200)
NP = NounPhrase


def statement(**clause: object) -> tuple[str, str]:
    """Render a one-clause statement."""
    return render(Sentence(Clause(**clause)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# numbers, dates, clock times


@pytest.mark.parametrize(
    ("n", "en", "de"),
    [
        (1, "one", "eins"),
        (7, "seven", "sieben"),
        (16, "sixteen", "sechzehn"),
        (17, "seventeen", "siebzehn"),
        (21, "twenty-one", "einundzwanzig"),
        (30, "thirty", "dreißig"),
        (57, "fifty-seven", "siebenundfünfzig"),
        (99, "ninety-nine", "neunundneunzig"),
        (101, "one hundred and one", "hunderteins"),
        (342, "three hundred and forty-two", "dreihundertzweiundvierzig"),
    ],
)
def test_number_words(n: int, en: str, de: str) -> None:
    """Cardinals in words; German puts the unit before the tens."""
    assert english_number(n) == en
    assert german_number(n) == de


def test_numbers_out_of_range_raise() -> None:
    with pytest.raises(ValueError):
        german_number(-1)
    with pytest.raises(ValueError):
        english_number(1_000_000)


def test_ordinals_and_dates() -> None:
    assert [english_ordinal(n) for n in (1, 2, 3, 12, 20, 21)] == [
        "first",
        "second",
        "third",
        "twelfth",
        "twentieth",
        "twenty-first",
    ]
    assert [german_ordinal(n) for n in (1, 3, 7, 8, 19, 20, 31)] == [
        "ersten",
        "dritten",
        "siebten",
        "achten",
        "neunzehnten",
        "zwanzigsten",
        "einunddreißigsten",
    ]
    assert render_date(3, 5) == ("on the third of May", "am dritten Mai")
    assert render_date(21, 3) == ("on the twenty-first of March", "am einundzwanzigsten März")
    with pytest.raises(ValueError):
        render_date(31, 4)


@pytest.mark.parametrize(
    ("hour", "minute", "en", "de"),
    [
        (7, 30, "at half past seven", "um halb acht"),
        (8, 45, "at a quarter to nine", "um Viertel vor neun"),
        (1, 15, "at a quarter past one", "um Viertel nach eins"),
        (1, 0, "at one o'clock", "um ein Uhr"),
        (12, 30, "at half past twelve", "um halb eins"),
        (3, 20, "at twenty past three", "um zwanzig nach drei"),
        (11, 50, "at ten to twelve", "um zehn vor zwölf"),
    ],
)
def test_clock_times(hour: int, minute: int, en: str, de: str) -> None:
    assert render_clock_time(hour, minute) == (en, de)


# ---------------------------------------------------------------------------------------------
# word order, compounds, cases


def test_verb_second_after_a_fronted_adverbial() -> None:
    """A fronted time or place pushes the subject behind the finite verb."""
    tomorrow = statement(subject=NP("teacher"), verb="buy", obj=NP("book"), time="tomorrow")
    assert tomorrow == ("The teacher buys the book tomorrow.", "Der Lehrer kauft morgen das Buch.")
    fronted = statement(
        subject=NP("teacher"), verb="buy", obj=NP("book"), time="tomorrow", front="time"
    )
    assert fronted == ("Tomorrow the teacher buys the book.", "Morgen kauft der Lehrer das Buch.")
    date = statement(
        subject=NP("she"),
        verb="read",
        tense="past",
        obj=NP("newspaper"),
        time="on the third of May",
        place="in the kitchen",
        front="place",
    )
    assert date == (
        "In the kitchen she read the newspaper on the third of May.",
        "In der Küche las sie am dritten Mai die Zeitung.",
    )


def test_verb_final_subordinate_clause() -> None:
    """weil/obwohl/dass send the whole verb group to the end; a fronted clause inverts the main."""
    main = Clause(NP("teacher"), "buy", obj=NP("apple", det="a"))
    sub = Clause(NP("she"), "read", obj=NP("book"))
    assert render(Sentence(main, conj="because", sub=sub)) == (
        "The teacher buys an apple because she reads the book.",
        "Der Lehrer kauft einen Apfel, weil sie das Buch liest.",
    )
    assert render(Sentence(main, conj="because", sub=sub, sub_first=True)) == (
        "Because she reads the book, the teacher buys an apple.",
        "Weil sie das Buch liest, kauft der Lehrer einen Apfel.",
    )
    called = Clause(NP("she"), "call", tense="perfect", obj=NP("teacher"))
    reporter = Clause(NP("I"), "know")
    assert render(Sentence(reporter, conj="that", sub=called)) == (
        "I know that she has called the teacher.",
        "Ich weiß, dass sie den Lehrer angerufen hat.",
    )
    pick_up = Clause(NP("we"), "pick up", tense="want", obj=NP("boy"))
    happy = Clause(NP("he"), "be", complement="happy")
    assert render(Sentence(happy, conj="although", sub=pick_up))[1] == (
        "Er ist glücklich, obwohl wir den Jungen abholen wollen."
    )


def test_split_verb_forms_close_the_main_clause() -> None:
    """Participles, infinitives and separable prefixes go to the end of a main clause."""
    assert statement(
        subject=NP("teacher"), verb="buy", tense="perfect", obj=NP("apple", count=24)
    ) == (
        "The teacher has bought twenty-four apples.",
        "Der Lehrer hat vierundzwanzig Äpfel gekauft.",
    )
    assert statement(
        subject=NP("child", plural=True), verb="go", tense="perfect", complement="home"
    ) == (
        "The children have gone home.",
        "Die Kinder sind nach Hause gegangen.",
    )
    assert statement(subject=NP("she"), verb="call", obj=NP("him"), time="at half past seven") == (
        "She calls him at half past seven.",
        "Sie ruft ihn um halb acht an.",
    )
    assert statement(subject=NP("I"), verb="pick up", tense="future", obj=NP("her")) == (
        "I will pick her up.",
        "Ich werde sie abholen.",
    )
    assert statement(subject=NP("I"), verb="pick up", obj=NP("neighbour")) == (
        "I pick up the neighbour.",
        "Ich hole den Nachbarn ab.",
    )


def test_compound_nouns() -> None:
    """English noun-noun phrases are single German words with the head's gender."""
    assert statement(subject=NP("teacher"), verb="drink", obj=NP("apple juice")) == (
        "The teacher drinks the apple juice.",
        "Der Lehrer trinkt den Apfelsaft.",
    )
    assert statement(subject=NP("woman"), verb="go", complement="to the train station") == (
        "The woman goes to the train station.",
        "Die Frau geht zum Bahnhof.",
    )
    assert statement(subject=NP("he"), verb="find", obj=NP("house key", plural=True)) == (
        "He finds the house keys.",
        "Er findet die Hausschlüssel.",
    )
    assert statement(subject=NP("we"), verb="eat", obj=NP("birthday cake", det="a")) == (
        "We eat a birthday cake.",
        "Wir essen einen Geburtstagskuchen.",
    )


def test_articles_cases_and_adjective_endings() -> None:
    """Dative recipients, accusative objects, weak/mixed/strong adjective endings."""
    assert statement(
        subject=NP("girl", det="a", adjective="friendly"),
        verb="give",
        obj=NP("apple", det="a", adjective="red"),
        recipient=NP("man", adjective="old"),
    ) == (
        "A friendly girl gives the old man a red apple.",
        "Ein freundliches Mädchen gibt dem alten Mann einen roten Apfel.",
    )
    assert statement(
        subject=NP("they"),
        verb="show",
        tense="past",
        obj=NP("book", count=3, adjective="new"),
        recipient=NP("child", plural=True, adjective="small"),
    ) == (
        "They showed the small children three new books.",
        "Sie zeigten den kleinen Kindern drei neue Bücher.",
    )
    assert statement(subject=NP("doctor"), verb="help", obj=NP("boy", count=2)) == (
        "The doctor helps two boys.",
        "Der Arzt hilft zwei Jungen.",
    )
    assert statement(
        subject=NP("he"),
        verb="bring",
        obj=NP("milk", count=2, container="glass"),
        recipient=NP("her"),
    ) == ("He brings her two glasses of milk.", "Er bringt ihr zwei Gläser Milch.")


def test_questions_put_the_verb_first() -> None:
    assert render(Sentence(Clause(NP("teacher"), "buy", obj=NP("book")), question=True)) == (
        "Does the teacher buy the book?",
        "Kauft der Lehrer das Buch?",
    )
    called = Clause(NP("she"), "call", tense="perfect", obj=NP("him"))
    assert render(Sentence(called, question=True)) == (
        "Has she called him?",
        "Hat sie ihn angerufen?",
    )
    tired = Clause(NP("I"), "be", tense="past", complement="tired")
    assert render(Sentence(tired, question=True)) == ("Was I tired?", "War ich müde?")


# ---------------------------------------------------------------------------------------------
# the grammar as a whole


def test_translation_is_a_one_to_one_function() -> None:
    """Sampling with repeats never gives an English sentence two translations, or vice versa."""
    rng = random.Random(1)
    en_to_de: dict[str, set[str]] = defaultdict(set)
    de_to_en: dict[str, set[str]] = defaultdict(set)
    for _ in range(20_000):
        en, de = generate_pair(rng)
        en_to_de[en].add(de)
        de_to_en[de].add(en)
    assert all(len(v) == 1 for v in en_to_de.values())
    assert all(len(v) == 1 for v in de_to_en.values())


def _shrink_grammar(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut the lexicon down so that sampling reaches every sentence the grammar can make."""
    nouns = lexicon._NOUNS
    boy = dataclasses.replace(nouns["boy"], adjectives=("small",))
    letter = dataclasses.replace(nouns["letter"], adjectives=("red",))
    monkeypatch.setattr(sampling, "_PERSONS", (boy,))
    objects = {"read": (letter,), "help": (boy,), "pick up": (boy,), "give": (letter,)}
    monkeypatch.setattr(sampling, "_OBJECT_NOUNS", objects)
    monkeypatch.setattr(sampling, "_VERB_DESTINATIONS", {"go": ("home", "to the park")})
    monkeypatch.setattr(sampling, "_QUANTITIES", range(2, 3))
    monkeypatch.setattr(sampling, "_SUBJECT_PRONOUN_KEYS", ("I", "she"))
    monkeypatch.setattr(
        sampling, "_TIMES_BY_TENSE", {t: v[:1] for t, v in sampling._TIMES_BY_TENSE.items()}
    )
    for name in (
        "_WEEKDAY_TIMES",
        "_DATE_TIMES",
        "_CLOCK_TIMES",
        "_PLACE_KEYS",
        "_PREDICATIVE_KEYS",
    ):
        monkeypatch.setattr(sampling, name, getattr(sampling, name)[:1])


def test_counting_matches_sampling_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a shrunken grammar the sampler reaches exactly as many clauses as the count says."""
    _shrink_grammar(monkeypatch)
    monkeypatch.setattr(sampling, "_CLAUSE_VERBS", ("read",))
    monkeypatch.setattr(sampling, "_CLAUSE_VERB_WEIGHTS", (1.0,))
    rng = random.Random(0)
    clauses = {sampling._sample_clause(rng, "sub") for _ in range(40_000)}
    assert len(clauses) == sampling._count_clauses("sub")


@pytest.mark.parametrize("mode", ["statement", "question", "main", "sub"])
def test_counting_matches_sampling_per_part(
    monkeypatch: pytest.MonkeyPatch, mode: sampling.ClauseMode
) -> None:
    """Subjects, arguments and adverbial placements reach their counts (which multiply)."""
    _shrink_grammar(monkeypatch)
    verbs = ("be", "read", "help", "pick up", "give", "go")
    monkeypatch.setattr(sampling, "_CLAUSE_VERBS", verbs)
    monkeypatch.setattr(sampling, "_CLAUSE_VERB_WEIGHTS", (1.0,) * len(verbs))
    rng = random.Random(0)
    subjects: set[NounPhrase] = set()
    arguments: dict[str, tuple[set[object], ...]] = defaultdict(lambda: (set(), set(), set()))
    # Adverbials depend only on the tense and on whether the verb takes a place.
    adverbials: dict[tuple[bool, lexicon.Tense], set[object]] = defaultdict(set)
    for _ in range(30_000):
        c = sampling._sample_clause(rng, mode)
        subjects.add(c.subject)
        for slot, value in zip(arguments[c.verb], (c.obj, c.recipient, c.complement), strict=True):
            slot.add(value)
        adverbials[c.verb not in ("be", "go"), c.tense].add((c.time, c.place, c.front))
    assert len(subjects) == sum(sampling._count_subjects().values())
    assert {v: math.prod(len(slot) for slot in a) for v, a in arguments.items()} == {
        v: sampling._count_arguments(v) for v in verbs
    }
    assert len(adverbials) == 2 * 7  # (takes a place or not) x tense
    for (has_place, tense), seen in adverbials.items():
        places = len(sampling._PLACE_KEYS) if has_place else 0
        expected = sampling._count_adverbials(mode, sampling._count_times(tense), places)
        assert len(seen) == expected, (has_place, tense)


def test_capacity_is_large() -> None:
    assert max_distinct_pairs() > 10**9


# ---------------------------------------------------------------------------------------------
# splits


def test_same_seed_same_corpus_other_seed_other_corpus() -> None:
    first = builtin_corpus(seed=3, sizes=SMALL)
    generate._corpus.cache_clear()  # regenerate rather than read back the cached splits
    assert first == builtin_corpus(seed=3, sizes=SMALL)
    assert first["train"] != builtin_corpus(seed=4, sizes=SMALL)["train"]


def test_corpus_is_identical_across_processes() -> None:
    """No dependence on Python's per-process hash randomisation."""
    code = (
        "import hashlib; from transformer_jax.data.corpus import builtin_corpus, CorpusSizes; "
        "c = builtin_corpus(5, CorpusSizes(300, 30, 30)); "
        "print(hashlib.sha256(repr(sorted(c.items())).encode()).hexdigest())"
    )
    here = hashlib.sha256(
        repr(sorted(builtin_corpus(5, CorpusSizes(300, 30, 30)).items())).encode()
    )
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            cwd=Path(__file__).resolve().parents[1],
        )
        assert out.stdout.strip() == here.hexdigest()


def test_sizes_distinct_and_disjoint() -> None:
    splits = builtin_corpus(seed=0, sizes=SMALL)
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 2_000,
        "validation": 200,
        "test": 200,
    }
    for side in (0, 1):
        sets = {k: {pair[side] for pair in v} for k, v in splits.items()}
        assert sum(len(s) for s in sets.values()) == 2_400  # distinct within and across splits
        assert not sets["train"] & sets["validation"]
        assert not sets["train"] & sets["test"]
        assert not sets["validation"] & sets["test"]


def test_held_out_splits_do_not_depend_on_the_train_size() -> None:
    small = builtin_corpus(seed=0, sizes=SMALL)
    larger = builtin_corpus(seed=0, sizes=dataclasses.replace(SMALL, train=3_000))
    assert small["test"] == larger["test"]
    assert small["validation"] == larger["validation"]
    assert larger["train"][:2_000] == small["train"]


def test_impossible_or_negative_sizes_raise() -> None:
    with pytest.raises(ValueError, match="at most"):
        builtin_corpus(sizes=CorpusSizes(train=max_distinct_pairs() + 1))
    with pytest.raises(ValueError, match="non-negative"):
        builtin_corpus(sizes=CorpusSizes(test=-1))


def test_default_corpus_shape() -> None:
    """Multi-word, clean single-line sentences over a bounded lexicon."""
    splits = builtin_corpus()
    pairs = [pair for split in splits.values() for pair in split]
    stats = corpus_stats(pairs)
    assert stats["pairs"] == 52_000
    assert stats["en_mean_words"] >= 6 and stats["de_mean_words"] >= 6
    assert stats["en_types"] < 1_500 and stats["de_types"] < 1_500
    for en, de in pairs:
        for sentence in (en, de):
            assert sentence.strip() == sentence and sentence
            assert "\n" not in sentence and "\t" not in sentence and "  " not in sentence
            assert sentence[0].isupper() and sentence[-1] in ".?"


def test_corpus_stats_counts_words() -> None:
    stats = corpus_stats(
        [("It is twenty-one o'clock.", "Es ist einundzwanzig Uhr."), ("Hi!", "Hallo!")]
    )
    assert stats == {
        "pairs": 2,
        "en_types": 5,
        "en_mean_words": 2.5,
        "en_max_words": 4,
        "de_types": 5,
        "de_mean_words": 2.5,
        "de_max_words": 4,
    }


def test_write_builtin_corpus(tmp_path: Path) -> None:
    paths = write_builtin_corpus(tmp_path / "out", seed=2, sizes=SMALL)
    splits = builtin_corpus(seed=2, sizes=SMALL)
    assert set(paths) == {"train", "validation", "test"}
    for split, (en_path, de_path) in paths.items():
        assert (en_path.name, de_path.name) == (f"{split}.en", f"{split}.de")
        en_lines = en_path.read_text(encoding="utf-8").splitlines()
        de_lines = de_path.read_text(encoding="utf-8").splitlines()
        assert len(en_lines) == len(de_lines) == getattr(SMALL, split)
        assert list(zip(en_lines, de_lines, strict=True)) == splits[split]


def test_command_line_writes_the_corpus(tmp_path: Path) -> None:
    """`python -m transformer_jax.data.corpus --out DIR` writes the same splits as the API."""
    sizes = ["--train", "20", "--validation", "5", "--test", "5"]
    out = subprocess.run(
        [sys.executable, "-m", "transformer_jax.data.corpus", "--out", str(tmp_path), *sizes],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.startswith("wrote 30 pairs")
    train = builtin_corpus(seed=0, sizes=CorpusSizes(20, 5, 5))["train"]
    assert (tmp_path / "train.de").read_text(encoding="utf-8").splitlines() == [
        de for _, de in train
    ]
