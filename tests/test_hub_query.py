"""IoT Hub's query language as the built-in hubs read it: whatever the text, a query or a 400
that says why (h11's invariant for parsers), and whatever the twin, a verdict."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from provisiond.errors import InvalidQueryError
from provisiond.hub.query import parse

WORDS = [
    "SELECT",
    "*",
    "FROM",
    "devices",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "(",
    ")",
    "[",
    "]",
    ",",
    "=",
    "<>",
    "<",
    ">=",
    "IN",
    "NIN",
    "tags.a",
    "properties.reported.b",
    "'x'",
    '"y"',
    "1",
    "-2.5",
    "true",
    "null",
    "IS_DEFINED",
    "STARTS_WITH",
    "COUNT",
    "AS",
    "TOP",
    "GROUP",
    "BY",
    "'",
    "$version",
    "deviceId",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=14) | st.text(max_size=60))
def test_any_text_is_a_query_or_an_invalid_query_error(tokens: list[str] | str) -> None:
    text = tokens if isinstance(tokens, str) else " ".join(tokens)
    try:
        query = parse(text)
    except InvalidQueryError as exc:
        assert exc.message
        return
    assert query.item_type in ("twin", "raw")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab", max_size=2),
    lambda children: (
        st.lists(children, max_size=2) | st.dictionaries(st.sampled_from(["a", "b"]), children, max_size=2)
    ),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "tags", "deviceId"]), json_values, max_size=4))
def test_every_condition_gives_a_verdict_on_any_twin(twin: dict[str, Any]) -> None:
    for where in (
        "a = 1",
        "a != 'a'",
        "a < 2 OR b >= 'a'",
        "NOT IS_DEFINED(a.b)",
        "a IN [1, 'a', true, null]",
        "STARTS_WITH(b, 'a') AND IS_STRING(b)",
        "IS_NULL(a) OR IS_ARRAY(b) OR IS_OBJECT(tags) OR IS_PRIMITIVE(a)",
        "a.b.c = b.a",
        "deviceId NIN ['x']",
    ):
        query = parse(f"SELECT * FROM devices WHERE {where}")
        assert query.matches(twin) in (True, False)
        assert isinstance(query.project(twin), dict)


def test_nesting_is_bounded() -> None:
    for text in ("NOT " * 2000 + "a = 1", "(" * 2000 + "a = 1" + ")" * 2000):
        try:
            parse(f"SELECT * FROM devices WHERE {text}")
        except InvalidQueryError as exc:
            assert "deeper than" in exc.message
        else:
            raise AssertionError("accepted")
    assert parse("SELECT * FROM devices WHERE NOT (NOT (a = 1))").matches({"a": 1})
    # Long chains are flat, not nested: no recursion however many conditions.
    chain = " OR ".join(f"a={n % 10}" for n in range(1100))
    assert parse(f"SELECT * FROM devices WHERE {chain}").matches({"a": 9})
    chain = " AND ".join("a=1" for _ in range(1020))
    assert parse(f"SELECT * FROM devices WHERE {chain}").matches({"a": 1})
