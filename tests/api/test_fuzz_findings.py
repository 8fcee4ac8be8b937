"""What the hostile-body fuzzing (test_hostile_bodies.py) found, each pinned by a cheap in-process test."""

import json

import pytest

from inference.models import RequestLog
from tests.conftest import MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)


async def post(client, path: str, raw: str):
    return await client.post(path, raw.encode(), content_type="application/json")


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "number", "maximum": "NUMBER"}}}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "keep_alive": "NUMBER"}),
        ("/v1/chat/completions", {**CHAT, "response_format": SCHEMA}),
        ("/v1/chat/completions", {**CHAT, "temperature": "NUMBER"}),
    ],
    ids=["keep_alive", "inside a JSON schema", "temperature"],
)
async def test_non_finite_numbers_are_a_400_not_a_500_from_the_request_log(async_client, smollm2, path, body, number):
    # Python's json reads NaN, Infinity and 1e999 (as inf); the request-log row could not store them.
    response = await post(async_client, path, json.dumps(body).replace('"NUMBER"', number))
    assert response.status_code == 400, response.content
    assert_schema("ErrorResponse", response.json())
    assert await RequestLog.objects.filter(status_code=400).acount() == 1


@pytest.mark.parametrize(
    ("path", "code"),
    [("/v1/models/%0A", "model_not_found"), ("/v1/models/a%0Ab", "model_not_found"), ("/v1/x%0A", "not_found")],
)
async def test_a_newline_in_the_path_gets_a_json_404_not_djangos_html(async_client, smollm2, path, code):
    response = await async_client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == code
