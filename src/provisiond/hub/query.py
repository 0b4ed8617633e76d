"""IoT Hub's query language for device twins, as far as the built-in hubs read it. Pure.

Theory of operation
-------------------
``POST /devices/query`` takes ``{"query": "SELECT ... FROM devices [WHERE ...]"}`` and answers
with twins (IoT Hub's "IoT Hub query language for device and module twins", the page
``iot-hub-devguide-query-language``). :func:`parse` reads the text into a :class:`Query`;
:meth:`Query.matches` evaluates its WHERE clause on one twin as the service API shows it
(:func:`provisiond.hub.models.twin_view`), and :meth:`Query.project` makes the item the query
returns. What is read:

* ``SELECT *``, ``SELECT COUNT() [AS name]`` and ``SELECT path [AS name], ...`` (a projection of
  twin members: ``deviceId``, ``tags.location.region``, ``properties.reported.battery``);
  ``SELECT TOP n ...`` caps the number of items;
* ``FROM devices`` (IoT Hub's modules and jobs collections are not served);
* ``WHERE`` with conditions joined by ``AND``, ``OR``, ``NOT`` and parentheses: comparisons
  ``=``, ``!=``, ``<>``, ``<``, ``<=``, ``>``, ``>=`` of a path with a literal (a string in single
  or double quotes, a number, ``true``, ``false``, ``null``) or another path; ``path IN [...]``
  and ``path NIN [...]``; and the functions ``IS_DEFINED``, ``IS_NULL``, ``IS_BOOL``,
  ``IS_NUMBER``, ``IS_STRING``, ``IS_OBJECT``, ``IS_ARRAY``, ``IS_PRIMITIVE``,
  ``STARTS_WITH`` and ``ENDS_WITH``.

Comparisons follow IoT Hub's rules: a member that is not there makes the condition false (so
``NOT`` of it is true), and values of different types compare unequal (``'1' = 1`` is false,
``<`` between a string and a number is false). Keywords and function names are
case-insensitive; paths are matched exactly, then without regard to case.

Anything else (``GROUP BY``, another collection, a function not listed) is an
:class:`~provisiond.errors.InvalidQueryError` that says what is not supported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidQueryError

__all__ = ["MAX_QUERY_LENGTH", "Query", "parse"]

MAX_QUERY_LENGTH = 8192
#: How deep NOT and parentheses may nest (a bound on the parser's recursion).
MAX_NESTING = 32
_MISSING = object()

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*'|"(?:[^"]|"")*")
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<op><>|!=|<=|>=|=|<|>)
      | (?P<punct>[(),\[\]*])
      | (?P<word>[A-Za-z_$][\w$\-]*(?:\.[A-Za-z_$][\w$\-]*)*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # string, number, op, punct, word, end
    text: str
    value: Any = None


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise InvalidQueryError(f"Cannot read the query at {text[pos : pos + 40].strip()!r}.")
        kind = match.lastgroup or ""
        raw = match.group(kind)
        value: Any = None
        if kind == "string":
            value = raw[1:-1].replace(raw[0] * 2, raw[0])
        elif kind == "number":
            try:
                value = float(raw) if any(c in raw for c in ".eE") else int(raw)
            except ValueError:  # more digits than Python converts (4,300)
                raise InvalidQueryError(f"The number {raw[:20]}... is too long.") from None
        tokens.append(_Token(kind, raw, value))
        pos = match.end()
    tokens.append(_Token("end", ""))
    return tokens


# --- expressions --------------------------------------------------------------------------------

Doc = Mapping[str, Any]
Predicate = Callable[[Doc], bool]


def _lookup(doc: Any, path: str) -> Any:
    """The value at ``path`` (dot-separated) in ``doc``, or ``_MISSING``; each member is found
    by exact name first, then without regard to case."""
    value = doc
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return _MISSING
        if part in value:
            value = value[part]
            continue
        key = _folded(value).get(part.lower())
        if key is None or key not in value:
            return _MISSING
        value = value[key]
    return value


#: Each recently met mapping (kept, so that its id is not reused), its size when met (a changed
#: mapping is read again) and its keys by lower case:
#: a name not found as written is then one dict lookup, not a pass over every key. Without it a
#: query of a few hundred terms over twins of thousands of keys took seconds of the server's CPU.
_FOLDED: dict[int, tuple[Mapping[Any, Any], int, dict[str, str]]] = {}
_FOLDED_MAX = 256


def _folded(mapping: Mapping[Any, Any]) -> dict[str, str]:
    """``mapping``'s string keys by their lower case (the first of each, in its order)."""
    hit = _FOLDED.get(id(mapping))
    if hit is not None and hit[0] is mapping and hit[1] == len(mapping):
        return hit[2]
    folded: dict[str, str] = {}
    for key in mapping:
        if isinstance(key, str):
            folded.setdefault(key.lower(), key)
    if len(_FOLDED) >= _FOLDED_MAX:
        _FOLDED.clear()
    _FOLDED[id(mapping)] = (mapping, len(mapping), folded)
    return folded


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    return "array"


def _compare(op: str, left: Any, right: Any) -> bool:
    if left is _MISSING or right is _MISSING:
        return False
    same = _kind(left) == _kind(right)
    if op == "=":
        return same and left == right
    if op in ("!=", "<>"):
        return not same or left != right
    if not same or _kind(left) not in ("number", "string"):
        return False
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


Operand = Callable[[Doc], Any]

_TYPE_TESTS: dict[str, Callable[[Any], bool]] = {
    "is_defined": lambda v: v is not _MISSING,
    "is_null": lambda v: v is None,
    "is_bool": lambda v: _kind(v) == "bool",
    "is_number": lambda v: v is not _MISSING and _kind(v) == "number",
    "is_string": lambda v: v is not _MISSING and _kind(v) == "string",
    "is_object": lambda v: v is not _MISSING and _kind(v) == "object",
    "is_array": lambda v: v is not _MISSING and _kind(v) == "array",
    "is_primitive": lambda v: v is not _MISSING and _kind(v) in ("null", "bool", "number", "string"),
}
_STRING_TESTS: dict[str, Callable[[str, str], bool]] = {
    "starts_with": str.startswith,
    "ends_with": str.endswith,
}
_KEYWORDS = frozenset(
    ("select", "from", "where", "and", "or", "not", "in", "nin", "as", "top", "group", "by")
)


class _Parser:
    """Recursive descent over the tokens: ``or`` < ``and`` < ``not`` < a condition."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.pos = 0
        self.depth = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.pos]

    def is_word(self, *words: str) -> bool:
        return self.token.kind == "word" and self.token.text.lower() in words

    def take(self) -> _Token:
        token = self.token
        if token.kind != "end":  # the end stays the current token, however often it is taken
            self.pos += 1
        return token

    def expect_word(self, word: str) -> None:
        if not self.is_word(word):
            raise InvalidQueryError(f"Expected {word.upper()} at {self.where()}.")
        self.take()

    def expect_punct(self, punct: str) -> None:
        if self.token.text != punct:
            raise InvalidQueryError(f"Expected {punct!r} at {self.where()}.")
        self.take()

    def where(self) -> str:
        return repr(self.token.text) if self.token.kind != "end" else "the end of the query"

    # expressions
    def expression(self) -> Predicate:
        terms = [self.conjunction()]
        while self.is_word("or"):
            self.take()
            terms.append(self.conjunction())
        return terms[0] if len(terms) == 1 else _any(terms)

    def conjunction(self) -> Predicate:
        factors = [self.negation()]
        while self.is_word("and"):
            self.take()
            factors.append(self.negation())
        return factors[0] if len(factors) == 1 else _all(factors)

    def negation(self) -> Predicate:
        if not self.is_word("not") and self.token.text != "(":
            return self.condition()
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise InvalidQueryError(f"The WHERE clause nests NOT and parentheses deeper than {MAX_NESTING}.")
        if self.take().text == "(":
            inner = self.expression()
            self.expect_punct(")")
        else:
            negated = self.negation()
            inner = lambda doc: not negated(doc)  # noqa: E731
        self.depth -= 1
        return inner

    def condition(self) -> Predicate:
        token = self.token
        if token.kind == "word" and self.tokens[self.pos + 1].text == "(":
            return self.function()
        left = self.operand()
        if self.is_word("in", "nin"):
            negate = self.take().text.lower() == "nin"
            values = self.array()
            return _membership(left, values, negate)
        if self.token.kind != "op":
            raise InvalidQueryError(f"Expected a comparison (=, !=, <, >, IN, ...) at {self.where()}.")
        op = self.take().text
        right = self.operand()
        return lambda doc: _compare(op, left(doc), right(doc))

    def function(self) -> Predicate:
        name = self.take().text.lower()
        self.expect_punct("(")
        if name in _TYPE_TESTS:
            test, arg = _TYPE_TESTS[name], self.operand()
            self.expect_punct(")")
            return lambda doc: test(arg(doc))
        if name in _STRING_TESTS:
            check, subject = _STRING_TESTS[name], self.operand()
            self.expect_punct(",")
            fix = self.operand()
            self.expect_punct(")")

            def string_test(doc: Doc) -> bool:
                value, affix = subject(doc), fix(doc)
                return isinstance(value, str) and isinstance(affix, str) and check(value, affix)

            return string_test
        known = ", ".join(n.upper() for n in (*_TYPE_TESTS, *_STRING_TESTS))
        raise InvalidQueryError(f"The function {name.upper()} is not supported; these are: {known}.")

    def literal(self) -> Any:
        token = self.token
        if token.kind in ("string", "number"):
            self.take()
            return token.value
        if self.is_word("true", "false", "null"):
            self.take()
            return {"true": True, "false": False, "null": None}[token.text.lower()]
        raise InvalidQueryError(f"Expected a value at {self.where()}.")

    def operand(self) -> Operand:
        token = self.token
        if token.kind == "word" and token.text.lower() not in (*_KEYWORDS, "true", "false", "null"):
            self.take()
            path = token.text
            return lambda doc: _lookup(doc, path)
        value = self.literal()
        return lambda doc: value

    def array(self) -> list[Any]:
        self.expect_punct("[")
        values = []
        while True:
            values.append(self.literal())
            if self.token.text == "]":
                self.take()
                return values
            self.expect_punct(",")


def _alias(parser: _Parser) -> str:
    """The name after AS."""
    token = parser.take()
    if token.kind != "word":  # a keyword may be a name here ("AS where"), as IoT Hub takes it
        raise InvalidQueryError(
            f"Expected a name after AS, not {'the end of the query' if token.kind == 'end' else repr(token.text)}."
        )
    return token.text


def _any(terms: Sequence[Predicate]) -> Predicate:
    return lambda doc: any(term(doc) for term in terms)


def _all(factors: Sequence[Predicate]) -> Predicate:
    return lambda doc: all(factor(doc) for factor in factors)


def _membership(operand: Operand, values: Sequence[Any], negate: bool) -> Predicate:
    def member(doc: Doc) -> bool:
        value = operand(doc)
        if value is _MISSING:
            return False
        found = any(_compare("=", value, candidate) for candidate in values)
        return found != negate

    return member


# --- the query ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: what to select, and the condition (``None``: every twin)."""

    text: str
    #: ``None``: ``SELECT *`` (whole twins); else the projected paths and their names.
    fields: tuple[tuple[str, str], ...] | None = None
    #: ``SELECT COUNT() AS name``: the name of the count (the query answers one item).
    count: str | None = None
    top: int | None = None
    condition: Predicate | None = field(default=None, compare=False)
    #: Equality conditions on ``deviceId``, ``status`` and ``connectionState`` that every
    #: match must meet (from the top-level ``AND`` chain), for the store's index columns.
    required: Mapping[str, str] = field(default_factory=dict)

    @property
    def item_type(self) -> str:
        """IoT Hub's ``x-ms-item-type``: ``twin`` for whole twins, ``raw`` for projections."""
        return "twin" if self.fields is None and self.count is None else "raw"

    def matches(self, twin: Doc) -> bool:
        return self.condition is None or self.condition(twin)

    def project(self, twin: Doc) -> dict[str, Any]:
        if self.fields is None:
            return dict(twin)
        item: dict[str, Any] = {}
        for path, name in self.fields:
            value = _lookup(twin, path)
            if value is not _MISSING:
                item[name] = value
        return item


_REQUIRED = {"deviceid": "deviceId", "status": "status", "connectionstate": "connectionState"}


def _required(where: str) -> dict[str, str]:
    """The equality conditions of the top-level AND chain on the indexed fields (a cheap, safe
    reading: the full condition is evaluated on every candidate anyway). Read from the tokens,
    so that "and" or "or" inside a string literal is the literal's (split as text, a tag value
    such as "q and deviceId = 'x'" became a filter, and the query missed the device)."""
    tokens = _tokens(where)[:-1]  # without the end
    if any(t.kind == "word" and t.text.lower() in ("or", "not") or t.text == "(" for t in tokens):
        return {}
    required: dict[str, str] = {}
    part: list[_Token] = []
    for token in [*tokens, _Token("word", "and")]:
        if token.kind != "word" or token.text.lower() != "and":
            part.append(token)
            continue
        if (
            len(part) == 3
            and part[0].kind == "word"
            and part[0].text.lower() in _REQUIRED
            and part[1].text == "="
            and part[2].kind == "string"
        ):
            required[_REQUIRED[part[0].text.lower()]] = part[2].value
        part = []
    return required


def parse(text: str) -> Query:
    """Read a query (see the module docstring for what is supported).

    :raises InvalidQueryError: anything else, with what is wrong or not supported.
    """
    if not text.strip():
        raise InvalidQueryError("The query is empty; send for example SELECT * FROM devices.")
    if len(text) > MAX_QUERY_LENGTH:
        raise InvalidQueryError(f"The query is longer than {MAX_QUERY_LENGTH} characters.")
    parser = _Parser(text)
    parser.expect_word("select")
    top = None
    if parser.is_word("top"):
        parser.take()
        token = parser.take()
        if token.kind != "number" or not isinstance(token.value, int) or token.value < 1:
            raise InvalidQueryError("TOP takes a positive whole number.")
        top = token.value
    fields: list[tuple[str, str]] | None = None
    count = None
    if parser.token.text == "*":
        parser.take()
    elif parser.is_word("count") and parser.tokens[parser.pos + 1].text == "(":
        parser.take()
        parser.expect_punct("(")
        parser.expect_punct(")")
        count = "$1"
        if parser.is_word("as"):
            parser.take()
            count = _alias(parser)
    else:
        fields = []
        while True:
            token = parser.take()
            if token.kind != "word" or token.text.lower() in _KEYWORDS:
                raise InvalidQueryError(
                    f"Expected *, COUNT() or member names after SELECT, not {token.text!r}."
                )
            name = token.text.rsplit(".", 1)[-1]
            if parser.is_word("as"):
                parser.take()
                name = _alias(parser)
            fields.append((token.text, name))
            if parser.token.text != ",":
                break
            parser.take()
    parser.expect_word("from")
    source = parser.take()
    if source.text.lower() != "devices":
        raise InvalidQueryError(
            f"Queries over {source.text!r} are not supported: the built-in hub answers FROM devices."
        )
    condition = None
    required: dict[str, str] = {}
    if parser.is_word("where"):
        parser.take()
        start = parser.pos
        condition = parser.expression()
        where_text = " ".join(t.text for t in parser.tokens[start : parser.pos])
        required = _required(where_text)
    if parser.is_word("group"):
        raise InvalidQueryError("GROUP BY is not supported by the built-in hub.")
    if parser.token.kind != "end":
        raise InvalidQueryError(f"Unexpected {parser.token.text!r} at the end of the query.")
    return Query(
        text=text,
        fields=tuple(fields) if fields is not None else None,
        count=count,
        top=top,
        condition=condition,
        required=required,
    )
