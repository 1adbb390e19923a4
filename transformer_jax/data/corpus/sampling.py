"""Random sentence trees (`sample_sentence`, `generate_pair`) and how many the grammar can make.

Each sampler here has a counting twin: the count is the number of distinct syntax trees the
sampler can return, and since no two trees render the same English sentence that is also the
number of distinct sentences (tests/test_corpus.py checks both counts against the samplers).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from transformer_jax.data.corpus.grammar import Clause, NounPhrase, Sentence, render
from transformer_jax.data.corpus.lexicon import (
    _ACC_OBJECT_PRONOUNS,
    _CONTAINERS,
    _DAT_OBJECT_PRONOUNS,
    _NOUNS,
    _PLACES,
    _PREDICATIVES,
    _PRONOUNS,
    _SIMPLE_TIMES,
    _SUBJECT_PRONOUNS,
    _VERB_DESTINATIONS,
    _VERBS,
    Person,
    Tense,
    _Noun,
    _Verb,
)
from transformer_jax.data.corpus.numerals import _CLOCK_TIMES, _DATE_TIMES, _WEEKDAY_TIMES

_QUANTITIES = range(2, 100)
_PERSONS = tuple(n for n in _NOUNS.values() if "person" in n.tags)
_CLAUSE_VERBS = tuple(k for k, v in _VERBS.items() if v.frame != "report")
_REPORT_VERBS = tuple(k for k, v in _VERBS.items() if v.frame == "report")
# The copula is weighted up: short clauses such as "because the child is tired" are common.
_CLAUSE_VERB_WEIGHTS = tuple(4.0 if k == "be" else 1.0 for k in _CLAUSE_VERBS)
_TENSES: tuple[Tense, ...] = ("present", "past", "perfect", "future", "want", "can", "must")
_TENSE_WEIGHTS = (0.3, 0.22, 0.14, 0.1, 0.09, 0.08, 0.07)
_COPULA_TENSES: tuple[Tense, ...] = ("present", "past", "perfect", "future")
_PLACE_KEYS = tuple(_PLACES)
_PREDICATIVE_KEYS = tuple(_PREDICATIVES)
_SUBJECT_PRONOUN_KEYS = tuple(_SUBJECT_PRONOUNS)


def _object_nouns(verb: _Verb) -> tuple[_Noun, ...]:
    return tuple(n for n in _NOUNS.values() if n.tags & verb.objects)


_OBJECT_NOUNS = {k: _object_nouns(v) for k, v in _VERBS.items()}
_TIMES_BY_TENSE = {
    tense: tuple(en for en, _, tenses in _SIMPLE_TIMES if tense in tenses) for tense in _TENSES
}


def _tenses(verb: _Verb) -> tuple[Tense, ...]:
    if verb.frame == "copula":
        return _COPULA_TENSES
    if verb.frame == "report":
        return ("present", "past")
    return _TENSES


def _forbidden(verb_key: str, tense: Tense, person: Person) -> bool:
    # "I read the book" is present or past: keep only the present so English stays unambiguous.
    return verb_key == "read" and tense == "past" and person != "3sg"


def _sample_noun_phrase(rng: random.Random, noun: _Noun, quantity_p: float) -> NounPhrase:
    adjective = rng.choice(noun.adjectives) if rng.random() < 0.25 else None
    if noun.en_pl is None:
        if "drink" in noun.tags and rng.random() < 0.4:
            count = 1 if rng.random() < 0.5 else rng.choice(_QUANTITIES)
            return NounPhrase(noun.en, count=count, container=rng.choice(_CONTAINERS))
        return NounPhrase(noun.en, adjective=adjective)
    if rng.random() < quantity_p:
        return NounPhrase(noun.en, count=rng.choice(_QUANTITIES), adjective=adjective)
    r = rng.random()
    if r < 0.5:
        return NounPhrase(noun.en, adjective=adjective)
    if r < 0.8:
        return NounPhrase(noun.en, det="a", adjective=adjective)
    return NounPhrase(noun.en, plural=True, adjective=adjective)


def _count_noun_phrases(noun: _Noun) -> dict[Person, int]:
    with_adjective = 1 + len(noun.adjectives)
    if noun.en_pl is None:
        measures = len(_CONTAINERS) * (1 + len(_QUANTITIES)) if "drink" in noun.tags else 0
        return {"3sg": with_adjective + measures, "pl": 0}
    return {"3sg": 2 * with_adjective, "pl": (1 + len(_QUANTITIES)) * with_adjective}


def _sample_subject(rng: random.Random) -> NounPhrase:
    if rng.random() < 0.3:
        return NounPhrase(rng.choice(_SUBJECT_PRONOUN_KEYS))
    # Few counted subjects: "Sixty-four bakers are sad" is grammatical but odd.
    return _sample_noun_phrase(rng, rng.choice(_PERSONS), quantity_p=0.06)


def _count_subjects() -> dict[Person, int]:
    counts: dict[Person, int] = {"1sg": 0, "3sg": 0, "pl": 0}
    for key in _SUBJECT_PRONOUN_KEYS:
        counts[_PRONOUNS[key].person] += 1
    for noun in _PERSONS:
        for person, n in _count_noun_phrases(noun).items():
            counts[person] += n
    return counts


def _sample_object(rng: random.Random, verb_key: str, pronouns: Sequence[str]) -> NounPhrase:
    if pronouns and "person" in _VERBS[verb_key].objects and rng.random() < 0.15:
        return NounPhrase(rng.choice(pronouns))
    return _sample_noun_phrase(rng, rng.choice(_OBJECT_NOUNS[verb_key]), quantity_p=0.18)


def _count_objects(verb_key: str, pronouns: Sequence[str]) -> int:
    nouns = sum(sum(_count_noun_phrases(n).values()) for n in _OBJECT_NOUNS[verb_key])
    return nouns + (len(pronouns) if "person" in _VERBS[verb_key].objects else 0)


def _sample_arguments(rng: random.Random, verb_key: str) -> dict[str, object]:
    verb = _VERBS[verb_key]
    if verb.frame == "acc":
        return {"obj": _sample_object(rng, verb_key, _ACC_OBJECT_PRONOUNS)}
    if verb.frame == "dat":
        return {"obj": _sample_object(rng, verb_key, _DAT_OBJECT_PRONOUNS)}
    if verb.frame == "ditrans":
        if rng.random() < 0.2:
            recipient = NounPhrase(rng.choice(_DAT_OBJECT_PRONOUNS))
        else:
            recipient = _sample_noun_phrase(rng, rng.choice(_PERSONS), quantity_p=0.06)
        return {"recipient": recipient, "obj": _sample_object(rng, verb_key, ())}
    if verb.frame == "motion":
        return {"complement": rng.choice(_VERB_DESTINATIONS[verb_key])}
    return {"complement": rng.choice(_PREDICATIVE_KEYS)}


def _count_arguments(verb_key: str) -> int:
    verb = _VERBS[verb_key]
    if verb.frame == "acc":
        return _count_objects(verb_key, _ACC_OBJECT_PRONOUNS)
    if verb.frame == "dat":
        return _count_objects(verb_key, _DAT_OBJECT_PRONOUNS)
    if verb.frame == "ditrans":
        recipients = len(_DAT_OBJECT_PRONOUNS) + sum(
            sum(_count_noun_phrases(n).values()) for n in _PERSONS
        )
        return recipients * _count_objects(verb_key, ())
    if verb.frame == "motion":
        return len(_VERB_DESTINATIONS[verb_key])
    return len(_PREDICATIVE_KEYS)


def _sample_time(rng: random.Random, tense: Tense) -> str | None:
    if tense == "perfect":
        return None
    r = rng.random()
    if r < 0.3:
        return rng.choice(_TIMES_BY_TENSE[tense])
    if r < 0.45:
        return rng.choice(_WEEKDAY_TIMES)[0]
    if r < 0.72:
        return rng.choice(_DATE_TIMES)[0]
    return rng.choice(_CLOCK_TIMES)[0]


def _count_times(tense: Tense) -> int:
    if tense == "perfect":
        return 0
    return len(_TIMES_BY_TENSE[tense]) + len(_WEEKDAY_TIMES) + len(_DATE_TIMES) + len(_CLOCK_TIMES)


ClauseMode = Literal["statement", "question", "main", "sub"]


def _sample_clause(rng: random.Random, mode: ClauseMode) -> Clause:
    """A random clause; `mode` sets which adverbials it may have and where they go."""
    verb_key = rng.choices(_CLAUSE_VERBS, _CLAUSE_VERB_WEIGHTS)[0]
    verb = _VERBS[verb_key]
    subject = _sample_subject(rng)
    tenses = _tenses(verb)
    weights = _TENSE_WEIGHTS[: len(tenses)]
    tense = rng.choices(tenses, weights)[0]
    while _forbidden(verb_key, tense, subject.person):
        tense = rng.choices(tenses, weights)[0]
    arguments = _sample_arguments(rng, verb_key)
    has_place = verb.frame in ("acc", "dat", "ditrans")
    when = _sample_time(rng, tense)
    where = rng.choice(_PLACE_KEYS) if has_place else None
    time_: str | None = None
    place: str | None = None
    front: Literal["time", "place"] | None = None
    if mode == "statement":
        time_ = when if rng.random() < 0.45 else None
        place = where if rng.random() < 0.3 else None
        options: list[Literal["time", "place"] | None] = [None]
        options += ["time"] if time_ else []
        options += ["place"] if place else []
        front = rng.choice(options)
    elif mode == "question":
        time_ = when if rng.random() < 0.3 else None
        place = where if rng.random() < 0.25 else None
    elif mode == "main":
        r = rng.random()
        time_ = when if r < 0.25 else None
        place = where if 0.25 <= r < 0.45 else None
    return Clause(
        subject=subject,
        verb=verb_key,
        tense=tense,
        time=time_,
        place=place,
        front=front,
        **arguments,  # type: ignore[arg-type]
    )


def _count_adverbials(mode: ClauseMode, times: int, places: int) -> int:
    """Choices of time, place and fronting that _sample_clause has in `mode`."""
    t, p = times, places
    return {
        # Either adverbial alone may open a statement; with both, either or neither.
        "statement": 1 + 2 * t + 2 * p + 3 * t * p,
        "question": 1 + t + p + t * p,
        "main": 1 + t + p,
        "sub": 1,
    }[mode]


def _count_clauses(mode: ClauseMode) -> int:
    subjects = _count_subjects()
    total = 0
    for verb_key in _CLAUSE_VERBS:
        verb = _VERBS[verb_key]
        places = len(_PLACE_KEYS) if verb.frame in ("acc", "dat", "ditrans") else 0
        for tense in _tenses(verb):
            n_subjects = sum(n for p, n in subjects.items() if not _forbidden(verb_key, tense, p))
            adverbials = _count_adverbials(mode, _count_times(tense), places)
            total += n_subjects * _count_arguments(verb_key) * adverbials
    return total


_ADVERBIAL_CONJUNCTIONS: tuple[Literal["because", "although", "while"], ...] = (
    "because",
    "although",
    "while",
)


def sample_sentence(rng: random.Random) -> Sentence:
    """A random sentence tree: statement, question, complex sentence or reported speech."""
    r = rng.random()
    if r < 0.5:
        return Sentence(_sample_clause(rng, "statement"))
    if r < 0.62:
        return Sentence(_sample_clause(rng, "question"), question=True)
    if r < 0.88:
        main = _sample_clause(rng, "main")
        conj = rng.choice(_ADVERBIAL_CONJUNCTIONS)
        return Sentence(
            main, conj=conj, sub=_sample_clause(rng, "sub"), sub_first=rng.random() < 0.35
        )
    reporter = Clause(
        subject=_sample_subject(rng),
        verb=rng.choice(_REPORT_VERBS),
        tense=rng.choice(("present", "past")),
    )
    return Sentence(reporter, conj="that", sub=_sample_clause(rng, "sub"))


def generate_pair(rng: random.Random) -> tuple[str, str]:
    """One random (english, german) pair."""
    return render(sample_sentence(rng))


def max_distinct_pairs() -> int:
    """How many distinct sentence pairs the grammar can produce."""
    subordinate = _count_clauses("sub")
    complex_ = len(_ADVERBIAL_CONJUNCTIONS) * 2 * _count_clauses("main") * subordinate
    reported = sum(_count_subjects().values()) * len(_REPORT_VERBS) * 2 * subordinate
    return _count_clauses("statement") + _count_clauses("question") + complex_ + reported
