"""/api/chat and /api/generate through the official `ollama` client against a real `serve`: NDJSON streams and
single objects, options, format schemas, tools, think, raw prompts, and bad input in Ollama's error shape."""

import json

import jsonschema
import ollama
import pytest

from tests.conftest import HELLO, MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

OPTIONS = {"temperature": 0, "seed": 42, "num_predict": 20}


def test_it_chats_without_streaming(client):
    reply = client.chat(model=MODEL, messages=HELLO, options=OPTIONS, stream=False)
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.prompt_eval_count > 0 and 0 < reply.eval_count <= 20
    assert reply.total_duration >= reply.eval_duration > 0
    assert reply.created_at.endswith("Z")


def test_a_streamed_chat_is_ndjson_lines_that_add_up_to_the_unstreamed_answer(client):
    plain = client.chat(model=MODEL, messages=HELLO, options=OPTIONS)
    parts = list(client.chat(model=MODEL, messages=HELLO, options=OPTIONS, stream=True))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1])
    last = parts[-1]
    assert last.done and last.done_reason == plain.done_reason and last.message.content == ""
    assert last.eval_count == plain.eval_count and last.prompt_eval_count == plain.prompt_eval_count
    assert "".join(p.message.content for p in parts) == plain.message.content


def test_it_generates_through_the_chat_template_streamed_and_not(client):
    plain = client.generate(model=MODEL, prompt="Say hello.", options=OPTIONS)
    assert plain.response and plain.done and plain.eval_count > 0
    chat = client.chat(model=MODEL, messages=HELLO, options=OPTIONS)
    assert plain.response == chat.message.content  # a prompt is a user turn in the model's template
    parts = list(client.generate(model=MODEL, prompt="Say hello.", options=OPTIONS, stream=True))
    assert "".join(p.response for p in parts) == plain.response and parts[-1].done


def test_a_system_prompt_changes_the_answer(client):
    plain = client.generate(model=MODEL, prompt="Who are you?", options=OPTIONS)
    pirate = client.generate(model=MODEL, prompt="Who are you?", system="You are a pirate. Say arr.", options=OPTIONS)
    assert pirate.response != plain.response


def test_a_raw_prompt_is_sent_as_it_is_and_stop_and_num_predict_apply(client):
    raw = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True, options={**OPTIONS, "num_predict": 12})
    assert " 6" in raw.response and raw.done_reason == "length" and raw.eval_count == 12
    stopped = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True,
                              options={**OPTIONS, "num_predict": 12, "stop": [" 6"]})  # fmt: skip
    assert stopped.response == raw.response[: raw.response.index(" 6")] and stopped.done_reason == "stop"


def test_num_predict_minus_one_is_unlimited_and_num_ctx_is_ignored(client):
    reply = client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": -1, "num_ctx": 99999})
    assert reply.done_reason == "stop" and reply.message.content


def test_json_format_and_a_schema_give_json_that_follows_it(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    ask = [{"role": "user", "content": "Invent a person. Answer in JSON."}]
    reply = client.chat(model=MODEL, messages=ask, format=schema, options={**OPTIONS, "num_predict": 60})
    jsonschema.validate(json.loads(reply.message.content), schema)
    anything = client.generate(model=MODEL, prompt="Invent a person.", format="json",
                               options={**OPTIONS, "num_predict": 60})  # fmt: skip
    assert isinstance(json.loads(anything.response), dict)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"]}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


@pytest.mark.parametrize("stream", [False, True])
def test_offered_tools_give_calls_with_object_arguments_or_text(client, stream):
    if stream:
        parts = list(client.chat(model=MODEL, messages=ASK, tools=[WEATHER], options={**OPTIONS, "num_predict": 80},
                                 stream=True))  # fmt: skip
        calls = [c for p in parts for c in p.message.tool_calls or []]
        text = "".join(p.message.content or "" for p in parts)
        assert parts[-1].done and parts[-1].done_reason == "stop"
    else:
        reply = client.chat(model=MODEL, messages=ASK, tools=[WEATHER], options={**OPTIONS, "num_predict": 80})
        calls, text = reply.message.tool_calls or [], reply.message.content
    assert calls or text
    for call in calls:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


@pytest.mark.parametrize("num_predict", [15, 19, 23])  # cut before `"arguments"`, after `{`, within `"Paris"`
def test_a_call_cut_off_by_num_predict_still_has_object_arguments(client, num_predict):
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "stream": False,
            "options": {**OPTIONS, "num_predict": num_predict}}  # fmt: skip
    reply = client._request_raw("POST", "/api/chat", json=body).json()  # as sent here (the client reorders tools)
    parsed = ollama.ChatResponse.model_validate(reply)  # what the official client does with it: "" was refused
    assert parsed.done_reason == "length"
    [call] = parsed.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {}


def test_format_and_tools_together_give_calls_or_json_that_follows_the_format(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"],
              "additionalProperties": False}  # fmt: skip
    for ask in (ASK, [{"role": "user", "content": "Say hello."}]):
        reply = client.chat(model=MODEL, messages=ask, tools=[WEATHER], format=schema,
                            options={**OPTIONS, "num_predict": 60})  # fmt: skip
        assert reply.done_reason == "stop"
        if reply.message.tool_calls:
            assert all(isinstance(c.function.arguments, dict) for c in reply.message.tool_calls)
        else:
            jsonschema.validate(json.loads(reply.message.content), schema)


def test_a_tool_result_round_trip_is_answered(client):
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}]  # fmt: skip
    reply = client.chat(model=MODEL, messages=history, tools=[WEATHER], options={**OPTIONS, "num_predict": 40})
    assert reply.done and (reply.message.content or reply.message.tool_calls)


def test_think_on_a_model_that_cannot_think_is_ollamas_400_and_think_false_is_served(client):
    for call in (lambda **kw: client.chat(messages=HELLO, **kw), lambda **kw: client.generate(prompt="Hi", **kw)):
        with pytest.raises(ollama.ResponseError) as refused:
            call(model=MODEL, think=True, options=OPTIONS)
        assert refused.value.status_code == 400 and refused.value.error == f'"{MODEL}" does not support thinking'
    assert "thinking" not in client.show(MODEL).capabilities
    assert client.chat(model=MODEL, messages=HELLO, think=False, options=OPTIONS).message.content


def test_a_template_that_opens_a_thought_puts_it_in_thinking(client, smollm2):
    smollm2.chat_template_override = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n<think>\n"
    )
    smollm2.save()
    options = {"temperature": 0, "num_predict": 12}
    reply = client.chat(model=MODEL, messages=HELLO, think=True, options=options)
    assert reply.message.thinking and "</think>" not in reply.message.thinking
    parts = list(client.chat(model=MODEL, messages=HELLO, think=True, options=options, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == reply.message.thinking
    generated = client.generate(model=MODEL, prompt="Say hello.", think=True, options=options)
    assert generated.thinking == reply.message.thinking
    assert "thinking" in client.show(MODEL).capabilities


def test_logprobs_come_per_token(client):
    options = {**OPTIONS, "num_predict": 5}
    reply = client.chat(model=MODEL, messages=HELLO, logprobs=True, top_logprobs=2, options=options)
    assert len(reply.logprobs) == reply.eval_count
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in reply.logprobs)


# -- bad input: Ollama's {"error": "..."} with its status


def test_an_unknown_model_is_a_404_in_ollamas_shape(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=HELLO)
    assert caught.value.status_code == 404
    assert caught.value.error == 'model "no-such-model" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.generate(model="no-such-model", prompt="hi", stream=True))
    assert caught.value.status_code == 404


@pytest.mark.parametrize(
    ("options", "field"),
    [({"temperature": "hot"}, "options.temperature"), ({"temperature": 9}, "options.temperature"),
     ({"num_predict": 0}, "options.num_predict"), ({"mirostat": 2}, "options.mirostat"),
     ({"stop": [""]}, "options.stop"), ({"top_p": 2}, "options.top_p")],
)  # fmt: skip
def test_bad_options_are_a_400_naming_the_option(client, options, field):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=HELLO, options=options)
    assert caught.value.status_code == 400 and field in caught.value.error


def test_a_tool_whose_arguments_are_not_an_object_is_a_400(client):
    tool = {"type": "function", "function": {"name": "x", "parameters": {"type": "string", "maxLength": 10}}}
    body = {"model": MODEL, "messages": ASK, "tools": [tool], "options": OPTIONS}  # the client refuses it itself
    with pytest.raises(ollama.ResponseError) as caught:  # its calls' arguments would be a string
        client._request_raw("POST", "/api/chat", json=body)
    assert caught.value.status_code == 400 and "type object" in caught.value.error


def test_images_and_what_ollama_has_but_minerva_does_not_do_are_a_clear_400(client):
    image = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    cases = [
        (lambda: client.chat(model=MODEL, messages=[{"role": "user", "content": "What is this?", "images": [image]}]),
         "does not support images"),
        (lambda: client.generate(model=MODEL, prompt="What is this?", images=[image]), "does not support images"),
        (lambda: client.generate(model=MODEL, prompt="def f(", suffix="return 1"), "suffix"),
        (lambda: client.generate(model=MODEL, prompt="hi", template="{{ .Prompt }}"), "template is not supported"),
        (lambda: client.generate(model=MODEL, prompt="hi", context=[1, 2, 3]), "/api/chat"),
        (lambda: client.chat(model=MODEL, messages=HELLO, format={"type": "object", "not": {}}), "not"),
    ]  # fmt: skip
    for call, words in cases:
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 400 and words in caught.value.error, caught.value.error
