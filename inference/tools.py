"""Tool calling: the syntaxes models call tools in and the grammars that hold a model to them. The worker uses it to
prompt and constrain the model; inference/tool_calls.py reads the calls back out of the answer as it streams.

Formats (picked from the chat template by `tool_format_for`, as llama.cpp's common/chat.cpp picks them; overridable
per model in admin):
- generic: for templates that know no tools (like llama-server's generic format). The tools are described in the
  system prompt and the whole answer is JSON, held by a grammar: `{"tool_calls": [{"name", "arguments"}]}`, or
  `{"response": "..."}` when tool_choice is "auto".
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes 2 Pro, Qwen 2.5 / 3, SmolLM3, ...).
- llama3: a bare `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>` (Llama 3.1 - 3.3).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral Nemo / Small); newer Mistral models (Devstral,
  Magistral) write `[TOOL_CALLS]name[ARGS]{...}`, which the parser reads too.
- qwen3_coder: `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>`
  (Qwen3-Coder, Qwen3.5, Nemotron 3 Nano).
- glm: `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>`, newlines between the tags
  or not (GLM-4.5 - 4.7).
- minimax_m2: `<minimax:tool_call><invoke name="NAME"><parameter name="KEY">VALUE</parameter></invoke>...`.
- deepseek_v3_2, deepseek_v4: DeepSeek's DSML, `<｜DSML｜function_calls>` (V4: `tool_calls`) around
  `<｜DSML｜invoke name="NAME"><｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>...`.
- deepseek_v3_1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...`.
- kimi_k2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{...}
  <|tool_call_end|>...<|tool_calls_section_end|>`.
- harmony (gpt-oss): messages on channels; a call is a `commentary` message to `functions.NAME`,
  `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}`, ended by `<|call|>`. The `analysis`
  channel is reasoning (inference/reasoning.py splits the channels).

In the XML-style formats a value is written as text: a string as it is, anything else (a number, an object) as
JSON; the tool's schema says which, as llama.cpp types them. With a native format the tools go to the template's own
`tools` variable. For tool_choice "auto" the grammar is lazy: the answer is free text, streamed as it comes, until
the model starts a call (a trigger such as `<tool_call>`), and from there the grammar holds the call to the tools'
schemas. "required" and a named function hold the answer from its first token (after a thought, for a model that
thinks first)."""

import json
import math
import re
from dataclasses import dataclass

from core.generation import GenerationRequest

from .reasoning import THOUGHT_ENDS
from .schema_bounds import MAX_NODES, SchemaTooComplex, grammar_bounds_check, schema_bounds_check

TOOL_FORMATS = ("generic", "hermes", "llama3", "mistral", "qwen3_coder", "glm", "minimax_m2", "deepseek_v3_1",
                "deepseek_v3_2", "deepseek_v4", "kimi_k2", "harmony")  # fmt: skip

_PYTHON_TAG = "<|python_tag|>"
_LLAMA3_TRIGGER = r'^\s*(\{\s*"name")[\s\S]*$'  # a call is the whole answer: an object that starts with "name"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_DSML = "｜DSML｜"
_SEP = '"\\n"{0,2}'  # what may stand between two tags in a grammar: the templates write a newline or two, or none


@dataclass(frozen=True)
class XmlSyntax:
    """A format whose calls are tags, one tag for each argument with its value as text. `call_open` "" (GLM): the
    name follows the block's opening tag and the block's end ends the call."""

    block_open: str
    block_close: str
    call_open: str
    call_name_end: str
    call_close: str
    arg_open: str
    arg_name_end: str
    arg_close: str
    value_open: str = ""  # GLM's <arg_value>, after the name's </arg_key>
    newline: bool = False  # Qwen3-Coder: a newline after the opening tag, not the value's (one before the close is
    # the closing tag's: its arg_close is "\n</parameter>", as llama.cpp reads it)
    typed: bool = False  # DSML: the argument's tag says string="true" or "false"


@dataclass(frozen=True)
class NamedSyntax:
    """A format whose call is a name between markers, then the arguments as JSON."""

    call_open: str
    name_end: str
    call_close: str = ""  # optional when reading
    section: tuple[str, ...] = ()  # markers around all the calls: they carry nothing and are not text


def _dsml(block: str) -> XmlSyntax:
    return XmlSyntax(f"<{_DSML}{block}>", f"</{_DSML}{block}>", f'<{_DSML}invoke name="', '">', f"</{_DSML}invoke>",
                     f'<{_DSML}parameter name="', '">', f"</{_DSML}parameter>", typed=True)  # fmt: skip


# fmt: off
XML = {
    "qwen3_coder": XmlSyntax("<tool_call>", "</tool_call>", "<function=", ">", "</function>", "<parameter=", ">",
                             "\n</parameter>", newline=True),
    "glm": XmlSyntax("<tool_call>", "</tool_call>", "", "\n", "", "<arg_key>", "</arg_key>", "</arg_value>",
                     value_open="<arg_value>"),
    "minimax_m2": XmlSyntax("<minimax:tool_call>", "</minimax:tool_call>", '<invoke name="', '">', "</invoke>",
                            '<parameter name="', '">', "</parameter>"),
    "deepseek_v3_2": _dsml("function_calls"),
    "deepseek_v4": _dsml("tool_calls"),
}
NAMED = {
    "deepseek_v3_1": NamedSyntax("<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
                                 ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")),
    "kimi_k2": NamedSyntax("<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
                           ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")),
    # As inference/reasoning.py passes a Harmony message to a function on (its header reduced to the recipient).
    "harmony": NamedSyntax("to=functions.", "<|message|>"),
}
JSON_TRIGGER = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}

# Special tokens a format is written in. The worker turns tokens into text without special tokens (an <|im_end|>
# is no text), so these are rendered as text for the parser to see (llama-server's "preserved tokens").
MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>", THINK_OPEN, THINK_CLOSE),
    "llama3": (_PYTHON_TAG,),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"),
    "qwen3_coder": ("<tool_call>", "</tool_call>", THINK_OPEN, THINK_CLOSE),
    "glm": ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", THINK_OPEN,
            THINK_CLOSE),
    "minimax_m2": ("<minimax:tool_call>", "</minimax:tool_call>", THINK_OPEN, THINK_CLOSE),
    "deepseek_v3_1": ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
                      "<｜tool▁calls▁end｜>", THINK_OPEN, THINK_CLOSE),
    "deepseek_v3_2": (_DSML, THINK_OPEN, THINK_CLOSE),
    "deepseek_v4": (_DSML, THINK_OPEN, THINK_CLOSE),
    "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>", THINK_OPEN, THINK_CLOSE),
    "harmony": ("<|channel|>", "<|constrain|>", "<|message|>", "<|start|>", "<|end|>"),
}
# fmt: on


def template_thinks(template: str | None) -> bool:
    """Whether a chat template lets its model think: a <think> block, or Harmony's analysis channel."""
    return bool(template) and (THINK_OPEN in template or tool_format_for(template) == "harmony")


def tool_format_for(template: str | None) -> str:
    """The tool-call syntax a chat template was written for ("generic" when it knows none): the checks and their
    order are common/chat.cpp's."""
    if not template:
        return "generic"
    if "<|channel|>" in template:
        return "harmony"
    if "<|tool_calls_section_begin|>" in template:
        return "kimi_k2"
    if "dsml_token" in template and "DSML" in template:
        return "deepseek_v3_2" if "function_calls" in template else "deepseek_v4"
    if "<minimax:tool_call>" in template:
        return "minimax_m2"
    if "<｜tool▁calls▁begin｜>" in template and "```json" not in template:  # R1's older syntax fences the JSON
        return "deepseek_v3_1"
    if "<tool_call>" in template and "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template and "<arg_key>" in template:
        return "glm"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if _PYTHON_TAG in template or ("<|start_header_id|>" in template and "tools" in template):
        return "llama3"
    return "generic"


def offered_tools(body: GenerationRequest) -> list[dict]:
    """The tools as the template's `tools` variable gets them (OpenAI's shape, which templates are written for;
    only the named one for a named tool_choice). Every tool has a description and parameters, as llama-server
    gives them: templates concatenate both without checking (gpt-oss's `"// " + tool.description`)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.parameters or {"type": "object", "properties": {}}}}
            for t in body.offered_tools()]  # fmt: skip


def tool_instruction(body: GenerationRequest, tool_format: str = "generic") -> str:
    """A system-prompt paragraph describing the tools and how to call them: for the generic format, and for a
    native one whose template does not render `tools` (DeepSeek V3.1's, which leaves that to the system prompt; the
    words are its model card's)."""
    if tool_format == "deepseek_v3_1":
        lines = ["## Tools", "You have access to the following tools:"]
        for t in body.offered_tools():
            parameters = json.dumps(t.parameters or {"type": "object", "properties": {}}, ensure_ascii=False)
            lines += ["", f"### {t.name}", f"Description: {t.description or ''}", "", f"Parameters: {parameters}"]
        lines += ["", "IMPORTANT: ALWAYS adhere to this exact format for tool use:",
                  "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments"
                  "<｜tool▁call▁end｜>{{additional_tool_calls}}<｜tool▁calls▁end｜>", "", "Where:", "",
                  "- `tool_call_name` must be an exact match to one of the available tools",
                  "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema",
                  "- For multiple tool calls, chain them directly without separators or spaces"]  # fmt: skip
        return "\n".join(lines)
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


def value_kind(schema) -> str:
    """How an XML-style format writes a value of this schema: "string" (as it is), "json", or "mixed" (a string
    or JSON: JSON if it reads as such)."""
    if not isinstance(schema, dict):
        return "mixed"
    types = schema.get("type")
    if types is None:
        values = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if values and all(isinstance(v, str) for v in values):
            return "string"
        return "json" if values else "mixed"
    types = [types] if isinstance(types, str) else list(types)
    if types == ["string"]:
        return "string"
    return "mixed" if "string" in types else "json"


def tool_grammar(body: GenerationRequest, tool_format: str, *, think: str | None = None) -> tuple[str, list[str]]:
    """The GBNF grammar that holds the model to this request's tools, and the trigger patterns that wake it
    (none: it holds from the first token). `think` for a held answer: "open" when the prompt left the model inside
    a <think> block (it must close it first), "optional" when the model may open one itself."""
    body = body.model_copy(update={"tools": [tool.model_copy(update={"parameters": refs_inlined(tool.parameters)})
                                             for tool in body.tools]})  # fmt: skip
    tools = body.offered_tools()
    many = body.parallel_tool_calls
    lazy = body.tool_call_optional()
    # With a response_format too, an answer in words must follow its schema: the grammar holds from the first token
    # (calls | the answer), one grammar from one converter so that the tools' and the answer's helper rules agree.
    answer = body.json_schema if lazy else None
    if answer is not None:
        schema_bounds_check(answer)
        lazy = False
    if tool_format == "generic":
        calls = {"type": "object", "properties": {"tool_calls": _calls_array(body)}, "required": ["tool_calls"]}
        if body.tool_call_optional():
            response = answer if answer is not None else {"type": "string"}
            words = {"type": "object", "properties": {"response": response}, "required": ["response"]}
            calls = {"anyOf": [calls, words]}
        return json_schema_grammar(calls, bounded=True), []
    if tool_format in ("hermes", "mistral", "llama3"):
        schemas, structure, triggers = _json_rules(tools, tool_format, many)
    else:
        schemas, structure, triggers = _native_rules(tools, tool_format, many)
    root = "calls"
    if answer is not None:
        schemas["final-answer"] = answer
        final = "final-answer"
        if tool_format == "harmony":
            structure.append('harmony-final ::= "<|channel|>final" (" " "<|constrain|>"? "json")? "<|message|>" '
                             "final-answer")  # fmt: skip
            final = "harmony-final"
        root = f"(calls | {final})"
    if tool_format == "harmony" and not lazy:
        root = f"messages {root}"  # its thought is a channel of its own (see _native_rules)
    elif think in ("open", "optional") and not lazy:
        # A thought ends at </think>, or for the models that call tools straight from their thinking, at the call.
        ends = THOUGHT_ENDS.get(tool_format, ())
        closed = f"({_lit(THINK_CLOSE)} [ \\t\\n]*){'?' if ends else ''}"
        structure.append(f"thought ::= {_until('thought-text', (THINK_CLOSE, *ends), structure)} {closed}")
        root = f"thought {root}" if think == "open" else f"([ \\t\\n]* {_lit(THINK_OPEN)} thought)? {root}"
    grammar = _grammar(schemas, [f"root ::= {root}", *structure])
    return grammar, triggers if lazy else []


def refs_inlined(schema: dict | None) -> dict | None:
    """A tool's parameters with its local `$ref`s ("#/$defs/Address": what Pydantic writes for a nested model)
    replaced by what they point to, and its `$defs` dropped: the grammar embeds each tool's schema in a larger one,
    where "#/..." would point elsewhere. A recursive ref is refused (ValueError), and the copy is bounded like any
    schema (refs used many times multiply it)."""
    if not isinstance(schema, dict):
        return schema
    budget = [MAX_NODES]

    def target(ref: str):
        node = schema
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ValueError(f"$ref {ref} points to nothing in the tool's parameters")
        return node

    def walk(node, refs: tuple[str, ...]):
        if isinstance(node, list):
            return [walk(item, refs) for item in node]
        if not isinstance(node, dict):
            return node
        budget[0] -= 1
        if budget[0] < 0:
            raise SchemaTooComplex(f"the tool's parameters, their $refs inlined, have over {MAX_NODES} subschemas")
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            if ref in refs or ref == "#":
                raise ValueError(f"the recursive $ref {ref} cannot be used in a tool's parameters")
            inlined = walk(target(ref), (*refs, ref))
            rest = walk({key: value for key, value in node.items() if key != "$ref"}, refs)
            return {**inlined, **rest} if isinstance(inlined, dict) else inlined
        return {key: walk(value, refs) for key, value in node.items() if key not in ("$defs", "definitions")}

    return walk(schema, ())


def _calls_array(body: GenerationRequest) -> dict:
    calls = [
        {"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
         "required": ["name", "arguments"]}
        for t in body.offered_tools()
    ]  # fmt: skip
    call = {"anyOf": calls} if len(calls) > 1 else calls[0]
    return {"type": "array", "items": call, "minItems": 1} | ({} if body.parallel_tool_calls else {"maxItems": 1})


def _json_rules(tools, tool_format: str, many: bool) -> tuple[dict, list[str], list[str]]:
    """hermes, mistral and llama3, whose calls are JSON objects: like _native_rules."""
    args_key = "parameters" if tool_format == "llama3" else "arguments"
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, args_key: t.parameters or {"type": "object"}},
            "required": ["name", args_key],
        }
        for t in tools
    ]
    schemas = {"call": {"anyOf": calls} if len(calls) > 1 else calls[0]}
    rules = []
    if tool_format == "hermes":
        one = r'"<tool_call>" "\n"? call "\n"? "</tool_call>"'
        rules.append(f'calls ::= {one} ("\\n"? {one})*' if many else f"calls ::= {one}")
    elif tool_format == "mistral":  # an array of calls (Nemo), or each call as name[ARGS]{...} (Devstral, 3.2)
        array = '"[" call ("," " "? call)* "]"' if many else '"[" call "]"'
        named = '(named ("[TOOL_CALLS]" named)*)' if many else "named"
        rules += [f'calls ::= "[TOOL_CALLS]" ({array} | {named})',
                  f"named ::= ({' | '.join(f'tool-{i}' for i in range(len(tools)))})"]  # fmt: skip
        for i, tool in enumerate(tools):
            schemas[f"tool-{i}-args"] = tool.parameters or {"type": "object"}
            rules.append(f'tool-{i} ::= {_lit(tool.name)} ("[CALL_ID]" [a-zA-Z0-9]+)? "[ARGS]" tool-{i}-args')
    else:  # llama3: one call per turn, as its template renders them
        rules.append("calls ::= call")
    triggers = [_LLAMA3_TRIGGER] if tool_format == "llama3" else [re.escape(JSON_TRIGGER[tool_format])]
    return schemas, rules, triggers


def _native_rules(tools, tool_format: str, many: bool) -> tuple[dict, list[str], list[str]]:
    """The schemas to convert (rule name -> JSON schema), the format's own rules (with `calls` for the calls) and
    the lazy grammar's trigger patterns."""
    schemas: dict[str, dict] = {}
    rules: list[str] = []
    if tool_format in XML:
        syntax = XML[tool_format]
        value_rule = _until("xml-value", (syntax.arg_close,), rules)
        opened = f"{_SEP} {_lit(syntax.value_open)}" if syntax.value_open else ""  # GLM's </arg_key> <arg_value>
        nl = '"\\n"' if syntax.newline else ""  # Qwen3-Coder: <parameter=key>\nvalue\n</parameter>
        close = f"{_lit(syntax.arg_close)} {_SEP}"
        names = []
        for i, tool in enumerate(tools):
            names.append(f"tool-{i}")
            params = tool.parameters or {}
            properties = params.get("properties") if isinstance(params.get("properties"), dict) else {}
            required = [key for key in params.get("required", []) if key in properties]
            args, optional = [], []
            for k, (key, schema) in enumerate(properties.items()):
                kind = value_kind(schema)
                value = value_rule
                choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
                if kind == "string" and choices:  # one of the values, written as they are
                    value = f"({' | '.join(_lit(choice) for choice in choices)})"
                elif kind == "json":
                    value = f"tool-{i}-arg-{k}-value"
                    schemas[value] = schema
                head = key + (f'" string="{"false" if kind == "json" else "true"}' if syntax.typed else "")
                rules.append(f"tool-{i}-arg-{k} ::= {_lit(syntax.arg_open + head + syntax.arg_name_end)} {opened} "
                             f"{nl} {value} {close}")  # fmt: skip
                (args if key in required else optional).append(f"tool-{i}-arg-{k}")
            if not properties and params.get("additionalProperties", True) is not False:  # any argument, as text
                name_end = ('" string="true' if syntax.typed else "") + syntax.arg_name_end
                rules.append(f"tool-{i}-any ::= {_lit(syntax.arg_open)} [^\"<>\\n]+ {_lit(name_end)} {opened} "
                             f"{nl} {value_rule} {close}")  # fmt: skip
                optional.append(f"tool-{i}-any")
            arguments = " ".join(args + ([f"({' | '.join(optional)})*"] if optional else []))
            if syntax.call_open:
                head = _lit(syntax.call_open + tool.name + syntax.call_name_end)
                rules.append(f"tool-{i} ::= {head} {_SEP} {arguments} {_lit(syntax.call_close)} {_SEP}")
            else:  # GLM: the name right after <tool_call>, the arguments, then </tool_call>
                rules.append(f"tool-{i} ::= {_lit(tool.name)} {_SEP} {arguments}")
        call = f"({' | '.join(names)})"
        several = many and syntax.call_open and tool_format != "qwen3_coder"  # calls in one block
        after_open = _SEP if syntax.call_open else ""  # GLM writes the name right after <tool_call>
        block = f"{_lit(syntax.block_open)} {after_open} {call}{'+' if several else ''} {_lit(syntax.block_close)}"
        first, triggers = block, [re.escape(syntax.block_open)]
        if tool_format == "qwen3_coder":
            # Qwen3-Coder sometimes leaves out its first block's <tool_call> (as llama.cpp's grammar allows): an
            # offered tool's whole opener wakes the grammar too (not "<function=" alone: `#include <functional>`).
            first = f"{_lit(syntax.block_open)}? {after_open} {call} {_lit(syntax.block_close)}"
            triggers += [re.escape(syntax.call_open + tool.name + syntax.call_name_end) for tool in tools]
        rules.append(f"calls ::= {first} ({_SEP} {block})*" if many and not several else f"calls ::= {first}")
        return schemas, rules, triggers
    syntax = NAMED[tool_format]
    names = []
    for i, tool in enumerate(tools):
        names.append(f"tool-{i}")
        schemas[f"tool-{i}-args"] = tool.parameters or {"type": "object"}
        if tool_format == "harmony":
            # The recipient in the channel's header or in the role's (after <|start|>assistant); then maybe its
            # content type (" json" or " <|constrain|>json").
            name = _lit(tool.name)
            kind = '(" " "<|constrain|>"? "json")?'
            rules.append(f'tool-{i} ::= ("<|channel|>" ("commentary" | "analysis") " to=functions." {name} {kind} | '
                         f'" to=functions." {name} "<|channel|>" ("commentary" | "analysis") {kind}) "<|message|>" '
                         f"tool-{i}-args")  # fmt: skip
        elif tool_format == "kimi_k2":
            rules.append(f'tool-{i} ::= {_lit(syntax.call_open + "functions." + tool.name + ":")} [0-9]{{1,4}} '
                         f"{_lit(syntax.name_end)} tool-{i}-args {_lit(syntax.call_close)}")  # fmt: skip
        else:
            rules.append(f"tool-{i} ::= {_lit(syntax.call_open + tool.name + syntax.name_end)} tool-{i}-args "
                         f"{_lit(syntax.call_close)}")  # fmt: skip
    call = f"({' | '.join(names)})"
    if tool_format == "harmony":  # one call per turn: <|call|> ends it (an end-of-generation token)
        until_end = _until("harmony-text", ("<|end|>",), rules)
        rules += ["calls ::= " + call,
                  f'messages ::= (("<|channel|>analysis" | "<|channel|>commentary") "<|message|>" {until_end} '
                  '"<|end|>" "<|start|>assistant")*']  # fmt: skip
        triggers = ["^( to=)", r"<\|start\|>assistant( to=)", r"(<\|channel\|>(?:commentary|analysis) to=)"]
        return schemas, rules, triggers
    begin, end = (_lit(m) for m in syntax.section)
    rules.append(f"calls ::= {begin}? {call}{'+' if many else ''} {end}?")
    triggers = ["(" + "|".join(re.escape(m) for m in (syntax.section[0], syntax.call_open)) + ")"]
    return schemas, rules, triggers


def _lit(text: str) -> str:
    """A GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped.replace(chr(9), chr(92) + "t")}"'


def _until(name: str, delimiters: tuple[str, ...], rules: list[str]) -> str:
    """A rule `name` for any text that contains none of `delimiters` (added to `rules`, once): the complement of
    the Aho-Corasick automaton that finds them, one rule per state, as llama.cpp's peg parser writes its `until`."""
    if any(rule.startswith(f"{name} ::= ") for rule in rules):
        return name
    goto: list[dict[str, int]] = [{}]  # the trie of the delimiters
    terminal = [False]
    for delimiter in delimiters:
        q = 0
        for ch in delimiter:
            if ch not in goto[q]:
                goto.append({})
                terminal.append(False)
                goto[q][ch] = len(goto) - 1
            q = goto[q][ch]
        terminal[q] = True
    fail = [0] * len(goto)
    queue = list(goto[0].values())
    for q in queue:  # breadth first: a state's failure link is known before its children's
        for ch, child in goto[q].items():
            f = fail[q]
            while f and ch not in goto[f]:
                f = fail[f]
            fail[child] = goto[f][ch] if ch in goto[f] and goto[f][ch] != child else 0
            terminal[child] = terminal[child] or terminal[fail[child]]
            queue.append(child)

    def step(q: int, ch: str) -> int:
        while q and ch not in goto[q]:
            q = fail[q]
        return goto[q].get(ch, 0)

    alphabet = sorted({ch for delimiter in delimiters for ch in delimiter})
    for q in range(len(goto)):
        if terminal[q]:
            continue  # a delimiter was found: no way on
        to: dict[int, list[str]] = {}
        for ch in alphabet:
            to.setdefault(step(q, ch), []).append(ch)
        specific = [ch for d, chars in to.items() if d for ch in chars]
        alternatives = [f"{_char_class(chars)} {name}-{d}" for d, chars in sorted(to.items()) if d and not terminal[d]]
        alternatives.append(f"{_char_class(specific, negate=True)} {name}-0")
        rules.append(f"{name}-{q} ::= | " + " | ".join(alternatives))
    rules.append(f"{name} ::= {name}-0")
    return name


def _char_class(chars: list[str], *, negate: bool = False) -> str:
    escaped = "".join("\\" + c if c in "]\\^-[" else {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, c) for c in chars)
    return f"[{'^' if negate else ''}{escaped}]"


def _grammar(schemas: dict[str, dict], rules: list[str]) -> str:
    """The format's `rules` (the first is root) and a rule for each of `schemas` (rule name -> the tools' JSON
    schemas, already bounded by the request's validation), checked against the grammar bounds."""
    converted = _schema_rules(schemas) if schemas else ""
    grammar = "\n".join([*rules, converted]).strip() + "\n"
    grammar_bounds_check(grammar)
    return grammar


INTEGER_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
MAX_INTEGER = 10**16 - 1  # the converter's integers have at most 16 digits


def integer_bounds(schema: dict) -> tuple[int | None, int | None]:
    """The least and greatest integer an integer schema allows (None: no bound on that side), from `minimum`,
    `maximum` and the exclusive ones (numbers, or draft 4's booleans); a ValueError when no integer fits."""

    def bound(key: str) -> float | None:
        value = schema.get(key)
        if value is None or isinstance(value, bool):
            return None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number")
        return value

    lows, highs = [], []
    if (value := bound("minimum")) is not None:
        lows.append(math.floor(value) + 1 if schema.get("exclusiveMinimum") is True else math.ceil(value))
    if (value := bound("exclusiveMinimum")) is not None:
        lows.append(math.floor(value) + 1)
    if (value := bound("maximum")) is not None:
        highs.append(math.ceil(value) - 1 if schema.get("exclusiveMaximum") is True else math.floor(value))
    if (value := bound("exclusiveMaximum")) is not None:
        highs.append(math.ceil(value) - 1)
    low, high = max(lows, default=None), min(highs, default=None)
    if (low is not None and high is not None and low > high) or (low or 0) > MAX_INTEGER or (high or 0) < -MAX_INTEGER:
        raise ValueError(f"no integer of at most 16 digits is within its bounds ({low} to {high})")
    # A bound beyond 16 digits bounds nothing the grammar could write.
    return (None if low is None or low < -MAX_INTEGER else low), (None if high is None or high > MAX_INTEGER else high)


def integer_range_gbnf(low: int | None, high: int | None) -> str:
    """GBNF alternatives for the integers from `low` to `high` as JSON writes them (no leading zeros, no "-0"), of
    at most 16 digits; None leaves a side open."""
    if low is not None and low >= 0:  # all non-negative
        return _non_negative(low, high)
    if high is not None and high < 0:  # all negative: "-" and the magnitudes from -high to -low
        return f'"-" ({_non_negative(-high, None if low is None else -low)})'
    negative = f'"-" ({_non_negative(1, None if low is None else -low)})'
    return f"{negative} | {_non_negative(0, high)}"


def _non_negative(low: int, high: int | None) -> str:
    """Alternatives for low..high (high None: up to 16 digits), low >= 0, split by number of digits."""
    top = MAX_INTEGER if high is None else high
    parts = []
    for digits in range(len(str(low)), len(str(top)) + 1):
        first = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        last = min(top, 10**digits - 1)
        if first <= last:
            parts.append(_same_length(str(first), str(last)))
    return " | ".join(parts)


def _same_length(low: str, high: str) -> str:
    """Alternatives for the digit strings from `low` to `high`, of the same length (low <= high)."""
    if len(low) == 1:
        return f"[{low}-{high}]" if low != high else f'"{low}"'
    if low[0] == high[0]:
        return f'"{low[0]}" ({_same_length(low[1:], high[1:])})'
    rest = len(low) - 1
    parts, start, end = [], int(low[0]), int(high[0])
    if low[1:] != "0" * rest:  # the first digit's block starts partway
        parts.append(f'"{low[0]}" ({_same_length(low[1:], "9" * rest)})')
        start += 1
    upper = ""
    if high[1:] != "9" * rest:  # the last digit's block ends partway
        upper = f'"{high[0]}" ({_same_length("0" * rest, high[1:])})'
        end -= 1
    if start <= end:
        parts.append(f"[{start}-{end}] [0-9]{{{rest}}}")
    if upper:
        parts.append(upper)
    return " | ".join(parts)


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
    if not bounded:
        schema_bounds_check(schema)
    grammar = _schema_rules({rule: schema})
    grammar = grammar if root is None else f"root ::= {root}\n{grammar}"
    grammar_bounds_check(grammar)
    return grammar


def _schema_rules(schemas: dict[str, dict]) -> str:
    """GBNF rules for several JSON schemas (rule name -> schema), converted together (their helper rules shared)."""
    from llama_cpp import llama_grammar  # here: the view imports this module without llama_cpp
    from llama_cpp.llama_grammar import SchemaConverter

    # The stock converter writes x{0,n} as n nested optional groups, "(x (x (x ...)?)?)?": llama.cpp's parser
    # recurses once per group, so maxLength 20000 overflowed the worker's stack (SIGSEGV) and anything from about
    # 2000 on was refused. Ours writes flat repetitions (see _repetition); the converter looks the function up as
    # a module global, so it is replaced there (the same function for every caller; assigning it is idempotent).
    llama_grammar._build_repetition = _repetition

    class Converter(SchemaConverter):
        def visit(self, schema, name):
            # A subschema of only annotations ({"description": ...}, or {}) allows any value; the stock converter
            # refuses the first ("Unrecognized schema") and reads the second as "any object".
            if isinstance(schema, dict) and not CONSTRAINING & schema.keys():
                schema = {**schema, "type": ANY_TYPE}
            if isinstance(schema, dict) and isinstance(schema.get("pattern"), str):
                schema = {**schema, "pattern": pattern_for_grammar(schema["pattern"])}
            # The stock converter ignores an integer's bounds (a TODO there): `{"minimum": 5, "maximum": 7}` gave
            # 2008480212. Its digits are written out here instead.
            if isinstance(schema, dict) and schema.get("type") == "integer" and INTEGER_BOUNDS & schema.keys():
                low, high = integer_bounds(schema)
                rule_name = name + "-" if name in llama_grammar.RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, f"({integer_range_gbnf(low, high)}) space")
            return super().visit(schema, name)

        def _generate_constant_rule(self, value):
            # The stock converter writes const/enum values with json.dumps' \uXXXX escapes, which GBNF reads as
            # code points: a character beyond the BMP (an emoji) became two lone surrogates, invalid UTF-8, and
            # its backslashes went unescaped. Here the literal is exactly the JSON text the model must write.
            text = json.dumps(value, ensure_ascii=False)
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    aliases = []
    try:
        for rule, schema in schemas.items():
            name = converter.visit(converter.resolve_refs(schema, ""), rule if rule != "root" else "")
            if name != rule:  # a plain type is its primitive's rule ("integer"), not one of the name asked for
                aliases.append(f"{rule} ::= {name}")
    except Exception as exc:  # the converter's own errors are ValueError, AssertionError, KeyError, ...
        raise ValueError(str(exc) or type(exc).__name__) from None
    return "\n".join([converter.format_grammar(), *aliases])


# Regex classes the converter passes on as they are (GBNF has none of them), as GBNF character classes.
_CLASSES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r"}
# What "any character" may be inside the JSON string the pattern is written in: not a quote, a backslash or a
# control character, which JSON escapes (the converter's `.` allowed them, so the answer could stop being JSON).
_NOT_JSON_SPECIAL = '"\\\\\\x00-\\x1F'
_ANY = f"[^{_NOT_JSON_SPECIAL}]"


def pattern_for_grammar(pattern: str) -> str:
    """A JSON Schema `pattern` as the converter reads it: anchored at both ends (JSON Schema's are not: an unanchored
    pattern matches anywhere in the string, so any characters may come around it), with \\d, \\w, \\s and
    their negations as character classes, and `.` and negated classes kept from JSON's special characters."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            letter = pattern[i + 1]
            if letter.lower() in _CLASSES and (not in_class or letter.islower()):
                chars = _CLASSES[letter.lower()]
                negated = f"[^{_NOT_JSON_SPECIAL}{chars}]"
                out.append(chars if in_class else negated if letter.isupper() else f"[{chars}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            if pattern.startswith("[^", i):  # a negated class must not let JSON's special characters through either
                out.append("[^" + _NOT_JSON_SPECIAL)
                i += 2
                continue
        elif c == "]" and in_class:
            in_class = False
        elif c == "." and not in_class:
            out.append(_ANY)
            i += 1
            continue
        out.append(c)
        i += 1
    body = "".join(out)
    starts, ends = body.startswith("^"), body.endswith("$") and not body.endswith("\\$")
    if starts and ends:
        return body
    core = body[1 if starts else 0 : len(body) - 1 if ends else len(body)]
    return f"^{'' if starts else _ANY + '*'}({core}){'' if ends else _ANY + '*'}$"


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
