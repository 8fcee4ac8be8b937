"""Files and batches belong to the key that made them: other keys get 404 and do not see them listed, staff keys see
all; a batch's lines run as its key (model scope, rate limits, usage, the request log's key prefix)."""

import json
import time

import pytest
from asgiref.sync import async_to_sync
from django.core.files.uploadedfile import SimpleUploadedFile

from access.services import WINDOW_SECONDS, key_create
from batches.models import Batch, BatchLine, File
from batches.services import THROTTLED_KEY, batch_lines_run
from core.redis import get_redis
from inference.models import RequestLog
from models_app.models import LanguageModel
from tests.batches.test_files import chat_line, jsonl
from tests.conftest import MODEL

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def keys_on(settings, files_dir):
    settings.AUTH = "on"


def bearer(raw: str) -> dict:
    return {"Authorization": f"Bearer {raw}"}


def upload(client, raw: str | None, lines: list[dict]) -> dict:
    headers = bearer(raw) if raw else {}
    file = SimpleUploadedFile("in.jsonl", jsonl(*lines))
    response = client.post("/v1/files", {"purpose": "batch", "file": file}, headers=headers)
    assert response.status_code == 200, response.content
    return response.json()


def create(client, raw: str | None, lines: list[dict]) -> dict:
    body = {"input_file_id": upload(client, raw, lines)["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}  # fmt: skip
    headers = bearer(raw) if raw else {}
    response = client.post("/v1/batches", json.dumps(body), content_type="application/json", headers=headers)
    assert response.status_code == 200, response.content
    return response.json()


def content(client, raw: str, file_id: str) -> list[dict]:
    response = client.get(f"/v1/files/{file_id}/content", headers=bearer(raw))
    assert response.status_code == 200, response.content

    async def read() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    return [json.loads(line) for line in async_to_sync(read)().decode().splitlines()]


def listed(client, raw: str | None, what: str) -> set[str]:
    response = client.get(f"/v1/{what}", headers=bearer(raw) if raw else {})
    assert response.status_code == 200, response.content
    return {row["id"] for row in response.json()["data"]}


def a_fresh_minute() -> None:
    """Wait for the start of a rate-limit minute if little of this one is left, so that what a test counts against
    a key's minute stays in one window (the wait is for a boundary, not a timed assertion)."""
    left = WINDOW_SECONDS - time.time() % WINDOW_SECONDS
    if left < 20:
        time.sleep(left + 0.1)


def test_another_keys_files_and_batches_are_a_404_and_missing_from_its_lists(client, keys_on, smollm2,
                                                                             lanes_left_queued):  # fmt: skip
    _, a = key_create(name="a")
    _, b = key_create(name="b")
    _, staff = key_create(name="ops", staff=True)
    batch = create(client, a, [chat_line("1"), chat_line("2")])
    file_id = batch["input_file_id"]
    mine = upload(client, b, [chat_line("b")])["id"]

    for method, path in [("get", f"/v1/files/{file_id}"), ("get", f"/v1/files/{file_id}/content"),
                         ("delete", f"/v1/files/{file_id}"), ("get", f"/v1/batches/{batch['id']}"),
                         ("post", f"/v1/batches/{batch['id']}/cancel")]:  # fmt: skip
        response = getattr(client, method)(path, headers=bearer(b))
        assert response.status_code == 404, (method, path, response.content)
        assert response.json()["error"]["code"] == "not_found"
    assert File.objects.filter(pk=file_id).exists() and BatchLine.objects.filter(status="pending").count() == 2
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    taken = client.post("/v1/batches", json.dumps(body), content_type="application/json", headers=bearer(b))
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "input_file_id"  # not B's to run
    assert client.get(f"/v1/files?after={file_id}", headers=bearer(b)).status_code == 400  # not even as an anchor

    assert listed(client, b, "files") == {mine} and listed(client, b, "batches") == set()
    assert listed(client, a, "files") == {file_id} and listed(client, a, "batches") == {batch["id"]}
    assert listed(client, staff, "files") == {file_id, mine} and listed(client, staff, "batches") == {batch["id"]}
    assert client.get(f"/v1/files/{file_id}/content", headers=bearer(staff)).status_code == 200
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=bearer(a)).json()["status"] == "cancelled"


def test_without_keys_a_request_sees_only_what_was_made_without_a_key(client, settings, smollm2, files_dir,
                                                                      lanes_left_queued):  # fmt: skip
    settings.AUTH = "off"  # keys optional, as on loopback; a request may still send one
    _, a = key_create(name="a")
    keyed = create(client, a, [chat_line("1")])
    keyless = create(client, None, [chat_line("1")])
    assert listed(client, None, "files") == {keyless["input_file_id"]}
    assert listed(client, None, "batches") == {keyless["id"]}
    assert client.get(f"/v1/batches/{keyed['id']}").status_code == 404
    assert client.get(f"/v1/files/{keyed['input_file_id']}").status_code == 404
    assert listed(client, a, "batches") == {keyed["id"]}


def test_a_batchs_result_files_belong_to_its_key(client, keys_on, smollm2):
    _, a = key_create(name="a")
    _, b = key_create(name="b")
    batch = create(client, a, [chat_line("good"), chat_line("bad", model="no-such-model")])
    assert batch["status"] == "completed"
    assert [line["custom_id"] for line in content(client, a, batch["output_file_id"])] == ["good"]
    assert [line["custom_id"] for line in content(client, a, batch["error_file_id"])] == ["bad"]
    assert {batch["output_file_id"], batch["error_file_id"]} <= listed(client, a, "files")
    for file_id in (batch["output_file_id"], batch["error_file_id"]):
        assert client.get(f"/v1/files/{file_id}/content", headers=bearer(b)).status_code == 404
    assert listed(client, b, "files") == set()


def test_a_line_for_a_model_outside_the_keys_scope_goes_to_the_error_file_as_model_not_found(client, keys_on,
                                                                                             smollm2):  # fmt: skip
    other = LanguageModel.objects.get(pk=smollm2.pk)
    other.pk, other.name = None, "smollm2-copy"
    other.save()
    _, scoped = key_create(name="scoped", models=[MODEL])
    batch = create(client, scoped, [chat_line("in"), chat_line("out", model="smollm2-copy")])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert [line["custom_id"] for line in content(client, scoped, batch["output_file_id"])] == ["in"]
    (error,) = content(client, scoped, batch["error_file_id"])
    assert error["custom_id"] == "out" and error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"


def test_a_line_whose_model_left_the_keys_scope_after_creation_fails_as_model_not_found(client, keys_on, smollm2,
                                                                                        lanes_left_queued):  # fmt: skip
    key, raw = key_create(name="scoped", models=[MODEL])
    batch = create(client, raw, [chat_line("1")])
    key.models = ["some-other-model"]
    key.save()
    batch_lines_run(model_name=MODEL)
    batch = client.get(f"/v1/batches/{batch['id']}", headers=bearer(raw)).json()
    assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 1
    (error,) = content(client, raw, batch["error_file_id"])
    assert error["response"]["body"]["error"]["code"] == "model_not_found"
    assert RequestLog.objects.get(batch_id=batch["id"]).api_key_prefix == key.prefix


def test_a_batch_lines_request_log_carries_its_key_and_its_tokens_count_for_the_key(client, keys_on, smollm2):
    key, raw = key_create(name="a", tpm=100_000)
    a_fresh_minute()
    batch = create(client, raw, [chat_line("1"), chat_line("2"), chat_line("3", model="no-such-model")])
    assert batch["status"] == "completed"
    rows = RequestLog.objects.filter(batch_id=batch["id"])
    assert rows.count() == 3 and {row.api_key_prefix for row in rows} == {key.prefix}
    tokens = sum(row.prompt_tokens + row.completion_tokens for row in rows)
    assert tokens > 0
    response = client.get("/v1/models", headers=bearer(raw))
    assert int(response["x-ratelimit-remaining-tokens"]) == 100_000 - tokens


def test_a_key_past_its_rpm_has_its_batch_lines_wait_for_its_next_minute_not_refused(client, keys_on, smollm2,
                                                                                     lanes_left_queued):  # fmt: skip
    key, raw = key_create(name="a")
    _, other = key_create(name="b")
    a_fresh_minute()
    mine = create(client, raw, [chat_line("1"), chat_line("2"), chat_line("3")])  # 2 requests: upload, create
    theirs = create(client, other, [chat_line("x")])
    key.rpm = 3  # room for one line this minute
    key.save()
    assert batch_lines_run(model_name=MODEL) == 2  # one of mine (the next goes back to wait), then theirs
    lines = BatchLine.objects.filter(batch_id=mine["id"])
    assert sorted(lines.values_list("status", "attempts")) == [("completed", 1), ("pending", 0), ("pending", 0)]
    assert BatchLine.objects.get(batch_id=theirs["id"]).status == "completed"  # another key's lines go on
    assert 1 <= get_redis().ttl(THROTTLED_KEY.format(key.prefix)) <= 60
    assert batch_lines_run(model_name=MODEL) == 0  # still this minute: they keep waiting
    assert Batch.objects.get(pk=mine["id"]).status == "in_progress"  # (asked with the key, the answer is a 429)

    for name in get_redis().keys(f"minerva:*{key.prefix}*"):  # the minute ends: its counts and the mark expire
        get_redis().delete(name)
    assert batch_lines_run(model_name=MODEL) == 2
    batch = client.get(f"/v1/batches/{mine['id']}", headers=bearer(raw)).json()
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
