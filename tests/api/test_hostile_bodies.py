"""Hostile requests against a real `manage.py serve`: schemathesis fuzzes our operations of the official OpenAI
spec, hypothesis puts wrong types, huge numbers, deep nesting, lone surrogates, NUL and huge strings anywhere in
a body, JSON schemas with huge bounds, deep nesting and big enums (as response_format and as tool parameters),
and unknown paths and methods. Whatever comes in: never a 5xx, every error in OpenAI's shape, and the server
still answers a normal request afterwards, from the same worker process (a schema once crashed it: issue 12)."""

import collections
import functools
import json
import os
import sys

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core import NOT_SET

from api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from api.responses.protocol import CreateResponse
from inference.schema_bounds import MAX_COUNT
from tests.conftest import HELLO, MODEL
from tests.openapi import SPEC, assert_schema

# Each operation we serve, with the spec's schema of its 200 body.
OPERATIONS = {
    "createChatCompletion": "CreateChatCompletionResponse",
    "createCompletion": "CreateCompletionResponse",
    "listModels": "ListModelsResponse",
    "retrieveModel": "Model",
    "createResponse": "Response",
}
# Requests to a live server, each one a few tokens at most: the bound is examples, not seconds, and the deadline
# grows with them (a loaded 2-core machine can take seconds for one). MINERVA_FUZZ_EXAMPLES=1000 runs longer.
EXAMPLES = int(os.environ.get("MINERVA_FUZZ_EXAMPLES", 20))
# Derandomized in make test (the same examples every run, so CI is repeatable); MINERVA_FUZZ_EXAMPLES explores.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                derandomize="MINERVA_FUZZ_EXAMPLES" not in os.environ)  # fmt: skip
pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(120 + 10 * EXAMPLES)]


@pytest.fixture
def server(minerva_server, smollm2):
    return minerva_server


@functools.cache
def openai_operations() -> dict:
    """Our operations of the official spec (loading its 3 MB takes a second or two, so once per run)."""
    schema = schemathesis.openapi.from_path(SPEC).include(operation_id=list(OPERATIONS))
    return {op.definition.raw["operationId"]: op for op in (result.ok() for result in schema.get_all_operations())}


def cheap(body):
    """Point a generated body at our model and keep its generation to a few tokens, so that the requests the
    spec allows reach a worker without costing seconds each. Values of the wrong type stay as generated."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if _is_int(body.get(key)) and body[key] > 4:
            body[key] = 4
    if "input" in body:  # a Responses request
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = 4
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4
    if _is_int(body.get("n")) and body["n"] > 2:
        body["n"] = 2
    return body


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_openai_answer(response: httpx.Response, ok_schema: str | None = None) -> None:
    """No 5xx; an error is OpenAI's error object; a 200 JSON body follows the spec (when its schema is given)."""
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json", response.text[:2000]
        assert_schema("ErrorResponse", response.json())
    elif ok_schema and response.headers["content-type"] == "application/json":
        assert_schema(ok_schema, response.json())
    elif response.headers["content-type"] == "text/event-stream":
        frames = [line for line in response.text.split("\n\n") if line]
        if frames[0].startswith("event: "):  # the Responses API's typed events: the last one ends the response
            assert frames[-1].split("\n")[0] in {"event: response.completed", "event: response.incomplete",
                                                 "event: response.failed"}, frames[-3:]  # fmt: skip
        else:
            assert frames[-1] == "data: [DONE]", frames[-3:]


def assert_healthy(server) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert_schema("CreateChatCompletionResponse", response.json())


def send_case(case, base_url: str) -> httpx.Response:
    """Send a generated case as schemathesis serialises it (JSON, or raw bytes for a wrong media type)."""
    if case.body is not NOT_SET:
        case.body = cheap(case.body)
    response = case.call(base_url=base_url, timeout=60)
    headers = [(name, value) for name, values in response.headers.items() for value in values]
    return httpx.Response(response.status_code, headers=headers, content=response.content)


@pytest.mark.parametrize("operation_id", list(OPERATIONS))
def test_the_openai_spec_fuzzed_against_serve_never_gets_a_5xx(server, operation_id):
    operation = openai_operations()[operation_id]
    cases = st.one_of(operation.as_strategy(generation_mode=mode) for mode in GenerationMode)

    @FUZZ
    @given(case=cases)
    def fuzz(case):
        note(f"case: {case.method} {case.formatted_path} {case.body!r:.500}")
        assert_openai_answer(send_case(case, server.base_url), OPERATIONS[operation_id])

    fuzz()
    assert_healthy(server)


# -- hypothesis: hostile values anywhere in an otherwise valid body ------------------------------------------

HOLE = "@@hole@@"  # where a template takes the hostile value: its JSON text replaces '"@@hole@@"'
HOSTILE_KEY = "@@key@@"  # a template's key that takes a hostile string

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
RESPONSE = {"model": MODEL, "input": "Hi", "max_output_tokens": 2}
TEMPLATES = [
    *(("chat/completions", {**CHAT, field: HOLE}) for field in ChatCompletionRequest.model_fields),
    *(("completions", {**COMPLETION, field: HOLE}) for field in CompletionRequest.model_fields),
    *(("chat/completions", {**CHAT, "messages": [{"role": "user", f: HOLE}]}) for f in ChatMessage.model_fields),
    ("chat/completions", {**CHAT, "messages": [HOLE]}),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [HOLE]}]}),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": HOLE}]}]}),
    ("chat/completions", {**CHAT, "messages": [{"role": "assistant", "tool_calls": [HOLE]}]}),
    ("chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                         "schema": HOLE}}}),
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": HOLE}}]}),
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": HOLE}}]}),
    ("chat/completions", {**CHAT, "tool_choice": {"type": "function", "function": {"name": HOLE}}}),
    ("chat/completions", {**CHAT, "logit_bias": {HOSTILE_KEY: 1}}),
    ("chat/completions", {**CHAT, "stop": [HOLE]}),
    ("chat/completions", {**CHAT, HOSTILE_KEY: 1}),
    ("completions", {**COMPLETION, "prompt": [HOLE]}),
    *(("responses", {**RESPONSE, field: HOLE}) for field in CreateResponse.model_fields),
    ("responses", {**RESPONSE, "input": [HOLE]}),
    ("responses", {**RESPONSE, "input": [{"role": "user", "content": [HOLE]}]}),
    ("responses", {**RESPONSE, "input": [{"type": "function_call", "call_id": HOLE, "name": "f", "arguments": "{}"}]}),
    ("responses", {**RESPONSE, "tools": [{"type": "function", "name": "f", "parameters": HOLE}]}),
    ("responses", {**RESPONSE, "text": {"format": {"type": "json_schema", "name": "x", "schema": HOLE}}}),
    ("responses", {**RESPONSE, "tool_choice": {"type": "function", "name": HOLE}}),
]  # fmt: skip

# Strings with what a careless client sends: NUL, lone surrogates, non-characters, line separators.
hostile_text = st.text(
    st.characters() | st.characters(categories=["Cs"]) | st.sampled_from("\x00\ufffe\uffff\u2028\u202e"), max_size=12
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | hostile_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(hostile_text, children, max_size=3),
    max_leaves=8,
).map(json.dumps)  # ensure_ascii: lone surrogates travel as \udXXX escapes, which are valid JSON
raw_json = st.one_of(
    json_values,
    st.integers(1, 100_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 100_000).map(lambda depth: '{"a":' * depth + "0" + "}" * depth),
    st.integers(20, 6000).map(lambda digits: "9" * digits),  # past 2**64, and past Python's 4300-digit limit
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "1e-999", "-9223372036854775809"]),
)


def fill(template: dict, value: str, key: str) -> bytes:
    text = json.dumps(template).replace(json.dumps(HOLE), value).replace(json.dumps(HOSTILE_KEY), json.dumps(key))
    return text.encode()


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "responses"])
def test_hostile_values_anywhere_in_a_body_never_get_a_5xx(server, endpoint):
    templates = [template for path, template in TEMPLATES if path == endpoint]
    bodies = st.one_of(
        st.builds(fill, st.sampled_from(templates), raw_json, hostile_text),
        raw_json.map(str.encode),  # a whole body that is not an object
        st.binary(max_size=64),  # not JSON, or not UTF-8
    )
    with httpx.Client(base_url=f"{server.base_url}/", timeout=60) as client:

        @FUZZ
        @given(body=bodies)
        def fuzz(body):
            note(f"body: {body[:500]!r}")
            assert_openai_answer(client.post(endpoint, content=body, headers={"content-type": "application/json"}))

        fuzz()
    assert_healthy(server)


@pytest.mark.parametrize(
    ("endpoint", "body", "status"),
    [
        ("chat/completions", {**CHAT, "model": "m" * 10_000_000}, 413),
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 7_000_000}]}, 400),
        ("chat/completions", {**CHAT, "stop": ["s" * 1_000_000]}, 200),
        ("completions", {**COMPLETION, "user": "\x00" * 1_000_000}, 200),  # 6 MB as \u0000 escapes
    ],
    ids=["10 MB model", "7 MB content", "1 MB stop", "a million NULs in user"],
)
def test_huge_strings_are_refused_or_served_and_never_a_5xx(server, endpoint, body, status):
    response = httpx.post(f"{server.base_url}/{endpoint}", json=body, timeout=60)
    assert response.status_code == status, response.text[:2000]
    assert_openai_answer(response)
    assert_healthy(server)


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND"]
# Path segments: known ones, percent-escapes of any byte (invalid UTF-8, NUL, '/', '..'), and odd text.
segments = st.one_of(
    st.sampled_from(["models", "chat", "completions", MODEL, "..", ".", ""]),
    st.binary(min_size=1, max_size=6).map(lambda raw: "".join(f"%{byte:02X}" for byte in raw)),
    st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S"], exclude_characters="/?#%"), max_size=8),
)


def test_unknown_paths_and_methods_get_an_openai_error(server):
    with httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=60) as client:

        @FUZZ
        @given(method=st.sampled_from(METHODS), path=st.lists(segments, min_size=1, max_size=4).map("/".join))
        def fuzz(method, path):
            response = client.request(method, f"/v1/{path}")
            # httpx resolves ".." segments, so "/v1/.." asks for "/", which is not the API (Django's HTML 404)
            if method != "HEAD" and response.request.url.path.startswith("/v1/"):  # a HEAD answer has no body
                assert_openai_answer(response, "ListModelsResponse" if path == "models" else None)
            assert response.status_code < 500

        fuzz()
    assert_healthy(server)


# -- JSON schemas: the bounds that once crashed the worker (issue 12) ----------------------------------------

ISSUE_12_SCHEMA = {"type": "string", "maxLength": 100000}


def worker(server):
    return server.child("celery")


def assert_no_worker_died(server, pid: int) -> None:
    assert worker(server).pid == pid, "the worker was restarted"
    log = server.log.read_text(errors="replace")
    assert "exited with code" not in log, log[-3000:]


def schema_body(schema, *, as_tool: bool = False, max_tokens: int = 16) -> dict:
    if as_tool:  # a tool's arguments are an object: another schema is the value of its one argument
        if schema.get("type") != "object":
            schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        return {**CHAT, "tools": [tool], "tool_choice": "required", "max_tokens": max_tokens}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return {**CHAT, "response_format": response_format, "max_tokens": max_tokens}


def test_the_issues_200_byte_schema_is_served_and_the_worker_survives(server):
    pid = worker(server).pid
    response = httpx.post(f"{server.base_url}/chat/completions", json=schema_body(ISSUE_12_SCHEMA), timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    content = choice["message"]["content"]
    assert content.startswith('"')  # the grammar holds the answer to a JSON string
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), str)
    assert_healthy(server)
    assert_no_worker_died(server, pid)


@pytest.mark.parametrize("as_tool", [False, True], ids=["response_format", "tool parameters"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_schema_no_token_can_satisfy_is_a_400_and_the_worker_serves_on(server, as_tool, stream):
    # llama.cpp never samples a NUL, so after "a" this grammar allows nothing: its samplers used to pick a token
    # anyway, and the grammar's accept threw a C++ exception that aborted the worker (found by the schema fuzzer).
    pid = worker(server).pid
    schema = {"type": "string", "pattern": "^a\\u0000$"}
    body = schema_body(schema, as_tool=as_tool, max_tokens=64) | {"stream": stream}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    if stream:  # the 200 went out with the first token; the error is the stream's last event
        assert response.status_code == 200, response.text
        frames = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        error = json.loads(frames[-2])["error"]
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
    assert error["code"] == "grammar_dead_end"
    assert error["param"] == ("tools" if as_tool else "response_format")
    response = httpx.post(f"{server.base_url}/chat/completions", json=schema_body(ISSUE_12_SCHEMA, as_tool=as_tool),
                          timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    assert_no_worker_died(server, pid)


@pytest.mark.parametrize("as_tool", [False, True], ids=["response_format", "tool parameters"])
def test_a_schema_over_the_bounds_is_a_400_naming_the_keyword_and_the_worker_serves_on(server, as_tool):
    pid = worker(server).pid
    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 10 * MAX_COUNT}}}
    response = httpx.post(f"{server.base_url}/chat/completions", json=schema_body(schema, as_tool=as_tool),
                          timeout=120)  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == ("tools[0].function.parameters" if as_tool else "response_format.json_schema.schema")
    assert "maxLength" in error["message"]
    response = httpx.post(f"{server.base_url}/chat/completions", json=schema_body(ISSUE_12_SCHEMA, as_tool=as_tool),
                          timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    assert_no_worker_died(server, pid)


def _nest(depth: int, inner: dict, kind: str) -> dict:
    for _ in range(depth):
        inner = {"type": "array", "items": inner} if kind == "array" else {"type": "object", "properties": {"a": inner}}
    return inner


counts = st.one_of(
    st.integers(0, 70),
    st.integers(0, 5000),
    st.integers(0, 2 * MAX_COUNT),
    st.sampled_from([MAX_COUNT, MAX_COUNT + 1, 2000, 2001, 10**9, 2**63, -1, 0]),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)


def _string(low, high):
    return (
        {"type": "string"} | ({} if low is None else {"minLength": low}) | ({} if high is None else {"maxLength": high})
    )


def _pattern(atom, low, high):
    return {"type": "string", "pattern": f"^{atom}{{{low},{high}}}$"}


schema_leaves = st.one_of(
    st.builds(_string, st.none() | counts, st.none() | counts),
    st.builds(_pattern, st.sampled_from(["a", "(ab|c)", "[0-9]", "(a?)", "((x)y)", "\\d", "."]), counts, counts),
    st.integers(0, 3000).map(lambda n: {"enum": [f"value-{i}" for i in range(n)]}),
    st.lists(scalars, min_size=1, max_size=5).map(lambda values: {"enum": values}),
    st.sampled_from([{"type": "integer"}, {"type": "boolean"}, {"type": "number"}, {"type": "null"}, {}]),
    st.builds(lambda depth, kind: _nest(depth, {"type": "string"}, kind), st.integers(1, 200),
              st.sampled_from(["array", "object"])),
    st.integers(0, 1500).map(lambda n: {"type": "object",
                                        "properties": {f"p{i}": {"type": "string"} for i in range(n)}}),
    st.integers(1, 40).map(lambda depth: {"type": "string", "pattern": "^" + "(a" * depth + ")" * depth + "$"}),
)  # fmt: skip


def _array(items, low, high):
    return {"type": "array", "items": items} | ({} if low is None else {"minItems": low}) | (
        {} if high is None else {"maxItems": high})  # fmt: skip


def _object(properties, required):
    return {"type": "object", "properties": properties, "required": [k for k in properties if required]}


json_schemas = st.recursive(
    schema_leaves,
    lambda children: st.one_of(
        st.builds(_array, children, st.none() | counts, st.none() | counts),
        st.builds(_object, st.dictionaries(st.text(min_size=1, max_size=6), children, max_size=5), st.booleans()),
        st.lists(children, min_size=1, max_size=4).map(lambda branches: {"anyOf": branches}),
    ),
    max_leaves=6,
)


def send_schema(client: httpx.Client, schema, as_tool: bool) -> httpx.Response:
    return client.post("chat/completions", json=schema_body(schema, as_tool=as_tool, max_tokens=2))


def test_fuzzed_json_schemas_never_get_a_5xx_nor_kill_the_worker(server):
    pid = worker(server).pid
    with httpx.Client(base_url=f"{server.base_url}/", timeout=120) as client:

        @FUZZ
        @given(schema=json_schemas, as_tool=st.booleans())
        def fuzz(schema, as_tool):
            note(f"schema ({'tool' if as_tool else 'response_format'}): {json.dumps(schema)[:500]}")
            assert_openai_answer(send_schema(client, schema, as_tool))

        fuzz()
    assert_healthy(server)
    assert_no_worker_died(server, pid)


@pytest.mark.parametrize(
    "body",
    [
        {**CHAT, "messages": [{"role": "user", "content": "Hi"}] * 20_000},
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}] * 20_000}]},
        schema_body(_nest(30, {"type": "string", "maxLength": 3000}, "object"), max_tokens=2),
        schema_body({"type": "object", "description": "d" * 3_000_000}, max_tokens=2),
        schema_body({"anyOf": [{"enum": list(range(999))}] + [{"type": "string"}] * 200_000}, max_tokens=2),
    ],
    ids=["20k messages", "20k content parts", "30 nested objects", "3 MB schema", "200k anyOf branches"],
)
def test_large_and_deep_bodies_get_an_answer_and_never_a_5xx(server, body):
    pid = worker(server).pid
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    assert_openai_answer(response)
    assert_healthy(server)
    assert_no_worker_died(server, pid)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_worker_survives_a_hundred_fuzzed_schemas_or_as_many_as_asked(server):
    """The measurement of issue 12: 1,000 generated schemas (half as response_format, half as tool parameters);
    prints how they were answered. MINERVA_FUZZ_SCHEMAS changes the count."""
    total = int(os.environ.get("MINERVA_FUZZ_SCHEMAS", 100))  # the measurement in the notes: 1000
    pid = worker(server).pid
    outcomes: collections.Counter = collections.Counter()
    with httpx.Client(base_url=f"{server.base_url}/", timeout=120) as client:
        # Derandomized unless MINERVA_FUZZ_SCHEMAS asks for a run (CI stays deterministic; a measurement run
        # explores). One random run found a grammar dead end that aborted the worker inside llama.cpp; now a 400.
        @settings(max_examples=total, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  derandomize="MINERVA_FUZZ_SCHEMAS" not in os.environ)  # fmt: skip
        @given(schema=json_schemas, as_tool=st.booleans())
        def fuzz(schema, as_tool):
            note(f"schema ({'tool' if as_tool else 'response_format'}): {json.dumps(schema)[:2000]}")
            response = send_schema(client, schema, as_tool)
            outcomes[response.status_code] += 1
            assert_openai_answer(response)

        fuzz()
    sent = sum(outcomes.values())
    print(f"\nfuzzed schemas: {sent} sent, outcomes {dict(sorted(outcomes.items()))}, worker pid {pid} "
          f"-> {worker(server).pid}", file=sys.stderr)  # fmt: skip
    assert sent >= total * 0.9  # hypothesis may stop a little early when it has seen every small case
    assert_healthy(server)
    assert_no_worker_died(server, pid)
