"""An integer schema's bounds as grammar: the GBNF written for them, read as a regular expression (it uses only
literals, digit classes, counted repetitions, groups and alternatives), matches exactly the integers between them
as JSON writes them."""

import random
import re

import pytest

from inference.tools import MAX_INTEGER, integer_bounds, integer_range_gbnf, json_schema_grammar


def matcher(low, high) -> re.Pattern:
    gbnf = integer_range_gbnf(low, high)
    return re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), gbnf).replace(" ", ""))


@pytest.mark.parametrize(
    ("low", "high"),
    [(5, 7), (0, 0), (0, 9), (10, 99), (99, 101), (123, 4567), (19, 2000), (-3, -1), (-20, 35), (-1000, -999),
     (0, None), (7, None), (-15, None), (None, 5), (None, 0), (None, -3), (None, None)],
)  # fmt: skip
def test_the_grammar_allows_exactly_the_integers_between_the_bounds(low, high):
    pattern = matcher(low, high)
    start, stop = (low if low is not None else -3000) - 300, (high if high is not None else 3000) + 300
    for n in [*range(start, stop), 10**15, MAX_INTEGER, -MAX_INTEGER, MAX_INTEGER + 1]:
        allowed = (low is None or n >= low) and (high is None or n <= high) and abs(n) <= MAX_INTEGER
        assert bool(pattern.fullmatch(str(n))) == allowed, (low, high, n)
    for text in ("-0", "007", "01", "+1", "", "1.0"):
        assert not pattern.fullmatch(text), (low, high, text)


def test_random_ranges_allow_exactly_their_integers():
    rng = random.Random(7)
    for _ in range(200):
        low = rng.randint(-(10**7), 10**7)
        high = low + rng.choice([0, 9, 1000, 10**7])
        pattern = matcher(low, high)
        probes = [*range(low - 15, low + 15), *range(high - 15, high + 15)]
        probes += [rng.randint(low - 10**7, high + 10**7) for _ in range(100)]
        assert all(bool(pattern.fullmatch(str(n))) == (low <= n <= high) for n in probes), (low, high)


@pytest.mark.parametrize(
    ("schema", "bounds"),
    [({"minimum": 5, "maximum": 7}, (5, 7)), ({"minimum": 0.5, "maximum": 2.5}, (1, 2)),
     ({"exclusiveMinimum": -4, "exclusiveMaximum": 0}, (-3, -1)), ({"minimum": 1, "exclusiveMinimum": True}, (2, None)),
     ({"minimum": 3, "exclusiveMinimum": 5}, (6, None)), ({"minimum": -1e30, "maximum": 1e30}, (None, None))],
)  # fmt: skip
def test_bounds_are_read_as_json_schema_means_them(schema, bounds):
    assert integer_bounds({"type": "integer", **schema}) == bounds


@pytest.mark.parametrize(
    "schema", [{"minimum": 5, "maximum": 3}, {"exclusiveMinimum": 1, "exclusiveMaximum": 2}, {"minimum": 1e17},
               {"minimum": "5"}, {"maximum": float("inf")}],
)  # fmt: skip
def test_bounds_no_integer_meets_are_refused(schema):
    with pytest.raises(ValueError, match=r"integer|finite number"):
        integer_bounds({"type": "integer", **schema})


def test_an_integer_property_with_bounds_becomes_its_own_rule():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 7}}, "required": ["n"]}
    assert "[5-7]" in json_schema_grammar(schema)
