"""The native tool-call syntaxes: detection from the template, parsing, and streaming: free text at once, a call's
head as soon as its name is known, its arguments as they are written."""

import json

import pytest

from inference.tool_calls import ToolCallPart, ToolCallStream, calls_fold, parse_tool_calls
from inference.tools import tool_format_for

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
