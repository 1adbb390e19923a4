"""Numbers, ordinals, dates and clock times in English and German words, and every time phrase."""

from __future__ import annotations

from transformer_jax.data.corpus.lexicon import (
    _DE_ORDINAL_IRREGULAR,
    _DE_SMALL,
    _DE_TENS,
    _EN_ORDINAL_IRREGULAR,
    _EN_SMALL,
    _EN_TENS,
    _MONTHS,
    _SIMPLE_TIMES,
    _WEEKDAYS,
)

# 25 and 35 are left out: German says "fünf vor halb" / "fünf nach halb", a second system of
# reference points that would need many more examples to learn than it is worth here.
CLOCK_MINUTES = (0, 5, 10, 15, 20, 30, 40, 45, 50, 55)


def english_number(n: int) -> str:
    """English cardinal in words (0..999999), e.g. 21 -> 'twenty-one'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"english_number: {n} is outside 0..999999")
    if n < 20:
        return _EN_SMALL[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _EN_TENS[tens] + (f"-{_EN_SMALL[unit]}" if unit else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = f"{_EN_SMALL[hundreds]} hundred"
        return f"{head} and {english_number(rest)}" if rest else head
    thousands, rest = divmod(n, 1000)
    head = f"{english_number(thousands)} thousand"
    if not rest:
        return head
    # British usage: "and" only before a last part below one hundred.
    return f"{head} and {english_number(rest)}" if rest < 100 else f"{head} {english_number(rest)}"


def german_number(n: int) -> str:
    """German cardinal in words (0..999999), units before tens: 21 -> 'einundzwanzig'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"german_number: {n} is outside 0..999999")
    if n < 20:
        return _DE_SMALL[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        if not unit:
            return _DE_TENS[tens]
        return ("ein" if unit == 1 else _DE_SMALL[unit]) + "und" + _DE_TENS[tens]
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = "hundert" if hundreds == 1 else _DE_SMALL[hundreds] + "hundert"
        return head + (german_number(rest) if rest else "")
    thousands, rest = divmod(n, 1000)
    # Inside a compound a final "eins" loses its s: "hunderteintausend", not "hunderteinstausend".
    multiplier = "" if thousands == 1 else german_number(thousands)
    if multiplier.endswith("eins"):
        multiplier = multiplier[:-1]
    return multiplier + "tausend" + (german_number(rest) if rest else "")


def english_ordinal(n: int) -> str:
    """English ordinal in words (1..99), e.g. 3 -> 'third', 21 -> 'twenty-first'."""
    if not 1 <= n < 100:
        raise ValueError(f"english_ordinal: {n} is outside 1..99")
    if n in _EN_ORDINAL_IRREGULAR:
        return _EN_ORDINAL_IRREGULAR[n]
    if n < 20:
        return english_number(n) + "th"
    tens, unit = divmod(n, 10)
    if not unit:
        return _EN_TENS[tens][:-1] + "ieth"
    return f"{_EN_TENS[tens]}-{english_ordinal(unit)}"


def german_ordinal(n: int, ending: str = "en") -> str:
    """German ordinal (1..99) with an adjective ending, e.g. (3, 'en') -> 'dritten' (am dritten)."""
    if not 1 <= n < 100:
        raise ValueError(f"german_ordinal: {n} is outside 1..99")
    if n in _DE_ORDINAL_IRREGULAR:
        stem = _DE_ORDINAL_IRREGULAR[n]
    else:
        stem = german_number(n) + ("t" if n < 20 else "st")
    return stem + ending


def render_date(day: int, month: int) -> tuple[str, str]:
    """('on the third of May', 'am dritten Mai') for day 3 of month 5."""
    if not 1 <= month <= 12:
        raise ValueError(f"render_date: month {month} is outside 1..12")
    en_month, de_month, days = _MONTHS[month - 1]
    if not 1 <= day <= days:
        raise ValueError(f"render_date: {en_month} has no day {day}")
    return f"on the {english_ordinal(day)} of {en_month}", f"am {german_ordinal(day)} {de_month}"


def render_clock_time(hour: int, minute: int) -> tuple[str, str]:
    """('at half past seven', 'um halb acht') for 7:30; minutes are those in CLOCK_MINUTES."""
    if not 1 <= hour <= 12 or minute not in CLOCK_MINUTES:
        raise ValueError(f"render_clock_time: {hour}:{minute:02d} is not a supported clock time")
    next_hour = hour % 12 + 1
    en_hour, en_next = english_number(hour), english_number(next_hour)
    de_hour, de_next = german_number(hour), german_number(next_hour)
    if minute == 0:
        # "ein Uhr", but "Viertel nach eins": before "Uhr" the number is an article-like "ein".
        return f"at {en_hour} o'clock", f"um {'ein' if hour == 1 else de_hour} Uhr"
    if minute == 15:
        return f"at a quarter past {en_hour}", f"um Viertel nach {de_hour}"
    if minute == 30:
        # German counts the half hour towards the next hour: 7:30 is "halb acht".
        return f"at half past {en_hour}", f"um halb {de_next}"
    if minute == 45:
        return f"at a quarter to {en_next}", f"um Viertel vor {de_next}"
    if minute < 30:
        return (
            f"at {english_number(minute)} past {en_hour}",
            f"um {german_number(minute)} nach {de_hour}",
        )
    to = 60 - minute
    return f"at {english_number(to)} to {en_next}", f"um {german_number(to)} vor {de_next}"


_WEEKDAY_TIMES = tuple((f"on {en}", f"am {de}") for en, de in _WEEKDAYS)
_DATE_TIMES = tuple(
    render_date(day, month) for month in range(1, 13) for day in range(1, _MONTHS[month - 1][2] + 1)
)
_CLOCK_TIMES = tuple(render_clock_time(h, m) for h in range(1, 13) for m in CLOCK_MINUTES)
# Every time expression, English -> German.
_TIMES = {en: de for en, de, _ in _SIMPLE_TIMES}
_TIMES |= dict(_WEEKDAY_TIMES + _DATE_TIMES + _CLOCK_TIMES)
