"""Sentence trees (`NounPhrase`, `Clause`, `Sentence`) and `render`, which turns one into English
and German: word order, verb groups, articles, adjective endings and cases.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from transformer_jax.data.corpus.lexicon import (
    _ADJECTIVES,
    _CONJUNCTIONS,
    _DESTINATIONS,
    _NOUNS,
    _PLACES,
    _PREDICATIVES,
    _PRONOUNS,
    _VERBS,
    Case,
    Person,
    Tense,
    _Verb,
)
from transformer_jax.data.corpus.numerals import _TIMES, english_number, german_number


@dataclasses.dataclass(frozen=True)
class NounPhrase:
    """A pronoun ('she', 'him') or a lexicon noun with determiner, count and adjective."""

    head: str  # a pronoun or a noun of the lexicon, e.g. "apple juice"
    det: Literal["the", "a"] = "the"
    plural: bool = False  # "the apples"; implied by count >= 2
    count: int | None = None  # "twenty-four apples" (>= 2), or the number of containers
    adjective: str | None = None
    container: str | None = None  # "cup" | "glass" | "bottle": "two glasses of milk"

    @property
    def person(self) -> Person:
        """Grammatical person and number, for verb agreement."""
        if self.head in _PRONOUNS:
            return _PRONOUNS[self.head].person
        return "pl" if self.plural or (self.count is not None and not self.container) else "3sg"


@dataclasses.dataclass(frozen=True)
class Clause:
    """One clause: subject, verb (an English lexicon key such as 'pick up'), tense, arguments."""

    subject: NounPhrase
    verb: str
    tense: Tense = "present"
    obj: NounPhrase | None = None  # accusative object, dative object (help, thank), or the thing
    recipient: NounPhrase | None = None  # dative of give/show/bring/send
    complement: str | None = None  # predicative adjective ('tired') or destination ('home')
    time: str | None = None  # 'tomorrow', 'on the third of May', 'at half past seven'
    place: str | None = None  # 'in the kitchen'
    front: Literal["time", "place"] | None = None  # which adverbial opens a statement


@dataclasses.dataclass(frozen=True)
class Sentence:
    """A statement, a yes/no question, or a main clause with a subordinate clause."""

    main: Clause
    question: bool = False
    conj: Literal["because", "although", "while", "that"] | None = None
    sub: Clause | None = None
    sub_first: bool = False  # "Because ..., the teacher ..." (German: "Weil ..., kauft der ...")


def _a_or_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _en_np(np: NounPhrase) -> str:
    if np.head in _PRONOUNS:
        return np.head
    noun = _NOUNS[np.head]
    if np.container:
        box = _NOUNS[np.container]
        n = np.count or 1
        measure = f"{_a_or_an(box.en)} {box.en}" if n == 1 else f"{english_number(n)} {box.en_pl}"
        return f"{measure} of {noun.en}"
    words = [np.adjective] if np.adjective else []
    if np.count is not None:
        return " ".join([english_number(np.count), *words, str(noun.en_pl)])
    if np.plural:
        return " ".join(["the", *words, str(noun.en_pl)])
    words.append(noun.en)
    return " ".join(["the" if np.det == "the" else _a_or_an(words[0]), *words])


_DE_DEFINITE = {
    "nom": {"m": "der", "f": "die", "n": "das", "pl": "die"},
    "acc": {"m": "den", "f": "die", "n": "das", "pl": "die"},
    "dat": {"m": "dem", "f": "der", "n": "dem", "pl": "den"},
}
_DE_INDEFINITE = {
    "nom": {"m": "ein", "f": "eine", "n": "ein"},
    "acc": {"m": "einen", "f": "eine", "n": "ein"},
    "dat": {"m": "einem", "f": "einer", "n": "einem"},
}


def _adjective_ending(det: Literal["the", "a", "none"], gender: str, case: Case) -> str:
    """Weak endings after der, mixed after ein, strong with no article (plural only here)."""
    if case == "dat" or (gender == "pl" and det == "the"):
        return "en"
    if det == "none":
        return "e"  # strong plural, nominative and accusative
    if case == "acc" and gender == "m":
        return "en"
    if det == "the":
        return "e"
    return {"m": "er", "f": "e", "n": "es"}[gender]


def _de_np(np: NounPhrase, case: Case) -> str:
    if np.head in _PRONOUNS:
        return getattr(_PRONOUNS[np.head], case)
    noun = _NOUNS[np.head]
    if np.container:
        box = _NOUNS[np.container]
        n = np.count or 1
        if n == 1:
            measure = f"{_DE_INDEFINITE[case][box.gender]} {box.de_form(case, False)}"
        else:
            measure = f"{german_number(n)} {box.de_form(case, True)}"
        # The measured noun stays uninflected in apposition: "eine Tasse Kaffee".
        return f"{measure} {noun.de}"
    plural = np.plural or np.count is not None
    det: Literal["the", "a", "none"] = "none" if np.count is not None else np.det
    gender = "pl" if plural else noun.gender
    words: list[str] = []
    if np.count is not None:
        words.append(german_number(np.count))
    elif det == "the":
        words.append(_DE_DEFINITE[case][gender])
    else:
        words.append(_DE_INDEFINITE[case][gender])
    if np.adjective:
        words.append(_ADJECTIVES[np.adjective] + _adjective_ending(det, gender, case))
    words.append(noun.de_form(case, plural))
    return " ".join(words)


_PERSON_INDEX = {"1sg": 0, "3sg": 1, "pl": 2}
_DE_AUXILIARIES = {
    "haben": ("habe", "hat", "haben"),
    "sein": ("bin", "ist", "sind"),
    "future": ("werde", "wird", "werden"),
    "want": ("will", "will", "wollen"),
    "can": ("kann", "kann", "können"),
    "must": ("muss", "muss", "müssen"),
}


def _de_verb(verb: _Verb, tense: Tense, person: Person) -> tuple[str, str]:
    """(finite verb, word for the clause end): ('ruft', 'an'), ('hat', 'gekauft'), ..."""
    i = _PERSON_INDEX[person]
    if tense == "present":
        return verb.de_present[i], verb.prefix
    if tense == "past":
        return verb.de_past[person == "pl"], verb.prefix
    if tense == "perfect":
        return _DE_AUXILIARIES[verb.aux][i], verb.de_participle
    return _DE_AUXILIARIES[tense][i], verb.de_inf


def _en_verb(verb: _Verb, tense: Tense, person: Person) -> tuple[str, str, str]:
    """(statement verb group, question auxiliary, rest of the question verb group)."""
    base, third, past, participle = verb.en
    sg3 = person == "3sg"
    if verb.frame == "copula":
        present = {"1sg": "am", "3sg": "is", "pl": "are"}[person]
        was = "were" if person == "pl" else "was"
        have = "has" if sg3 else "have"
        forms = {
            "present": (present, present, ""),
            "past": (was, was, ""),
            "perfect": (f"{have} been", have, "been"),
            "future": ("will be", "will", "be"),
        }
        return forms[tense]
    do = "does" if sg3 else "do"
    if tense == "present":
        return third if sg3 else base, do, base
    if tense == "past":
        return past, "did", base
    if tense == "perfect":
        have = "has" if sg3 else "have"
        return f"{have} {participle}", have, participle
    if tense == "want":
        want = "wants to" if sg3 else "want to"
        return f"{want} {base}", do, f"want to {base}"
    aux = {"future": "will", "can": "can", "must": "must"}[tense]
    return f"{aux} {base}", aux, base


def _clause_parts(c: Clause) -> tuple[_Verb, list[str], list[str], list[str]]:
    """English words after the verb, German pronoun objects, German noun objects/complement."""
    verb = _VERBS[c.verb]
    en: list[str] = []
    de_pronouns: list[str] = []
    de_rest: list[str] = []
    if verb.frame == "ditrans":
        if c.recipient is None or c.obj is None:
            raise ValueError(f"'{c.verb}' needs a recipient and an object")
        if c.obj.head in _PRONOUNS:
            raise ValueError("the direct object of a ditransitive verb must be a noun")
        en += [_en_np(c.recipient), _en_np(c.obj)]
        recipient = _de_np(c.recipient, "dat")
        (de_pronouns if c.recipient.head in _PRONOUNS else de_rest).append(recipient)
        de_rest.append(_de_np(c.obj, "acc"))
    elif verb.frame in ("acc", "dat"):
        if c.obj is None:
            raise ValueError(f"'{c.verb}' needs an object")
        obj_en = _en_np(c.obj)
        is_pronoun = c.obj.head in _PRONOUNS
        if verb.en_particle:
            # "picks up the child" but "picks him up".
            en += [obj_en, verb.en_particle] if is_pronoun else [verb.en_particle, obj_en]
        else:
            en.append(obj_en)
        obj_de = _de_np(c.obj, "acc" if verb.frame == "acc" else "dat")
        (de_pronouns if is_pronoun else de_rest).append(obj_de)
    elif verb.frame in ("motion", "copula"):
        if c.complement is None:
            raise ValueError(f"'{c.verb}' needs a complement")
        en.append(c.complement)
        table = _DESTINATIONS if verb.frame == "motion" else _PREDICATIVES
        de_rest.append(table[c.complement])
    return verb, en, de_pronouns, de_rest


def _render_clause(
    c: Clause, mode: Literal["main", "question", "sub"], front_de: str | None = None
) -> tuple[str, str]:
    """Unpunctuated English and German clause.

    A main clause is verb-second: after its subject, or after `front_de` (a fronted adverbial or
    subordinate clause) with the subject moved behind the verb. German middle field: pronoun
    objects, time, dative then accusative noun objects, complement, place; the participle,
    infinitive or separable prefix closes the clause, and a subordinate clause ends in its whole
    verb group ("angerufen hat").
    """
    verb, en_args, de_pronouns, de_rest = _clause_parts(c)
    person = c.subject.person
    subject_en = _en_np(c.subject)
    subject_de = _de_np(c.subject, "nom")
    en_statement, en_aux, en_rest = _en_verb(verb, c.tense, person)
    finite, end = _de_verb(verb, c.tense, person)

    en_tail = list(en_args)
    de_mid = list(de_pronouns)
    if c.time is not None and c.front != "time":
        de_mid.append(_TIMES[c.time])
    de_mid += de_rest
    if c.place is not None and c.front != "place":
        en_tail.append(c.place)
        de_mid.append(_PLACES[c.place])
    if c.time is not None and c.front != "time":
        en_tail.append(c.time)

    if mode == "question":
        en_words = [en_aux, subject_en, en_rest, *en_tail]
        de_words = [finite, subject_de, *de_mid, end]
    elif mode == "sub":
        # In present and past the separable prefix rejoins its verb: "anruft".
        cluster = end + finite if c.tense in ("present", "past") else f"{end} {finite}"
        en_words = [subject_en, en_statement, *en_tail]
        de_words = [subject_de, *de_mid, cluster]
    else:
        en_front: list[str] = []
        if c.front == "time" and c.time is not None:
            en_front, front_de = [c.time], _TIMES[c.time]
        elif c.front == "place" and c.place is not None:
            en_front, front_de = [c.place], _PLACES[c.place]
        en_words = [*en_front, subject_en, en_statement, *en_tail]
        if front_de is None:
            de_words = [subject_de, finite, *de_mid, end]
        else:
            de_words = [front_de, finite, subject_de, *de_mid, end]
    return " ".join(w for w in en_words if w), " ".join(w for w in de_words if w)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def render(sentence: Sentence) -> tuple[str, str]:
    """The (English, German) sentence pair for a syntax tree, capitalized and punctuated."""
    if sentence.sub is None:
        mode: Literal["main", "question"] = "question" if sentence.question else "main"
        en, de = _render_clause(sentence.main, mode)
        mark = "?" if sentence.question else "."
        return _capitalize(en) + mark, _capitalize(de) + mark
    if sentence.question or sentence.conj is None:
        raise ValueError("a sentence with a subordinate clause is a statement with a conjunction")
    if sentence.main.front is not None:
        raise ValueError("a main clause with a subordinate clause has no fronted adverbial")
    conj_de = _CONJUNCTIONS[sentence.conj]
    sub_en, sub_de = _render_clause(sentence.sub, "sub")
    if sentence.sub_first:
        if sentence.conj == "that":
            raise ValueError("a 'that' clause follows its main clause")
        main_en, main_de = _render_clause(sentence.main, "main", front_de=f"{conj_de} {sub_de},")
        en = f"{sentence.conj} {sub_en}, {main_en}"
        return _capitalize(en) + ".", _capitalize(main_de) + "."
    main_en, main_de = _render_clause(sentence.main, "main")
    # English puts no comma before because/that; German always sets off a subordinate clause.
    en = f"{main_en} {sentence.conj} {sub_en}"
    de = f"{main_de}, {conj_de} {sub_de}"
    return _capitalize(en) + ".", _capitalize(de) + "."
