"""/tokenize and /detokenize (llama-server's shapes) and a chat request's prompt-token count, against a real
`manage.py serve`: the model's own tokenizer and template, run by its worker."""

import httpx2 as httpx
import openai
import pytest

from inference.models import RequestLog
from models_app.services import models_sync
from tests.conftest import MODEL
from tests.test_faults import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

MINILM = "all-minilm-l6-v2"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]  # fmt: skip


@pytest.fixture(autouse=True)
def _registered(db):
    models_sync()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.port}{path}", json=body, timeout=120)


@pytest.mark.parametrize("text", ["Hello, world!", "Ünïcödé 🙂 and <|im_start|> tokens", "  spaces\n\tand tabs  "])
def test_tokenize_and_detokenize_round_trip(minerva_server, text):
    response = post(minerva_server, "/tokenize", {"model": MODEL, "content": text})
    assert response.status_code == 200
    tokens = response.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    back = post(minerva_server, "/detokenize", {"model": MODEL, "tokens": tokens})
    assert back.status_code == 200 and back.json() == {"content": text}


def test_pieces_spell_the_text_and_special_tokens_are_parsed_unless_asked_not_to(minerva_server):
    body = {"model": MODEL, "content": "<|im_start|>Hi🦜", "with_pieces": True}
    pieces = post(minerva_server, "/tokenize", body).json()["tokens"]
    assert pieces[0]["piece"] == "<|im_start|>" and all(set(p) == {"id", "piece"} for p in pieces)
    text = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert text.decode() == "<|im_start|>Hi🦜"
    assert any(isinstance(p["piece"], list) for p in pieces)  # the emoji's bytes span tokens
    plain = post(minerva_server, "/tokenize", {**body, "with_pieces": False, "parse_special": False}).json()
    assert len(plain["tokens"]) > len(pieces)


def test_a_bert_model_adds_cls_and_sep_when_asked(minerva_server):
    bare = post(minerva_server, "/tokenize", {"model": MINILM, "content": "hello world"}).json()["tokens"]
    special = post(minerva_server, "/tokenize", {"model": MINILM, "content": "hello world", "add_special": True})
    assert special.json()["tokens"] == [101, *bare, 102]  # [CLS] ... [SEP]


def test_a_chat_count_matches_the_prompt_tokens_of_the_same_chat_request(minerva_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather?"}]
    with openai.OpenAI(base_url=minerva_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        for extra in ({}, {"tools": TOOLS}):
            count = post(minerva_server, "/tokenize", {"model": MODEL, "messages": messages, **extra})
            assert count.status_code == 200 and set(count.json()) == {"count"}
            answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, **extra)
            assert count.json()["count"] == answer.usage.prompt_tokens


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "nope", "content": "x"}, 404, "model"),
        ("/tokenize", {"model": MODEL}, 400, "content"),
        ("/tokenize", {"model": MODEL, "content": 5}, 400, "content"),
        ("/tokenize", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/tokenize", {"model": MINILM, "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": ["a"]}, 400, "tokens[0]"),
    ],
)
def test_bad_requests_are_errors_in_openais_shape_and_logged_once(minerva_server, path, body, status, param):
    response = post(minerva_server, path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    request_id = response.headers["x-request-id"].removeprefix("req_")
    # The worker publishes the error before it writes the row: wait for the row.
    row = wait_for(lambda: RequestLog.objects.exclude(status="running").filter(request_id=request_id).first(), 30,
                   "the request's row was not finished")  # fmt: skip
    assert (row.endpoint, row.status_code, RequestLog.objects.filter(request_id=request_id).count()) == (
        path,
        status,
        1,
    )


def test_a_tokenize_request_is_logged_once(minerva_server):
    response = post(minerva_server, "/tokenize", {"model": MODEL, "content": "hi"})
    request_id = response.headers["x-request-id"].removeprefix("req_")
    row = wait_for(lambda: RequestLog.objects.filter(request_id=request_id, status="completed").first(), 30,
                   "the request's row was not finished")  # fmt: skip
    assert row.endpoint == "/tokenize" and row.status_code == 200 and row.model == MODEL
    assert RequestLog.objects.filter(request_id=request_id).count() == 1
