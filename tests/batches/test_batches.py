"""Batches in-process: lines checked at creation, run through the endpoints' generation path, results in files;
cancel, expiry and the reaper driven by hand (Celery eager, or lanes left in the real Redis queue)."""

import json

import pytest
from asgiref.sync import async_to_sync
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import OperationalError, connection

from batches.models import Batch, BatchLine
from batches.services import batch_line_claim, batch_line_run, batch_lines_run, batches_reap
from core.redis import get_redis
from core.workers import WORKER_ID
from inference.models import RequestLog
from inference.streams import TokenStream
from tests.batches.test_files import chat_line, jsonl
from tests.conftest import HELLO, MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)


def create(client, lines, endpoint="/v1/chat/completions", **extra) -> dict:
    upload = client.post("/v1/files", {"purpose": "batch", "file": SimpleUploadedFile("in.jsonl", jsonl(*lines))})
    assert upload.status_code == 200, upload.content
    body = {"input_file_id": upload.json()["id"], "endpoint": endpoint, "completion_window": "24h", **extra}
    response = client.post("/v1/batches", json.dumps(body), content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()


def retrieve(client, batch_id: str) -> dict:
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert_schema("Batch", {k: v for k, v in batch.items() if v is not None})  # OpenAI sends nulls the spec omits
    return batch


def content(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    response = client.get(f"/v1/files/{file_id}/content")

    async def read() -> bytes:  # the download is an async iterator, even for the sync test client
        return b"".join([chunk async for chunk in response.streaming_content])

    return [json.loads(line) for line in async_to_sync(read)().decode().splitlines()]


def test_a_batch_answers_good_lines_like_the_endpoint_and_files_bad_ones_with_their_errors(client, smollm2,
                                                                                            files_dir):  # fmt: skip
    lines = [
        chat_line("good-1"),
        chat_line("good-2", messages=[{"role": "user", "content": "Name a colour."}]),
        chat_line("unknown-model", model="no-such-model"),
        chat_line("bad-param", temperature="hot"),
        chat_line("too-long", messages=[{"role": "user", "content": "hi " * 9000}]),
        chat_line("bad-tools", tool_choice="required"),
    ]
    created = create(client, lines, metadata={"purpose": "test"})
    batch = retrieve(client, created["id"])
    assert batch["status"] == "completed" and batch["metadata"] == {"purpose": "test"}
    assert batch["request_counts"] == {"total": 6, "completed": 2, "failed": 4}
    assert batch["usage"]["output_tokens"] > 0 and batch["model"] == MODEL

    output, errors = content(client, batch["output_file_id"]), content(client, batch["error_file_id"])
    assert [line["custom_id"] for line in output] == ["good-1", "good-2"]
    direct = client.post("/v1/chat/completions", json.dumps(lines[0]["body"]), content_type="application/json").json()
    answer = output[0]["response"]
    assert answer["status_code"] == 200 and answer["request_id"].startswith("req_") and output[0]["error"] is None
    assert_schema("CreateChatCompletionResponse", answer["body"])
    assert answer["body"]["choices"][0]["message"] == direct["choices"][0]["message"]

    failures = {line["custom_id"]: (line["response"]["status_code"], line["response"]["body"]["error"]["code"],
                                    line["response"]["body"]["error"]["param"]) for line in errors}  # fmt: skip
    assert failures == {
        "unknown-model": (404, "model_not_found", "model"),
        "bad-param": (400, None, "temperature"),
        "too-long": (400, "context_length_exceeded", "messages"),
        "bad-tools": (400, None, "tool_choice"),
    }
    logged = RequestLog.objects.filter(batch_id=batch["id"])
    assert sorted(logged.values_list("status_code", flat=True)) == [200, 200, 400, 400, 400, 404]


def test_a_completions_batch_runs_legacy_completions(client, smollm2, files_dir):
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 6, "temperature": 0}}  # fmt: skip
    batch = retrieve(client, create(client, [line], endpoint="/v1/completions")["id"])
    (result,) = content(client, batch["output_file_id"])
    assert result["response"]["body"]["object"] == "text_completion"
    assert " 5" in result["response"]["body"]["choices"][0]["text"]


def test_a_file_whose_lines_call_another_endpoint_fails_the_batch_naming_the_lines(client, smollm2, files_dir):
    lines = [chat_line("a"), {**chat_line("b"), "url": "/v1/completions"}]
    batch = retrieve(client, create(client, lines)["id"])
    assert batch["status"] == "failed" and batch["failed_at"]
    assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == [("mismatched_endpoint", 2)]
    assert not BatchLine.objects.exists() and batch["output_file_id"] is None


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"endpoint": "/v1/images/generations"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"input_file_id": "file-nope"}, "input_file_id"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "a\u0000b"}}, "metadata"),  # given back verbatim, so refused rather than altered
        ({"input_file_id": 5}, "input_file_id"),
    ],
)
def test_batch_creation_refuses_bad_parameters_with_a_400(client, files_dir, change, param):
    body = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
    if body["input_file_id"] == "file-x":
        upload = {"purpose": "batch", "file": SimpleUploadedFile("in.jsonl", jsonl(chat_line("a")))}
        body["input_file_id"] = client.post("/v1/files", upload).json()["id"]
    response = client.post("/v1/batches", json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.json()


def test_a_user_data_file_cannot_be_a_batch_input(client, files_dir):
    upload = client.post("/v1/files", {"purpose": "user_data", "file": SimpleUploadedFile("a", b"x")}).json()
    body = {"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    response = client.post("/v1/batches", json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and "purpose batch" in response.json()["error"]["message"]


def test_unknown_batches_are_a_404_and_batches_list_in_pages(client, smollm2, files_dir, lanes_left_queued):
    assert client.get("/v1/batches/batch_nope").json()["error"]["code"] == "not_found"
    assert client.post("/v1/batches/batch_nope/cancel").status_code == 404
    ids = [create(client, [chat_line("a")])["id"] for _ in range(3)]
    first = client.get("/v1/batches?limit=2").json()
    assert_schema("ListBatchesResponse", {**first, "data": []})
    assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = client.get(f"/v1/batches?after={first['last_id']}").json()
    assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]


def test_a_worker_runs_batch_lines_on_all_but_one_of_a_models_slots(client, smollm2, files_dir, lanes_left_queued):
    create(client, [chat_line(str(i)) for i in range(5)])
    assert get_redis().llen(smollm2.queue) == 3  # a lane per batch slot: 4 slots, one kept for interactive requests
    claimed = [batch_line_claim(model=smollm2) for _ in range(4)]
    assert [line is not None for line in claimed] == [True, True, True, False]


def test_cancelling_stops_waiting_lines_at_once_and_cancels_running_ones(client, smollm2, files_dir,
                                                                          lanes_left_queued):  # fmt: skip
    batch_id = create(client, [chat_line(str(i)) for i in range(5)])["id"]
    batch_line_run(line=batch_line_claim(model=smollm2))  # line 0 finishes
    running = batch_line_claim(model=smollm2)  # line 1 is taken by a worker...
    cancelling = client.post(f"/v1/batches/{batch_id}/cancel").json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
    assert get_redis().exists(TokenStream(running.request_id).cancel_key)
    assert batch_line_claim(model=smollm2) is None  # ...and nothing more starts
    batch_line_run(line=running)  # its request sees the flag before it starts generating
    batch = retrieve(client, batch_id)
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    assert batch["request_counts"] == {"total": 5, "completed": 1, "failed": 0}
    assert [line["custom_id"] for line in content(client, batch["output_file_id"])] == ["0"]
    errors = content(client, batch["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(str(i), "batch_cancelled") for i in range(1, 5)]
    assert client.post(f"/v1/batches/{batch_id}/cancel").json()["status"] == "cancelled"  # idempotent


def test_a_finished_batch_cannot_be_cancelled(client, smollm2, files_dir):
    batch_id = create(client, [chat_line("a")])["id"]
    response = client.post(f"/v1/batches/{batch_id}/cancel")
    assert response.status_code == 400 and "completed" in response.json()["error"]["message"]


def test_the_reaper_requeues_a_dead_workers_lines_and_drops_their_late_results(client, smollm2, files_dir,
                                                                               lanes_left_queued):  # fmt: skip
    batch_id = create(client, [chat_line(str(i)) for i in range(3)])["id"]
    lost = batch_line_claim(model=smollm2)
    BatchLine.objects.filter(pk=lost.pk).update(worker="gone-host:1")  # as if another worker held it and died
    batches_reap()
    assert BatchLine.objects.get(pk=lost.pk).status == "pending"
    # This lane runs the three lines, or fewer if another lane got to one first: each is recorded once either way.
    assert 1 <= batch_lines_run(model_name=MODEL) <= 3
    assert not BatchLine.objects.filter(batch_id=batch_id, status__in=["pending", "running"]).exists()
    batch_line_run(line=lost)  # the dead worker's attempt reports after all: it no longer holds the line
    batch = retrieve(client, batch_id)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    output = content(client, batch["output_file_id"])
    assert sorted(line["custom_id"] for line in output) == ["0", "1", "2"]
    assert len({line["response"]["request_id"] for line in output}) == 3


def test_the_reaper_restarts_lanes_for_a_model_whose_lanes_were_lost(client, smollm2, files_dir, lanes_left_queued):
    create(client, [chat_line("a")])
    get_redis().delete(smollm2.queue)  # the lanes' messages are gone (Redis restarted, say)
    batches_reap()
    assert get_redis().llen(smollm2.queue) == 3


def test_an_overdue_batch_expires_keeping_what_finished(client, smollm2, files_dir, lanes_left_queued):
    from datetime import timedelta

    from django.utils import timezone

    batch_id = create(client, [chat_line(str(i)) for i in range(3)])["id"]
    batch_line_run(line=batch_line_claim(model=smollm2))
    Batch.objects.filter(pk=batch_id).update(expires_at=timezone.now() - timedelta(seconds=1))
    batches_reap()
    batch = retrieve(client, batch_id)
    assert batch["status"] == "expired" and batch["expired_at"]
    assert batch["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    errors = content(client, batch["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("1", "batch_expired"), ("2", "batch_expired")]


def test_the_reaper_finalizes_a_batch_whose_finalizer_died(client, smollm2, files_dir, lanes_left_queued):
    batch_id = create(client, [chat_line("a")])["id"]
    line = batch_line_claim(model=smollm2)
    Batch.objects.filter(pk=batch_id).update(finalizer="gone-host:1")  # it claimed the batch, then died
    batch_line_run(line=line)
    assert Batch.objects.get(pk=batch_id).status == "in_progress"
    batches_reap()
    assert retrieve(client, batch_id)["status"] == "completed"


def test_a_running_batchs_input_file_cannot_be_deleted(client, smollm2, files_dir, lanes_left_queued):
    batch = create(client, [chat_line("a")])
    response = client.delete(f"/v1/files/{batch['input_file_id']}")
    assert response.status_code == 400 and response.json()["error"]["param"] == "file_id"


def test_the_model_of_a_line_may_be_an_alias(client, smollm2, files_dir):
    from models_app.models import ModelAlias

    ModelAlias.objects.create(model=smollm2, name="gpt-4o-mini")
    batch = retrieve(client, create(client, [chat_line("a", model="gpt-4o-mini")])["id"])
    assert batch["request_counts"]["completed"] == 1 and batch["model"] == MODEL
    assert HELLO  # the line asked what HELLO asks


def test_a_line_whose_worker_dies_under_it_twice_goes_to_the_error_file_as_worker_lost(client, smollm2, files_dir,
                                                                                       lanes_left_queued):  # fmt: skip
    batch_id = create(client, [chat_line("deadly"), chat_line("fine")])["id"]
    for attempt in (1, 2):
        line = batch_line_claim(model=smollm2)  # the oldest waiting line: the deadly one again after a requeue
        assert (line.custom_id, line.attempts) == ("deadly", attempt)
        BatchLine.objects.filter(pk=line.pk).update(worker=f"gone-host:{attempt}")  # its worker died running it
        batches_reap()
    assert BatchLine.objects.get(pk=line.pk).status == "failed"  # not requeued a third time
    assert batch_lines_run(model_name=MODEL) == 1
    batch = retrieve(client, batch_id)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert [line["custom_id"] for line in content(client, batch["output_file_id"])] == ["fine"]
    (lost,) = content(client, batch["error_file_id"])
    assert lost["custom_id"] == "deadly" and lost["response"]["status_code"] == 500
    assert lost["response"]["body"]["error"]["code"] == "worker_lost"


def test_a_batch_that_fails_validation_after_some_chunks_were_written_leaves_nothing_behind(client, smollm2,
                                                                                            files_dir):  # fmt: skip
    lines = [chat_line(str(i), model="no-such-model" if i % 100 == 0 else MODEL) for i in range(1200)]
    lines[1100]["url"] = "/v1/completions"  # found after two chunks (with refused lines and their log rows) exist
    batch = retrieve(client, create(client, lines)["id"])
    assert batch["status"] == "failed"
    assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == [("mismatched_endpoint", 1101)]
    assert not BatchLine.objects.exists() and not RequestLog.objects.filter(batch_id=batch["id"]).exists()


def test_a_half_written_batch_is_never_run_and_the_reaper_removes_it_once_its_creator_is_gone(
    client, smollm2, files_dir, lanes_left_queued
):
    from datetime import timedelta

    from django.utils import timezone

    from batches.services import CREATING_KEY, CREATING_TTL_SECONDS

    batch_id = create(client, [chat_line(str(i)) for i in range(3)])["id"]
    get_redis().delete(smollm2.queue)
    # As if its creator died after writing these lines: still validating, and some lines may be missing.
    Batch.objects.filter(pk=batch_id).update(status="validating", in_progress_at=None)
    assert batch_line_claim(model=smollm2) is None
    batches_reap()  # just created: its creator may still be writing
    assert Batch.objects.get(pk=batch_id).status == "validating" and get_redis().llen(smollm2.queue) == 0
    long_ago = timezone.now() - timedelta(seconds=CREATING_TTL_SECONDS + 1)
    Batch.objects.filter(pk=batch_id).update(created=long_ago)
    get_redis().set(CREATING_KEY.format(batch_id), "1")  # ...or writing still, slowly
    batches_reap()
    assert Batch.objects.get(pk=batch_id).status == "validating"
    get_redis().delete(CREATING_KEY.format(batch_id))  # its creator stopped saying so
    batches_reap()
    batch = retrieve(client, batch_id)
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "batch_creation_interrupted"
    assert not BatchLine.objects.filter(batch_id=batch_id).exists()


def test_a_line_two_workers_reach_for_at_the_same_moment_is_taken_by_one_only(client, smollm2, files_dir,
                                                                               lanes_left_queued):  # fmt: skip
    import threading

    from django.db import connection, connections, transaction

    from tests.test_faults import wait_for

    if connection.vendor != "postgresql":
        pytest.skip("SQLite lets one writer at a time through; the race is PostgreSQL's row locks")
    create(client, [chat_line("only")])
    line = BatchLine.objects.get()
    held, release, claims = threading.Event(), threading.Event(), []

    def other_worker() -> None:  # takes the line and holds its row lock until told to commit
        with transaction.atomic():
            BatchLine.objects.filter(pk=line.pk).update(status="running", worker="other-host:1", request_id="theirs")
            held.set()
            release.wait(60)
        connections.close_all()

    def this_worker() -> None:  # saw the line waiting a moment ago; its claim waits on the other's lock
        claims.append(batch_line_claim(model=smollm2))
        connections.close_all()

    threads = [threading.Thread(target=other_worker)]
    threads[0].start()
    held.wait(60)
    threads.append(threading.Thread(target=this_worker))
    threads[1].start()
    with connection.cursor() as cursor:

        def waiting_on_the_lock() -> bool:
            cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
            return cursor.fetchone()[0] > 0

        wait_for(waiting_on_the_lock, 60, "the second claim never waited on the first one's lock")
    release.set()
    for thread in threads:
        thread.join(60)
    assert claims == [None]
    assert BatchLine.objects.get(pk=line.pk).request_id == "theirs"


def test_a_line_whose_claim_lost_its_reply_is_put_back_by_its_own_workers_reaper(
    client, smollm2, files_dir, lanes_left_queued, monkeypatch
):
    batch_id = create(client, [chat_line("a")])["id"]

    def reply_lost(*args, **kwargs):  # the claim's UPDATE committed, then the database went away
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(BatchLine.objects, "select_related", reply_lost)
    with pytest.raises(OperationalError):
        batch_line_claim(model=smollm2)
    monkeypatch.undo()
    line = BatchLine.objects.get(batch_id=batch_id)
    assert (line.status, line.worker) == ("running", WORKER_ID)  # this worker's, says the row; none of its lanes has it
    held = batch_line_claim(model=smollm2)
    assert held is None  # nothing else to take
    batches_reap()
    assert BatchLine.objects.get(pk=line.pk).status == "pending"
    assert batch_lines_run(model_name=MODEL) == 1
    batch = retrieve(client, batch_id)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 1, "completed": 1, "failed": 0}


def test_a_line_whose_result_could_not_be_written_runs_again(client, smollm2, files_dir, lanes_left_queued):
    batch_id = create(client, [chat_line("a"), chat_line("b")])["id"]
    held = batch_line_claim(model=smollm2)
    lost = batch_line_claim(model=smollm2)

    def database_away(execute, sql, params, many, context):
        if sql.startswith(f'UPDATE "{BatchLine._meta.db_table}"') and '"output"' in sql:
            raise OperationalError("database is locked")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(database_away), pytest.raises(OperationalError):
        batch_line_run(line=lost)
    assert BatchLine.objects.get(pk=lost.pk).status == "running"
    batches_reap()
    assert BatchLine.objects.get(pk=lost.pk).status == "pending"
    assert BatchLine.objects.get(pk=held.pk).status == "running"  # a line a lane of this worker holds stays its own
    batch_line_run(line=held)
    assert batch_lines_run(model_name=MODEL) == 1
    batch = retrieve(client, batch_id)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
