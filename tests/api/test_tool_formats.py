"""The native tool-call syntaxes: detection from the template, parsing, and streaming with held-back calls."""

import json

import pytest

from inference.tools import ToolCallStream, parse_tool_calls, tool_format_for

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


def test_a_hermes_call_cut_off_by_max_tokens_stays_content():
    text = 'Sure. <tool_call>{"name": "get_weather", "argu'
    assert parse_tool_calls("hermes", text) == (text.strip(), [])


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


def feed_all(stream: ToolCallStream, pieces: list[str]) -> list[str]:
    return [stream.feed(piece) for piece in pieces]


def test_a_stream_sends_free_text_at_once_and_holds_back_a_possible_trigger():
    stream = ToolCallStream("hermes")
    sent = feed_all(
        stream, ["Let me ", "check.", " <tool", "_call>", '{"name": "get_time", "arguments": {}}', "</tool_call>"]
    )
    assert sent == ["Let me ", "check.", " ", "", "", ""]
    content, calls = stream.finish()
    assert content is None and only_call(calls) == ("get_time", {})


def test_a_held_back_prefix_that_is_not_a_trigger_is_released():
    stream = ToolCallStream("hermes")
    assert feed_all(stream, ["a <", "b"]) == ["a ", "<b"]
    assert stream.finish() == (None, [])


def test_text_after_a_call_is_content_at_the_end():
    stream = ToolCallStream("mistral")
    feed_all(stream, ['[TOOL_CALLS][{"name": "f", "arguments": {}}]', " done"])
    content, calls = stream.finish()
    assert content == "done" and only_call(calls) == ("f", {})


def test_a_llama3_stream_is_free_text_unless_it_starts_with_a_call():
    words = ToolCallStream("llama3")
    assert feed_all(words, ["  ", "Hello", " there"]) == ["", "  Hello", " there"]
    call = ToolCallStream("llama3")
    assert feed_all(call, [" {", '"name": "f", "parameters": {}}']) == ["", ""]
    assert only_call(call.finish()[1]) == ("f", {})


def test_a_generic_stream_holds_the_whole_json_answer():
    stream = ToolCallStream("generic")
    assert feed_all(stream, ['{"response": ', '"Hi"}']) == ["", ""]
    assert stream.finish() == ("Hi", [])
