"""Ollama's embeddings (/api/embed and the older /api/embeddings) through the official `ollama` client against a
real `serve`: the bundled MiniLM and SmolLM2 (mean-pooled), truncation as Ollama does it, errors in its shape."""

import math
import time

import ollama
import pytest

from inference.models import RequestLog
from tests.conftest import MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

MINILM = "all-minilm-l6-v2"


def finished_row(endpoint: str) -> RequestLog:
    deadline = time.monotonic() + 30
    while True:
        rows = list(RequestLog.objects.filter(endpoint=endpoint))
        if len(rows) == 1 and rows[0].status_code is not None:
            return rows[0]
        assert time.monotonic() < deadline, f"no single finished row for {endpoint}: {rows}"
        time.sleep(0.1)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embed_returns_one_normalised_vector_per_input_and_close_texts_score_higher(client):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    reply = client.embed(model=MINILM, input=texts)
    assert reply.model == MINILM and len(reply.embeddings) == 3 and reply.prompt_eval_count > 10
    assert all(len(v) == 384 and math.isclose(math.hypot(*v), 1.0, abs_tol=1e-3) for v in reply.embeddings)
    food, bread, market = reply.embeddings
    assert cosine(food, bread) > cosine(food, market) + 0.3
    row = finished_row("/api/embed")  # the worker finishes the row just after the client has its answer
    assert (row.status_code, row.model, row.prompt_tokens) == (200, MINILM, reply.prompt_eval_count)


def test_a_single_input_and_a_generating_model_embed_too(client):
    one = client.embed(model=MODEL, input="Say hello.")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 576
    assert client.embed(model=MODEL, input=["Say hello."]).embeddings == one.embeddings


def test_the_older_embeddings_endpoint_gives_the_same_vector(client):
    old = client.embeddings(model=MINILM, prompt="A cat sits on the mat.")
    new = client.embed(model=MINILM, input="A cat sits on the mat.")
    assert cosine(old.embedding, new.embeddings[0]) > 0.999


def test_a_long_input_is_cut_unless_truncate_is_false(client):
    long = "word " * 2000  # far past MiniLM's 512 tokens
    assert len(client.embed(model=MINILM, input=long).embeddings) == 1
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=MINILM, input=long, truncate=False)
    assert refused.value.status_code == 400 and "context" in refused.value.error


def test_bad_embed_requests_get_ollamas_errors(client):
    with pytest.raises(ollama.ResponseError) as unknown:
        client.embed(model="no-such-model", input="x")
    assert (
        unknown.value.status_code == 404
        and unknown.value.error == 'model "no-such-model" not found, try pulling it first'
    )
    with pytest.raises(ollama.ResponseError) as empty:
        client.embed(model=MINILM, input=[""])
    assert empty.value.status_code == 400
