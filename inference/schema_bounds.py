"""Bounds on an untrusted JSON Schema (`response_format`, a tool's `parameters`) and on the GBNF grammar made from
it, checked before either reaches llama-cpp-python's converter or llama.cpp's grammar parser.

Both are recursive C++/Python code that trusts its input: a grammar nested a few thousand groups deep overflows the
worker thread's stack (SIGSEGV: the worker and every request on it die), a wide alternation makes each sampled token
cost seconds, and a huge repetition count costs hundreds of MB. The limits below were measured against the pinned
llama.cpp (docs/ARCHITECTURE.md, "Untrusted schemas"); each keeps a wide margin and still admits every realistic
schema (OpenAI's structured outputs allow less: 5000 properties, 10 levels, 1000 enum values)."""

import json
import re

MAX_SCHEMA_CHARS = 100_000  # the schema's JSON text
MAX_DEPTH = 64  # JSON nesting of the schema document (about 30 levels of nested objects)
MAX_COUNT = 100_000  # minLength, maxLength, minItems, maxItems, minProperties, maxProperties, pattern {n,m}
# The converter's time grows with the square of an object's optional properties (128 of them: ~60 ms): the sum of
# those squares over all objects is bounded, which lets one object have 128 optional properties, or 16 have 32.
MAX_OPTIONAL_SQUARES = 128 * 128
MAX_ALTERNATIVES = 1_000  # enum members, and anyOf / oneOf / allOf / prefixItems / type branches, in all
MAX_NODES = 1_000  # subschemas in all (the converter takes about 0.1 to 0.2 ms for each)
MAX_PATTERN_CHARS = 1_000
MAX_PATTERN_GROUPS = 32  # nesting of ( ) in a pattern
# A repeated group that can match nothing, `(a?){0,1000}`, makes llama.cpp's sampler follow every way of counting
# the repetitions at each token: 1.1 s per token at 1000, 43 s for `((a?){0,64}){0,64}`, over 10 minutes at
# 100000. Such repetitions (nested ones multiplied) are bounded; `a{0,100000}` or `(ab|c){0,100000}` are not.
MAX_EMPTY_GROUP_REPEAT = 64

MAX_GRAMMAR_CHARS = 1_000_000
MAX_GRAMMAR_RULES = 20_000  # rules as written
MAX_GRAMMAR_EXPANSION = 200_000  # rules llama.cpp makes of x{m,n} repetitions, in all (each is a few dozen bytes)
MAX_GRAMMAR_NESTING = 64  # ( ) groups inside each other; llama.cpp's parser recurses once per group

COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
BRANCH_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaTooComplex(ValueError):
    """A schema or grammar over one of the bounds; the message names the keyword and the bound."""


def tools_bounds_check(schemas) -> None:
    """Raise ValueError when the tools' schemas of one request are over the bounds together: one grammar holds every
    tool, so the bounds on counts hold for all of them (each is also checked alone, where it is parsed)."""
    totals: dict = {}
    try:
        for schema in schemas:
            schema_bounds_check(schema, totals)
    except ValueError as exc:
        raise ValueError(f"all tools together: {exc}") from None


def arguments_schema_check(schema: dict) -> None:
    """Raise ValueError when a tool's schema cannot describe its arguments: every protocol sends them as a JSON
    object (OpenAI and Anthropic refuse another root type too; here the grammar made calls whose arguments were a
    string, or no JSON at all)."""
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise ValueError(f"a tool's schema must be of type object (its arguments are a JSON object), not {kind!r}")


def schema_bounds_check(schema, totals: dict | None = None) -> None:
    """Raise SchemaTooComplex when `schema` is over any of the bounds above. Pass the same `totals` ({}) for the
    schemas of one request (its tools), so the bounds on counts hold for all of them together."""
    if _json_over(schema, MAX_SCHEMA_CHARS):
        raise SchemaTooComplex(f"the schema is larger than {MAX_SCHEMA_CHARS} characters of JSON")
    _walk(schema, 0, totals if totals is not None else {})


def grammar_bounds_check(grammar: str) -> None:
    """Raise SchemaTooComplex when the GBNF `grammar` is larger, wider or deeper than llama.cpp takes safely."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise SchemaTooComplex(f"its grammar would be larger than {MAX_GRAMMAR_CHARS} characters")
    rules = grammar.count("::=")
    if rules > MAX_GRAMMAR_RULES:
        raise SchemaTooComplex(f"its grammar would have more than {MAX_GRAMMAR_RULES} rules")
    expansion, depth, deepest = 0, 0, 0
    for token in _gbnf_tokens(grammar):
        if token == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif token == ")":
            depth -= 1
        else:  # a {m} / {m,} / {m,n} repetition: llama.cpp writes out about max(m, n) rules or symbols for it
            low, comma, high = token[1:-1].partition(",")
            expansion += max(int(low or 0), int(high or 0) if comma else 0)
    if deepest > MAX_GRAMMAR_NESTING:
        raise SchemaTooComplex(f"its grammar would nest groups more than {MAX_GRAMMAR_NESTING} deep")
    if expansion > MAX_GRAMMAR_EXPANSION:
        raise SchemaTooComplex(f"its grammar's repetitions would expand to more than {MAX_GRAMMAR_EXPANSION} rules")


def _json_over(value, limit: int) -> bool:
    try:
        return len(json.dumps(value, ensure_ascii=False)) > limit
    except (ValueError, TypeError, RecursionError):
        return True


def _walk(node, depth: int, totals: dict) -> None:
    if depth > MAX_DEPTH:
        raise SchemaTooComplex(f"the schema is nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, list):
        for item in node:
            _walk(item, depth + 1, totals)
        return
    if not isinstance(node, dict):
        return
    totals["nodes"] = totals.get("nodes", 0) + 1
    if totals["nodes"] > MAX_NODES:
        raise SchemaTooComplex(f"the schema has more than {MAX_NODES} subschemas")
    for keyword in COUNT_KEYWORDS:
        _count(keyword, node.get(keyword))
    properties = node.get("properties")
    if isinstance(properties, dict):
        required = node.get("required") if isinstance(node.get("required"), list) else []
        optional = len(properties.keys() - {name for name in required if isinstance(name, str)})
        totals["optional"] = totals.get("optional", 0) + optional * optional
        if totals["optional"] > MAX_OPTIONAL_SQUARES:
            raise SchemaTooComplex(
                f"properties has too many optional members (the squares of each object's count of optional "
                f"properties add up to more than {MAX_OPTIONAL_SQUARES}; list them in required)"
            )
    alternatives = [node.get(k) for k in (*BRANCH_KEYWORDS, "enum", "type")]
    totals["alternatives"] = totals.get("alternatives", 0) + sum(len(v) for v in alternatives if isinstance(v, list))
    if totals["alternatives"] > MAX_ALTERNATIVES:
        raise SchemaTooComplex(
            f"the schema has more than {MAX_ALTERNATIVES} enum members and anyOf/oneOf/allOf/prefixItems branches"
        )
    if isinstance(node.get("pattern"), str):
        _pattern(node["pattern"])
    for key, value in node.items():
        if key in ("enum", "const", "default", "examples"):  # values, not subschemas
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):  # names -> subschemas
            for sub in value.values():
                _walk(sub, depth + 2, totals)
        else:
            _walk(value, depth + 1, totals)


def _count(keyword: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SchemaTooComplex(f"{keyword} must be a non-negative integer")
    if value > MAX_COUNT:
        raise SchemaTooComplex(f"{keyword} {value} is over the limit of {MAX_COUNT}")


def _pattern(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaTooComplex(f"pattern is longer than {MAX_PATTERN_CHARS} characters")
    depth, escaped, in_class = 0, False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
            if depth > MAX_PATTERN_GROUPS:
                raise SchemaTooComplex(f"pattern nests groups more than {MAX_PATTERN_GROUPS} deep")
        elif char == ")":
            depth -= 1
    for low, high in _QUANTIFIER.findall(pattern):
        for number in (low, high):
            if number and (len(number) > 6 or int(number) > MAX_COUNT):
                raise SchemaTooComplex(f"pattern repeats {{{low},{high}}} times, over the limit of {MAX_COUNT}")
    _Regex(pattern).check()


class _Regex:
    """Just enough of a regex parser to find repeated groups that can match the empty string."""

    def __init__(self, pattern: str):
        self.text, self.at = pattern, 0

    def check(self) -> None:
        try:
            self._alternatives(1)
            if self.at < len(self.text):
                raise ValueError("unbalanced )")
        except SchemaTooComplex:
            raise
        except (IndexError, ValueError):
            raise SchemaTooComplex("pattern could not be read (unbalanced brackets or braces?)") from None

    def _peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def _alternatives(self, repeat: int) -> bool:
        """Parse up to a ')' or the end; whether it can match the empty string. `repeat`: how many times the
        enclosing empty-matching groups may repeat it, multiplied."""
        empty = self._sequence(repeat)
        while self._peek() == "|":
            self.at += 1
            empty = self._sequence(repeat) or empty
        return empty

    def _sequence(self, repeat: int) -> bool:
        empty = True
        while self._peek() not in ("", "|", ")"):
            empty = self._item(repeat) and empty
        return empty

    def _item(self, repeat: int) -> bool:
        char, start = self._peek(), self.at
        self.at += 1
        group = char == "("
        if group:
            inner_start = self.at
            inner_empty = self._alternatives(repeat)
            if self._peek() != ")":
                raise ValueError("unbalanced (")
            self.at += 1
        elif char == "[":
            while self.text[self.at] != "]" or self.at == start + 1:
                self.at += 2 if self.text[self.at] == "\\" else 1
            self.at += 1
            inner_empty = False
        else:
            self.at += 1 if char == "\\" else 0
            inner_empty = char in "^$"
        low, high = self._quantifier()
        if group and inner_empty and high != 1:
            times = repeat * (high if high is not None else MAX_COUNT)
            if times > MAX_EMPTY_GROUP_REPEAT:
                raise SchemaTooComplex(
                    f"pattern repeats a group that can match nothing ({self.text[start : self.at][:40]}) more than "
                    f"{MAX_EMPTY_GROUP_REPEAT} times (nested repetitions multiplied)"
                )
            if times > 1:  # the group's own empty-matching repetitions nest inside this one
                self.at = inner_start
                self._alternatives(times)
                self.at += 1
                self._quantifier()
        return inner_empty or low == 0

    def _quantifier(self) -> tuple[int, int | None]:
        """The repetition after an item, (1, 1) when there is none."""
        char = self._peek()
        if char in ("*", "+", "?"):
            self.at += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{" and (match := _QUANTIFIER.match(self.text, self.at)):
            self.at = match.end()
            low = int(match.group(1) or 0)
            high = low if match.group(0).find(",") < 0 else (int(match.group(2)) if match.group(2) else None)
        else:
            return 1, 1
        if self._peek() == "?":  # lazy: the same language
            self.at += 1
        return low, high


def _gbnf_tokens(grammar: str):
    """The ( ) groups and {m,n} repetitions of a GBNF text, outside its "literals" and [character classes]."""
    i, n = 0, len(grammar)
    while i < n:
        char = grammar[i]
        if char in '"[':
            close = '"' if char == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif char in "()":
            yield char
        elif char == "{":
            end = grammar.find("}", i)
            if end < 0:
                return
            yield grammar[i : end + 1]
            i = end
        elif char == "#":  # a comment, to the end of the line
            end = grammar.find("\n", i)
            i = n if end < 0 else end
        i += 1
