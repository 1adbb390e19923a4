"""The word tables of the built-in corpus: `tables/*.tsv` read into the objects the grammar uses.

Each table is UTF-8 and tab-separated, with a header row that names the columns; blank lines and
lines starting with "#" (which explain the table) are skipped, and "-" marks an empty cell. To add
a word, add a row to its table: the loader, the grammar and the counts pick it up.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from typing import Any, Literal

Tense = Literal["present", "past", "perfect", "future", "want", "can", "must"]
Person = Literal["1sg", "3sg", "pl"]
Case = Literal["nom", "acc", "dat"]
Frame = Literal["acc", "dat", "ditrans", "motion", "copula", "report"]
Gender = Literal["m", "f", "n"]
Auxiliary = Literal["haben", "sein"]

_PACKAGE = __name__.rpartition(".")[0]

# ---------------------------------------------------------------------------------------------
# reading tables


@dataclasses.dataclass(frozen=True)
class _Row:
    where: str  # "tables/nouns.tsv:12", for error messages
    cells: dict[str, str]

    def __getitem__(self, column: str) -> str:
        """The cell in `column`; "" for a "-" cell."""
        cell = self.cells[column]
        return "" if cell == "-" else cell

    def choice(self, column: str, allowed: Any) -> Any:
        """The cell in `column`, checked against the values of the Literal type `allowed`."""
        cell = self[column]
        if cell not in typing.get_args(allowed):
            raise ValueError(
                f"{self.where}: {column} is {cell!r}, not one of {typing.get_args(allowed)}"
            )
        return cell


def _table(name: str) -> list[_Row]:
    """The data rows of tables/{name}.tsv, keyed by the header row."""
    text = resources.files(_PACKAGE).joinpath("tables", f"{name}.tsv").read_text(encoding="utf-8")
    header: list[str] | None = None
    rows: list[_Row] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        if header is None:
            header = cells
            continue
        where = f"tables/{name}.tsv:{number}"
        if len(cells) != len(header):
            raise ValueError(
                f"{where}: {len(cells)} tab-separated cells, the header has {len(header)}"
            )
        rows.append(_Row(where, dict(zip(header, cells, strict=True))))
    return rows


def _split(row: _Row, column: str, parts: int) -> list[str]:
    """The "|"-separated forms in `column`, which must number `parts`."""
    forms = row[column].split("|")
    if len(forms) != parts:
        raise ValueError(f"{row.where}: {column} has {len(forms)} '|'-separated forms, not {parts}")
    return forms


# ---------------------------------------------------------------------------------------------
# numbers, dates

_CARDINALS = {int(r["n"]): (r["en"], r["de"]) for r in _table("cardinals")}
_EN_SMALL = tuple(_CARDINALS[n][0] for n in range(20))
_DE_SMALL = tuple(_CARDINALS[n][1] for n in range(20))
# Indexed by the tens digit; 0 and 1 have no tens word of their own.
_EN_TENS = ("", "", *(_CARDINALS[10 * t][0] for t in range(2, 10)))
_DE_TENS = ("", "", *(_CARDINALS[10 * t][1] for t in range(2, 10)))
_ORDINALS = _table("ordinals")
_EN_ORDINAL_IRREGULAR = {int(r["n"]): r["ordinal"] for r in _ORDINALS if r["language"] == "en"}
_DE_ORDINAL_IRREGULAR = {int(r["n"]): r["ordinal"] for r in _ORDINALS if r["language"] == "de"}
_MONTHS = tuple((r["en"], r["de"], int(r["days"])) for r in _table("months"))
_WEEKDAYS = tuple((r["en"], r["de"]) for r in _table("weekdays"))

# ---------------------------------------------------------------------------------------------
# nouns and adjectives


@dataclasses.dataclass(frozen=True)
class _Noun:
    en: str
    en_pl: str | None  # None: a mass noun (only "the X" or "a cup of X")
    de: str
    de_pl: str | None
    gender: Gender
    tags: frozenset[str]
    adjectives: tuple[str, ...]
    de_oblique: str  # accusative and dative singular; differs from `de` for weak masculines

    def de_form(self, case: Case, plural: bool) -> str:
        """The German noun form for a case and number."""
        if not plural:
            return self.de if case == "nom" else self.de_oblique
        assert self.de_pl is not None
        # Dative plural adds -n unless the plural already ends in -n or -s (Kindern, Autos).
        if case == "dat" and not self.de_pl.endswith(("n", "s")):
            return self.de_pl + "n"
        return self.de_pl


_ADJECTIVES = {r["en"]: r["de"] for r in _table("adjectives")}
_PREDICATIVES = {r["en"]: r["de"] for r in _table("predicatives")}
_ADJ_SETS = {r["set"]: tuple(r["adjectives"].split()) for r in _table("adjective_sets")}
_CONTAINERS = tuple(r["noun"] for r in _table("containers"))


def _build_nouns() -> dict[str, _Noun]:
    """The nouns of nouns.tsv, then the compounds of compounds.tsv, by English key."""
    nouns: dict[str, _Noun] = {}
    for row in _table("nouns"):
        tags = frozenset(row["tags"].split())
        mass = not row["en_plural"]
        nouns[row["en"]] = _Noun(
            en=row["en"],
            en_pl=None if mass else row["en_plural"],
            de=row["de"],
            de_pl=None if mass else row["de_plural"],
            gender=row.choice("gender", Gender),
            tags=tags,
            adjectives=_ADJ_SETS[row["adjective_set"]],
            # Weak masculines take -n/-en outside the nominative singular (den Jungen).
            de_oblique=row["de_plural"] if "weak" in tags else row["de"],
        )
    for row in _table("compounds"):
        en_mod, de_mod, head = row["en_modifier"], row["de_modifier"], nouns[row["head"]]
        nouns[f"{en_mod} {head.en}"] = dataclasses.replace(
            head,
            en=f"{en_mod} {head.en}",
            en_pl=None if head.en_pl is None else f"{en_mod} {head.en_pl}",
            de=de_mod + head.de.lower(),
            de_pl=None if head.de_pl is None else de_mod + head.de_pl.lower(),
            de_oblique=de_mod + head.de_oblique.lower(),
        )
    return nouns


_NOUNS = _build_nouns()

# ---------------------------------------------------------------------------------------------
# pronouns


@dataclasses.dataclass(frozen=True)
class _Pronoun:
    person: Person
    nom: str
    acc: str
    dat: str


_PRONOUN_ROWS = _table("pronouns")


def _pronouns(role: str) -> dict[str, _Pronoun]:
    """The pronouns of pronouns.tsv in `role` ('subject' or 'object'), by English form."""
    return {
        r["en"]: _Pronoun(r.choice("person", Person), r["nom"], r["acc"], r["dat"])
        for r in _PRONOUN_ROWS
        if r["role"] == role
    }


def _object_pronouns(case: Case) -> tuple[str, ...]:
    """The object pronouns that may stand in `case`."""
    return tuple(r["en"] for r in _PRONOUN_ROWS if case in r["object_cases"].split())


_SUBJECT_PRONOUNS = _pronouns("subject")
_OBJECT_PRONOUNS = _pronouns("object")
_ACC_OBJECT_PRONOUNS = _object_pronouns("acc")
_DAT_OBJECT_PRONOUNS = _object_pronouns("dat")
_PRONOUNS = _SUBJECT_PRONOUNS | _OBJECT_PRONOUNS

# ---------------------------------------------------------------------------------------------
# verbs


@dataclasses.dataclass(frozen=True)
class _Verb:
    en: tuple[str, str, str, str]  # base, 3sg present, past, past participle
    de_inf: str  # with a separable prefix: "anrufen"
    de_present: tuple[str, str, str]  # 1sg, 3sg, plural (without a separable prefix)
    de_past: tuple[str, str]  # singular, plural (Präteritum, without a separable prefix)
    de_participle: str
    frame: Frame
    objects: frozenset[str]  # noun tags the (direct) object may carry
    prefix: str = ""  # German separable prefix, sent to the end of a main clause
    en_particle: str = ""  # English particle that follows an object pronoun ("picks him up")
    aux: Auxiliary = "haben"


def _verb(row: _Row) -> _Verb:
    """A verb from a row of verbs.tsv."""
    base, third, past, participle = _split(row, "en", 4)
    inf, p1, p3, ppl, past_sg, past_pl, de_participle = _split(row, "de", 7)
    return _Verb(
        en=(base, third, past, participle),
        de_inf=inf,
        de_present=(p1, p3, ppl),
        de_past=(past_sg, past_pl),
        de_participle=de_participle,
        frame=row.choice("frame", Frame),
        objects=frozenset(row["objects"].split()),
        prefix=row["prefix"],
        en_particle=row["particle"],
        aux=row.choice("aux", Auxiliary),
    )


_VERBS = {row["key"]: _verb(row) for row in _table("verbs")}

# ---------------------------------------------------------------------------------------------
# places, destinations, conjunctions, times

_PLACES = {r["en"]: r["de"] for r in _table("places")}
_DESTINATION_ROWS = _table("destinations")
_DESTINATIONS = {r["en"]: r["de"] for r in _DESTINATION_ROWS}
_NO_DRIVING = tuple(
    r["en"] for r in _DESTINATION_ROWS if r.choice("by_car", Literal["yes", "no"]) == "no"
)
# Going, coming and running reach every destination; driving only those with by_car "yes".
_VERB_DESTINATIONS = {
    key: tuple(d for d in _DESTINATIONS if key != "drive" or d not in _NO_DRIVING)
    for key, verb in _VERBS.items()
    if verb.frame == "motion"
}
_CONJUNCTIONS = {r["en"]: r["de"] for r in _table("conjunctions")}


def _tense_set(row: _Row) -> frozenset[str]:
    """The tenses column of a times.tsv row, checked."""
    tenses = frozenset(row["tenses"].split())
    unknown = tenses - set(typing.get_args(Tense))
    if unknown:
        raise ValueError(f"{row.where}: unknown tenses {sorted(unknown)}")
    return tenses


_SIMPLE_TIMES = tuple((r["en"], r["de"], _tense_set(r)) for r in _table("times"))
