"""Untrusted JSON Schemas (response_format, tool parameters) are bounded before the converter and llama.cpp see
them (inference/schema_bounds.py), and the grammars made from them stay flat enough for llama.cpp's recursive parser."""

import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from api.protocol import ChatCompletionRequest
from inference import schema_bounds
from inference.schema_bounds import SchemaTooComplex, grammar_bounds_check, schema_bounds_check
from inference.tools import TOOL_FORMATS, _repetition, json_schema_grammar, tool_grammar
from models_app.bundled import default_model_path

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def response_format(schema: dict) -> dict:
    return {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def tool(schema: dict, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": schema}}


def refusal(body: dict) -> dict:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    error = caught.value.errors(include_url=False)[0]
    return {"loc": ".".join(str(part) for part in error["loc"]), "msg": error["msg"]}


OVER = schema_bounds.MAX_COUNT + 1
TOO_BIG = {
    "maxLength": {"type": "string", "maxLength": OVER},
    "minLength": {"type": "string", "minLength": OVER},
    "maxItems": {"type": "array", "items": {"type": "integer"}, "maxItems": OVER},
    "minItems": {"type": "array", "items": {"type": "integer"}, "minItems": OVER},
    "maxProperties": {"type": "object", "maxProperties": OVER},
    "minProperties": {"type": "object", "minProperties": OVER},
    "pattern {0,N}": {"type": "string", "pattern": f"^a{{0,{OVER}}}$"},
    "pattern {N}": {"type": "string", "pattern": f"^(ab){{{10**40}}}$"},
    "pattern groups": {"type": "string", "pattern": "^" + "(" * 33 + "a" + ")" * 33 + "$"},
    "pattern length": {"type": "string", "pattern": "^" + "a" * 1000 + "$"},
    "pattern empty group": {"type": "string", "pattern": "^(a?){0,1000}$"},
    "pattern nested empty groups": {"type": "string", "pattern": "^((a?){0,64}b?){0,64}$"},
    "pattern unbalanced": {"type": "string", "pattern": "^(a|b$"},
    "nesting": {"type": "array", "items": {"type": "array", "items": {}}} | {"$defs": {"d": eval("[" * 70 + "]" * 70)}},
    "subschemas": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1001)},
                   "required": [f"p{i}" for i in range(1001)]},
    "optional properties": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(129)}},
    "enum": {"enum": list(range(1001))},
    "anyOf": {"anyOf": [{"const": i} for i in range(1001)]},
    "size": {"type": "string", "description": "d" * 100_001},
    "negative maxItems": {"type": "array", "maxItems": -1},
    "fractional minLength": {"type": "string", "minLength": 1.5},
}  # fmt: skip
MESSAGE = {"pattern {0,N}": "pattern repeats", "pattern {N}": "pattern repeats", "pattern groups": "pattern nests",
           "pattern length": "pattern is longer", "pattern empty group": "can match nothing",
           "pattern nested empty groups": "nested repetitions",
           "pattern unbalanced": "could not be read", "nesting": "nested deeper", "subschemas": "subschemas",
           "optional properties": "optional", "enum": "enum members", "anyOf": "anyOf",
           "size": "larger than", "negative maxItems": "maxItems must be a non-negative integer",
           "fractional minLength": "minLength must be a non-negative integer"}  # fmt: skip


@pytest.mark.parametrize("keyword", list(TOO_BIG))
def test_each_bound_refuses_a_response_format_schema_over_it_naming_the_keyword(keyword):
    error = refusal(response_format(TOO_BIG[keyword]))
    assert error["loc"] == "response_format.json_schema.schema"
    assert MESSAGE.get(keyword, keyword) in error["msg"]


@pytest.mark.parametrize("keyword", list(TOO_BIG))
def test_each_bound_refuses_a_tool_parameters_schema_over_it_naming_the_keyword(keyword):
    error = refusal({**CHAT, "tools": [tool({"type": "object"}), tool(TOO_BIG[keyword], "g")]})
    assert error["loc"] == "tools.1.function.parameters"
    assert MESSAGE.get(keyword, keyword) in error["msg"]


def test_the_bounds_on_counts_hold_for_all_tools_together():
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(99)},
              "required": [f"p{i}" for i in range(99)]}  # fmt: skip
    body = ChatCompletionRequest.model_validate(
        {**CHAT, "tools": [tool(schema, f"f{i}") for i in range(10)]}
    ).to_generation()
    for tool_format in TOOL_FORMATS:  # what the request's validation allowed, the worker turns into a grammar
        assert tool_grammar(body, tool_format)[0]
    error = refusal({**CHAT, "tools": [tool(schema, f"f{i}") for i in range(11)]})
    assert error["loc"] == "tools"
    assert "all tools together" in error["msg"] and "subschemas" in error["msg"]


MAX = schema_bounds.MAX_COUNT
LARGEST = {
    "maxLength": {"type": "string", "maxLength": schema_bounds.MAX_COUNT},
    "minLength and maxLength": {"type": "string", "minLength": 30_000, "maxLength": schema_bounds.MAX_COUNT},
    "maxItems": {"type": "array", "items": {"type": "integer"}, "maxItems": schema_bounds.MAX_COUNT},
    "minItems": {"type": "array", "items": {"type": "string"}, "minItems": schema_bounds.MAX_COUNT},
    "pattern": {"type": "string", "pattern": f"^(ab|c){{0,{MAX}}}x{{3,{MAX}}}$"},
    "pattern groups": {"type": "string", "pattern": "^" + "(a{0,1000}" * 32 + ")" * 32 + "$"},
    "pattern empty groups": {"type": "string", "pattern": "^((a?){0,8}b?){0,8}(x(c?){0,64}){0,100000}$"},
    "enum": {"enum": [f"value-{i}" for i in range(1000)]},
    "subschemas": {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 500} for i in range(999)},
                   "required": [f"p{i}" for i in range(999)]},
    "optional properties": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(128)}},
    "nesting": (lambda nest: nest(nest, 30))(lambda f, d: {"type": "object", "properties": {"a": f(f, d - 1)}}
                                             if d else {"type": "string", "maxLength": 3000}),
}  # fmt: skip

# Compiles each grammar with llama.cpp in a thread with a 256 KiB stack (the worker's is 8 MiB): in a child
# process, since before the bounds a grammar's nesting overflowed the stack and killed the process (SIGSEGV).
COMPILE = """
import sys, threading
import llama_cpp
from llama_cpp import _internals
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = _internals.LlamaModel(path_model=sys.argv[1], params=params, verbose=False)
grammars = sys.stdin.read().split("\\n@@\\n")
ok = []
def compile_all():
    for grammar in grammars:
        ok.append(bool(llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")))
threading.stack_size(256 * 1024)
thread = threading.Thread(target=compile_all)
thread.start()
thread.join()
print(ok)
"""


def llama_cpp_compiles(grammars: list[str]) -> list[bool]:
    child = subprocess.run([sys.executable, "-c", COMPILE, str(default_model_path())], input="\n@@\n".join(grammars),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, f"llama.cpp died compiling the grammars: {child.returncode} {child.stderr[-2000:]}"
    return eval(child.stdout)


def test_the_largest_bounds_are_accepted_and_make_grammars_llama_cpp_compiles():
    grammars = []
    for schema in LARGEST.values():
        ChatCompletionRequest.model_validate(response_format(schema))
        grammars.append(json_schema_grammar(schema))
    assert llama_cpp_compiles(grammars) == [True] * len(grammars)


def test_the_issues_maxlength_100000_schema_compiles_instead_of_crashing_the_worker():
    # The 200-byte request of issue 12: the stock converter nested 100000 groups, which overflowed llama.cpp's stack.
    grammar = json_schema_grammar({"type": "string", "maxLength": 100000})
    assert len(grammar) < 1000
    assert llama_cpp_compiles([grammar]) == [True]


def gbnf_as_regex(grammar: str) -> re.Pattern:
    return re.compile(grammar.replace(" ", "").replace('"', "").replace("(", "(?:"))


def nesting(grammar: str) -> int:
    depth = deepest = 0
    for char in grammar:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


@pytest.mark.parametrize("separator", [None, '","'])
def test_a_repetition_allows_exactly_its_counts_for_any_bounds(separator):
    for low, high in [(0, 1), (1, 1), (0, 7), (2, 5), (0, 64), (0, 65), (3, 300), (0, 1000), (300, 4097), (5, None)]:
        grammar = _repetition('"a"', low, high, separator)
        pattern = gbnf_as_regex(grammar)
        top = (high or low + 50) + 30
        allowed = [n for n in range(top) if pattern.fullmatch((",".join if separator else "".join)("a" * n))]
        assert allowed == list(range(low, (high if high is not None else top - 1) + 1)), (low, high, grammar)
        assert nesting(grammar) <= 5, grammar  # never the n nested groups that overflowed llama.cpp's stack


def test_a_grammar_over_its_bounds_is_refused_before_llama_cpp():
    grammar_bounds_check('root ::= x{0,2000}\nx ::= "a"')
    with pytest.raises(SchemaTooComplex, match="nest groups"):
        grammar_bounds_check("root ::= " + "(" * 65 + '"a"' + ")" * 65)
    grammar_bounds_check('root ::= "((((((" [(] ' + "(" * 64 + '"a"' + ")" * 64)  # literals and classes don't nest
    with pytest.raises(SchemaTooComplex, match="repetitions"):
        grammar_bounds_check("root ::= " + " ".join(["x{0,2000}"] * 101) + '\nx ::= "a"')
    with pytest.raises(SchemaTooComplex, match="characters"):
        grammar_bounds_check('root ::= "' + "a" * schema_bounds.MAX_GRAMMAR_CHARS + '"')
    with pytest.raises(SchemaTooComplex, match="rules"):
        grammar_bounds_check("\n".join(f'r{i} ::= "a"' for i in range(schema_bounds.MAX_GRAMMAR_RULES + 1)))


def test_the_worker_refuses_a_schema_over_the_bounds_even_if_the_view_let_it_through():
    with pytest.raises(ValueError, match="maxItems"):
        json_schema_grammar({"type": "array", "maxItems": OVER})


def test_realistic_schemas_pass_untouched():
    tags = {"type": "array", "maxItems": 64, "items": {"type": "string", "pattern": "^[a-z]{1,32}$"}}
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4096}, "tags": tags}}
    schema_bounds_check(schema)
    json_schema_grammar(schema)


def test_a_subschema_of_only_annotations_allows_any_value_rather_than_being_refused():
    # Claude Code's tools have such properties; the stock converter refused them ("Unrecognized schema") and
    # read {} as "any object".
    grammar = json_schema_grammar({"type": "object", "properties": {"a": {"description": "anything"}, "b": {}},
                                   "required": ["a", "b"]})  # fmt: skip
    for rule in ("a", "b"):
        (line,) = [line for line in grammar.splitlines() if line.startswith(f"{rule} ::= ")]
        assert all(kind in line for kind in ("string", "number", "boolean", "array", "null")), line


def test_ollamas_chat_bounds_its_tools_together_too():
    from api.ollama.protocol import ChatRequest as OllamaChat

    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(99)},
              "required": [f"p{i}" for i in range(99)]}  # fmt: skip
    tools = [tool(schema, f"f{i}") for i in range(11)]
    OllamaChat.model_validate({"model": "m", "messages": [], "tools": tools[:10]})
    with pytest.raises(ValidationError, match="all tools together"):
        OllamaChat.model_validate({"model": "m", "messages": [], "tools": tools})
