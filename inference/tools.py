"""Tool calling: the syntaxes models call tools in and the grammars that hold a model to them. The worker uses it to
prompt and constrain the model; inference/tool_calls.py reads the calls back out of the answer as it streams.

Formats (picked from the chat template by `tool_format_for`, overridable per model in admin):
- generic: for templates that know no tools (like llama-server's generic format). The tools are described in the
  system prompt and the whole answer is JSON, held by a grammar: `{"tool_calls": [{"name", "arguments"}]}`, or
  `{"response": "..."}` when tool_choice is "auto".
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes 2 Pro, Qwen 2.5 / 3, SmolLM3, ...).
- llama3: a bare `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>` (Llama 3.1 - 3.3).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral Nemo / Small); newer Mistral models write
  `[TOOL_CALLS]name[ARGS]{...}`, which the parser reads too.

With a native format the tools go to the template's own `tools` variable. For tool_choice "auto" the grammar is
lazy: the answer is free text, streamed as it comes, until the model starts a call (a trigger such as
`<tool_call>`), and from there the grammar holds the call to the tools' schemas. "required" and a named function
hold the answer from its first token."""

import json
import math
import re

from core.generation import GenerationRequest

from .schema_bounds import grammar_bounds_check, schema_bounds_check

TOOL_FORMATS = ("generic", "hermes", "llama3", "mistral")

# What starts a call in each native format: the view holds text back from here on, the grammar wakes on it.
_TRIGGER = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
_LLAMA3_TRIGGER = r'^\s*(\{\s*"name")[\s\S]*$'  # a call is the whole answer: an object that starts with "name"
_PYTHON_TAG = "<|python_tag|>"


def tool_format_for(template: str | None) -> str:
    """The tool-call syntax a chat template was written for ("generic" when it knows none)."""
    if not template:
        return "generic"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if _PYTHON_TAG in template or ("<|start_header_id|>" in template and "tools" in template):
        return "llama3"
    return "generic"


def offered_tools(body: GenerationRequest) -> list[dict]:
    """The tools as the template's `tools` variable gets them (OpenAI's shape, which templates are written for;
    only the named one for a named tool_choice)."""
    return [{"type": "function", "function": t.model_dump(exclude_none=True)} for t in body.offered_tools()]


def tool_instruction(body: GenerationRequest) -> str:
    """For the generic format: a system-prompt paragraph describing the tools and the answer format."""
    tools = [
        {"name": t.name, "description": t.description or "", "parameters": t.parameters or {}}
        for t in body.offered_tools()
    ]
    lines = [
        "You can call these tools:",
        json.dumps(tools, ensure_ascii=False),
        'To call tools, answer with JSON: {"tool_calls": [{"name": "<tool name>", "arguments": {<its parameters>}}]}',
    ]
    if body.tool_call_optional():
        lines.append('To answer without a tool, answer with JSON: {"response": "<your answer>"}')
    return "\n".join(lines)


def tool_grammar(body: GenerationRequest, tool_format: str) -> tuple[str, list[str]]:
    """The GBNF grammar that holds the model to this request's tools, and the trigger patterns that wake it
    (none: it holds from the first token)."""
    args_key = "parameters" if tool_format == "llama3" else "arguments"
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, args_key: t.parameters or {"type": "object"}},
            "required": ["name", args_key],
        }
        for t in body.offered_tools()
    ]
    call = {"anyOf": calls} if len(calls) > 1 else calls[0]
    many = body.parallel_tool_calls
    if tool_format == "generic":
        tool_calls = {"type": "array", "items": call, "minItems": 1} | ({} if many else {"maxItems": 1})
        answer = {"type": "object", "properties": {"tool_calls": tool_calls}, "required": ["tool_calls"]}
        if body.tool_call_optional():
            words = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
            answer = {"anyOf": [answer, words]}
        return json_schema_grammar(answer, bounded=True), []
    if tool_format == "hermes":
        one = r'"<tool_call>" "\n"? call "\n"? "</tool_call>"'
        root = f'{one} ("\\n"? {one})*' if many else one
    elif tool_format == "mistral":
        root = '"[TOOL_CALLS]" "[" call ("," " "? call)* "]"' if many else '"[TOOL_CALLS]" "[" call "]"'
    else:  # llama3: one call per turn, as its template renders them
        root = "call"
    triggers = [_LLAMA3_TRIGGER] if tool_format == "llama3" else [re.escape(_TRIGGER[tool_format])]
    return json_schema_grammar(
        call, rule="call", root=root, bounded=True
    ), triggers if body.tool_call_optional() else []


# What makes a subschema say something about its value; one with none of these allows any value.
CONSTRAINING = {"type", "$ref", "anyOf", "oneOf", "allOf", "const", "enum", "properties", "additionalProperties",
                "items", "prefixItems", "pattern", "format", "minLength", "maxLength", "minItems", "maxItems",
                "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "required"}  # fmt: skip
ANY_TYPE = ["string", "number", "integer", "boolean", "object", "array", "null"]


def json_schema_grammar(schema: dict, *, rule: str = "root", root: str | None = None, bounded: bool = False) -> str:
    """GBNF for JSON following `schema` (llama-cpp-python's converter) as rule `rule`, plus `root ::= root`
    when the JSON is part of a larger answer. Raises ValueError for schemas the converter cannot handle, and
    SchemaTooComplex (a ValueError) for a schema or grammar over the bounds of schema_bounds. `bounded`: the
    schema wraps the tools' schemas, which the request's validation bounded all together already."""
    from llama_cpp import llama_grammar  # here: the view imports this module without llama_cpp
    from llama_cpp.llama_grammar import SchemaConverter

    # The stock converter writes x{0,n} as n nested optional groups, "(x (x (x ...)?)?)?": llama.cpp's parser
    # recurses once per group, so maxLength 20000 overflowed the worker's stack (SIGSEGV) and anything from about
    # 2000 on was refused. Ours writes flat repetitions (see _repetition); the converter looks the function up as
    # a module global, so it is replaced there (the same function for every caller; assigning it is idempotent).
    llama_grammar._build_repetition = _repetition
    if not bounded:
        schema_bounds_check(schema)

    class Converter(SchemaConverter):
        def visit(self, schema, name):
            # A subschema of only annotations ({"description": ...}, or {}) allows any value; the stock converter
            # refuses the first ("Unrecognized schema") and reads the second as "any object".
            if isinstance(schema, dict) and not CONSTRAINING & schema.keys():
                schema = {**schema, "type": ANY_TYPE}
            return super().visit(schema, name)

        def _generate_constant_rule(self, value):
            # The stock converter writes const/enum values with json.dumps' \uXXXX escapes, which GBNF reads as
            # code points: a character beyond the BMP (an emoji) became two lone surrogates, invalid UTF-8, and
            # its backslashes went unescaped. Here the literal is exactly the JSON text the model must write.
            text = json.dumps(value, ensure_ascii=False)
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        converter.visit(converter.resolve_refs(schema, ""), rule if rule != "root" else "")
    except Exception as exc:  # the converter's own errors are ValueError, AssertionError, KeyError, ...
        raise ValueError(str(exc) or type(exc).__name__) from None
    grammar = converter.format_grammar()
    grammar = grammar if root is None else f"root ::= {root}\n{grammar}"
    grammar_bounds_check(grammar)
    return grammar


# Repetitions up to this many optional items are llama.cpp's own x{0,n} (it writes n small rules); longer ones are
# split into blocks of about sqrt(n), so no repetition costs more than a few hundred rules. llama.cpp refuses a
# count over 2000 (and silently drops a maximum over 2000), which the blocks also keep under.
_NATIVE_REPETITION = 64


def _repetition(item_rule: str, min_items: int, max_items: int | None, separator_rule: str | None = None,
                item_rule_is_literal: bool = False) -> str:  # fmt: skip
    """GBNF for `item_rule` repeated min_items..max_items times (None: no maximum), with `separator_rule` between
    items: exact for any count, and never nested deeper than two groups. A stand-in for the converter's
    `_build_repetition`, with its signature (its item is one symbol: a rule name, "literal" or (group))."""
    if max_items == 0:
        return ""
    if separator_rule:  # a, b, c: the first item, then (separator item) one fewer times
        rest = _repetition(f"({separator_rule} {item_rule})", max(min_items - 1, 0),
                           None if max_items is None else max_items - 1)  # fmt: skip
        both = f"{item_rule} {rest}".strip()
        return f"({both})?" if min_items == 0 else f"({both})"
    parts = []
    if min_items > 0:
        parts.append(_exactly(item_rule, min_items))
    if max_items is None:
        parts.append(f"{item_rule}*")
    elif max_items > min_items:
        parts.append(_up_to(item_rule, max_items - min_items))
    return f"({' '.join(parts)})" if len(parts) > 1 else "".join(parts)


def _exactly(item: str, n: int) -> str:
    if n == 1:
        return item
    if n <= _NATIVE_REPETITION:
        return f"{item}{{{n}}}"
    block, (blocks, rest) = math.isqrt(n), divmod(n, math.isqrt(n))
    return f"({item}{{{block}}}){{{blocks}}}" + (f" {item}{{{rest}}}" if rest else "")


def _up_to(item: str, n: int) -> str:
    if n == 1:
        return f"{item}?"
    if n <= _NATIVE_REPETITION:
        return f"{item}{{0,{n}}}"
    # n = q * b + r items at most: fewer than q whole blocks and then fewer than b items, or q whole blocks and
    # then at most r items. Exact, and a sampler follows at most four ways through it at any point.
    block, (blocks, rest) = math.isqrt(n), divmod(n, math.isqrt(n))
    whole = f"({item}{{{block}}})"
    fewer = f"{whole}{{0,{blocks - 1}}} {item}{{0,{block - 1}}}"
    return f"({fewer} | {whole}{{{blocks}}}" + (f" {item}{{0,{rest}}})" if rest else ")")
