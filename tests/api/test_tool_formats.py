"""The native tool-call syntaxes: detection from the template, parsing, and streaming: free text at once, a call's
head as soon as its name is known, its arguments as they are written."""

import json
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from core.generation import Tool
from inference.tool_calls import ToolCallPart, ToolCallStream, calls_fold, parse_tool_calls
from inference.tools import tool_format_for
from tests.api.test_chat_completions import post, sse_events
from tests.conftest import MODEL

WEATHER_ARGS = {"city": "Paris"}


def only_call(calls: list[dict]) -> tuple[str, dict]:
    (call,) = calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    return call["function"]["name"], json.loads(call["function"]["arguments"])


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for tool in tools %}...<tool_call>{{ tool_call | tojson }}</tool_call>", "hermes"),
        ("<|start_header_id|>ipython<|end_header_id|>{% if tools %}...<|python_tag|>", "llama3"),
        ("<|start_header_id|>{% if tools is not none %}Environment: ipython{% endif %}", "llama3"),
        ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]...[TOOL_CALLS]", "mistral"),
        ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", "generic"),
        (None, "generic"),
    ],
    ids=["qwen/hermes", "llama 3.1", "llama 3.2", "mistral", "no tools", "no template"],
)
def test_the_tool_format_is_picked_from_the_template(template, expected):
    assert tool_format_for(template) == expected


def test_hermes_calls_are_parsed_and_the_text_around_them_stays_content():
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    content, calls = parse_tool_calls("hermes", text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[1]["function"]["arguments"] == "{}"
    assert calls[0]["id"] != calls[1]["id"]


def test_a_hermes_call_cut_off_before_its_name_is_complete_stays_content():
    text = 'Sure. <tool_call>{"name": "get_wea'
    assert parse_tool_calls("hermes", text) == (text.strip(), [])


def test_a_call_cut_off_after_its_name_keeps_what_it_wrote():
    # Its head has already been streamed, so it stays a call (finish_reason "length" tells the client it was cut).
    content, calls = parse_tool_calls("hermes", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"ci')
    assert content == "Sure."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_weather", '{"ci')]


def test_text_in_tool_call_tags_that_is_not_a_call_stays_content():
    text = "<tool_call>hello</tool_call> there"
    assert parse_tool_calls("hermes", text) == (text, [])


def test_llama3_calls_are_parsed_with_or_without_the_python_tag():
    for text in ('{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'):  # fmt: skip
        content, calls = parse_tool_calls("llama3", text)
        assert content is None and only_call(calls) == ("get_weather", WEATHER_ARGS)


def test_llama3_text_that_merely_contains_json_is_content():
    text = 'The answer is {"name": "x"} as JSON.'
    assert parse_tool_calls("llama3", text) == (text, [])


def test_mistral_calls_are_parsed_in_both_syntaxes():
    content, calls = parse_tool_calls(
        "mistral", 'On it.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    )
    assert content == "On it." and only_call(calls) == ("get_weather", WEATHER_ARGS)
    content, calls = parse_tool_calls("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    assert content is None and only_call(calls) == ("get_weather", WEATHER_ARGS)


def test_generic_answers_are_either_calls_or_words():
    assert parse_tool_calls("generic", '{"response": "Hello"}') == ("Hello", [])
    content, calls = parse_tool_calls(
        "generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    )
    assert content is None and only_call(calls) == ("get_weather", WEATHER_ARGS)


def test_arguments_given_as_a_json_string_are_kept_as_that_string():
    _, calls = parse_tool_calls("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert calls[0]["function"]["arguments"] == '{"a": 1}'


def feed_all(stream: ToolCallStream, pieces: list[str]) -> list[list]:
    return [stream.feed(piece) for piece in pieces]


def streamed(tool_format: str, text: str) -> list:
    """The stream's output fed one character at a time (what a model writing one-character tokens gives)."""
    stream = ToolCallStream(tool_format)
    items = [item for ch in text for item in stream.feed(ch)] + stream.finish()
    return items


def test_a_stream_sends_free_text_at_once_and_holds_back_a_possible_trigger():
    stream = ToolCallStream("hermes")
    sent = feed_all(stream, ["Let me ", "check.", " <tool", "_call>", '{"name": "get_time", ', '"arguments": {}}',
                             "</tool_call>"])  # fmt: skip
    assert sent[:4] == [["Let me "], ["check."], [" "], []]
    (head,) = sent[4]  # the head goes out as soon as the name is complete
    assert (head.index, head.name, head.arguments) == (0, "get_time", "") and head.id.startswith("call_")
    assert sent[5] == [ToolCallPart(0, arguments="{}")] and sent[6] == []
    assert stream.finish() == []


def test_a_held_back_prefix_that_is_not_a_trigger_is_released():
    stream = ToolCallStream("hermes")
    assert feed_all(stream, ["a <", "b"]) == [["a "], ["<b"]]
    assert stream.finish() == []


@pytest.mark.parametrize(
    ("tool_format", "text"),
    [
        (
            "hermes",
            'Hi.\n<tool_call>\n{"name": "write", "arguments": {"path": "a.py", "text": "x = {\\"k\\": [1]}\\n"}}'
            '\n</tool_call>\n<tool_call>{"name": "ls", "arguments": {}}</tool_call>',
        ),
        ("llama3", '<|python_tag|>{"name": "write", "parameters": {"path": "a.py", "nested": {"a": [1, {"b": "}"}]}}}'),
        ("mistral", 'Ok.[TOOL_CALLS][{"name": "write", "arguments": {"q": "]}"}}, {"name": "ls", "arguments": {}}]'),
        ("mistral", '[TOOL_CALLS]write[ARGS]{"q": "a\\nb"}[TOOL_CALLS]ls[ARGS]{}'),
        (
            "generic",
            '{"tool_calls": [{"name": "write", "arguments": {"q": "\\"quoted\\""}}, {"name": "ls", "arguments": {}}]}',
        ),
        ("generic", '{"response": "Plain words, \\"quotes\\", a new\\nline and \\ud83d\\ude00."}'),
    ],
    ids=["hermes", "llama3", "mistral json", "mistral args", "generic calls", "generic words"],
)
def test_calls_streamed_a_character_at_a_time_concatenate_to_the_parsed_ones(tool_format, text):
    items = streamed(tool_format, text)
    parts = [item for item in items if isinstance(item, ToolCallPart)]
    heads = [part for part in parts if part.id is not None]
    assert len(heads) == len({part.id for part in heads})
    assert sum(len(part.arguments) > 0 for part in parts) > 2 * len(heads) or not heads  # arguments in pieces
    content, calls = parse_tool_calls(tool_format, text)
    streamed_calls = calls_fold(parts)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    for call in calls:
        json.loads(call["function"]["arguments"])
    text_out = "".join(item for item in items if isinstance(item, str)).strip() or None
    assert text_out == content


def test_text_after_a_call_is_content():
    content, calls = parse_tool_calls("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}] done')
    assert content == "done" and only_call(calls) == ("f", {})


def test_a_llama3_stream_is_free_text_unless_it_starts_with_a_call():
    words = ToolCallStream("llama3")
    assert feed_all(words, ["  ", "Hello", " there"]) == [[], ["  Hello"], [" there"]]
    call = ToolCallStream("llama3")
    sent = feed_all(call, [" {", '"name": "f"', ', "parameters": {}}'])
    assert sent[0] == [] and sent[1][0].name == "f"
    assert only_call(calls_fold([item for items in sent for item in items] + call.finish())) == ("f", {})


def test_the_generic_formats_words_stream_as_they_are_decoded():
    stream = ToolCallStream("generic")
    assert feed_all(stream, ['{"response": ', '"Hi', " the\\", 'u00e9re"}']) == [[], ["Hi"], [" the"], ["\u00e9re"]]
    assert stream.finish() == []


def test_xml_style_values_are_typed_by_the_tools_schema_and_strings_stream_as_written():
    tools = [Tool(name="f", parameters={"type": "object", "properties": {"n": {"type": "integer"},
                  "on": {"type": "boolean"}, "s": {"type": "string"}, "o": {"type": "object"}}})]  # fmt: skip
    # Qwen's templates write a boolean as Python's True; an unknown argument is JSON if it reads as JSON.
    text = ("<tool_call>\n<function=f>\n<parameter=n>\n7\n</parameter>\n<parameter=on>\nTrue\n</parameter>\n"
            "<parameter=s>\n7\n</parameter>\n<parameter=o>\n{\"a\": [1]}\n</parameter>\n<parameter=x>\n[2]\n"
            "</parameter>\n<parameter=y>\nplain \"words\"\n</parameter>\n</function>\n</tool_call>")  # fmt: skip
    _, calls = parse_tool_calls("qwen3_coder", text, tools)
    assert only_call(calls) == ("f", {"n": 7, "on": True, "s": "7", "o": {"a": [1]}, "x": [2], "y": 'plain "words"'})
    stream = ToolCallStream("qwen3_coder", tools)
    sent = feed_all(stream, ["<tool_call>\n<function=f>\n<parameter=s>\nab", "c\n</par", "ameter>\n"])
    assert sent[1] == [ToolCallPart(0, arguments="c")]  # what may be the closing tag is held back
    assert sent[2] == [ToolCallPart(0, arguments='"')]


def test_a_qwen3_coder_call_without_its_tool_call_tag_is_a_call_for_an_offered_tool_only():
    tools = [Tool(name="read", parameters={"type": "object", "properties": {"path": {"type": "string"}}})]
    call = "<function=read>\n<parameter=path>\na.py\n</parameter>\n</function>\n"
    for text in (f"Reading it.\n{call}", f"Reading it.\n{call}</tool_call>"):  # with or without the block's end
        content, calls = parse_tool_calls("qwen3_coder", text, tools)
        assert content.strip() == "Reading it." and only_call(calls) == ("read", {"path": "a.py"})
    stream = ToolCallStream("qwen3_coder", tools)
    sent = feed_all(stream, ["Reading it.\n<func", "tion=read>\n<parameter=path>\na.py\n</parameter>\n</function>"])
    assert sent[0] == ["Reading it.\n"]  # what may be the opener is held back
    assert [p.name for p in sent[1] if p.name] == ["read"]
    unknown = "<function=rm>\n<parameter=path>\na.py\n</parameter>\n</function>"  # no such tool: text
    assert parse_tool_calls("qwen3_coder", unknown, tools) == (unknown, [])


def test_an_xml_block_that_is_not_a_call_stays_content_and_a_cut_call_keeps_what_it_wrote():
    text = "<tool_call>hello</tool_call> there"
    assert parse_tool_calls("qwen3_coder", text) == (text, [])
    tools = [Tool(name="f", parameters={"type": "object", "properties": {"s": {"type": "string"}}})]
    _, calls = parse_tool_calls("minimax_m2", '<minimax:tool_call>\n<invoke name="f">\n<parameter name="s">ab', tools)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("f", '{"s": "ab')]


def test_names_come_out_of_each_familys_call_head():
    kimi = "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:3<|tool_call_argument_begin|>{}"
    assert only_call(parse_tool_calls("kimi_k2", kimi)[1]) == ("get_weather", {})
    mistral = '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}'  # Mistral Small 3.2
    assert only_call(parse_tool_calls("mistral", mistral)[1]) == ("get_weather", WEATHER_ARGS)
    glm = "<tool_call>\nget_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
    assert only_call(parse_tool_calls("glm", glm)[1]) == ("get_weather", WEATHER_ARGS)
    harmony = 'to=functions.get_weather<|message|>{"city": "Paris"}'  # as inference/reasoning.py passes it on
    assert only_call(parse_tool_calls("harmony", harmony)[1]) == ("get_weather", WEATHER_ARGS)


def test_section_markers_around_calls_are_not_text():
    text = ('Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
            "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")  # fmt: skip
    content, calls = parse_tool_calls("deepseek_v3_1", text)
    assert content == "Sure." and only_call(calls) == ("get_weather", WEATHER_ARGS)


TEMPLATES = Path(__file__).parent.parent / "templates" / "llama.cpp"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]},
                                     "days": {"type": "integer"}}, "required": ["city", "days"]}}}]  # fmt: skip


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("template", ["Qwen3-Coder", "deepseek-ai-DeepSeek-V3.2", "deepseek-ai-DeepSeek-V3.1",
                                      "moonshotai-Kimi-K2"])  # fmt: skip
async def test_a_family_template_gets_calls_in_its_own_syntax_parsed_streamed_and_not(async_client, smollm2, template):
    # SmolLM2 knows none of these syntaxes: the required grammar writes the family's syntax for it, which the view
    # reads back (the arguments typed by the schema).
    smollm2.chat_template_override = (TEMPLATES / f"{template}.jinja").read_text()
    await sync_to_async(smollm2.save)()
    request = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris for 3 days?"}],
               "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0,
               "max_tokens": 200}  # fmt: skip  # DeepSeek's and Kimi's markers are many tokens in SmolLM2's vocabulary
    plain = (await post(async_client, "/v1/chat/completions", request)).json()
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "get_weather" and arguments["city"] in ("Paris", "London")
    assert isinstance(arguments["days"], int)
    events = await sse_events(await post(async_client, "/v1/chat/completions", {**request, "stream": True}))
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1] if json.loads(e)["choices"]]
    pieces = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert pieces[0]["function"] == {"name": "get_weather", "arguments": ""} and len(pieces) > 3
    assert "".join(p["function"]["arguments"] for p in pieces) == call["function"]["arguments"]
    assert not any(d.get("content") for d in deltas)  # no marker leaks into the text


@pytest.mark.django_db(transaction=True)
async def test_a_template_that_needs_what_the_renderer_lacks_is_a_400_naming_it(async_client, smollm2):
    # Kimi K2 Instruct's template numbers earlier calls by appending to a list, which the sandbox forbids.
    smollm2.chat_template_override = (TEMPLATES / "Kimi-K2-Instruct.jinja").read_text()
    await sync_to_async(smollm2.save)()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]  # fmt: skip
    request = {"model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 5}
    response = await post(async_client, "/v1/chat/completions", request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "'append', which the sandbox forbids" in error["message"]
