"""Batches through the official openai SDK against a real `manage.py serve` (daphne, a Celery worker process,
Redis, SmolLM2): good and bad lines, a worker SIGKILLed mid-batch, a cancel mid-run."""

import json
import signal
import time

import openai
import psutil
import pytest

from batches.models import BatchLine
from tests.batches.test_files import chat_line, jsonl
from tests.openapi import assert_schema

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


@pytest.fixture
def client(minerva_server, smollm2):
    with openai.OpenAI(base_url=minerva_server.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def long_line(custom_id: str) -> dict:
    story = [{"role": "user", "content": f"Story {custom_id}"}]
    return chat_line(custom_id, max_tokens=40, ignore_eos=True, messages=story)


def submit(client, lines):
    uploaded = client.files.create(file=("requests.jsonl", jsonl(*lines)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def wait_until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)
    return result


def finished(client, batch_id: str, seconds: float = 240):
    def done():
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled", "expired") else None

    return wait_until(done, seconds, f"batch {batch_id} to end")


def results(client, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def test_the_sdk_runs_a_batch_of_good_and_bad_lines_to_completion(client):
    lines = [chat_line("a"), chat_line("b", max_tokens=3), chat_line("c", model="nope"), chat_line("d", n=0)]
    batch = submit(client, lines)
    assert batch.status == "in_progress"
    batch = finished(client, batch.id)
    assert_schema("Batch", batch.model_dump(exclude_none=True))
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 2, 2)
    output, errors = results(client, batch.output_file_id), results(client, batch.error_file_id)
    assert sorted(line["custom_id"] for line in output) == ["a", "b"]
    assert {line["custom_id"]: line["response"]["status_code"] for line in errors} == {"c": 404, "d": 400}
    b = next(line for line in output if line["custom_id"] == "b")["response"]["body"]
    assert b["choices"][0]["finish_reason"] == "length" and b["usage"]["completion_tokens"] == 3
    assert batch.id in [listed.id for listed in client.batches.list(limit=5).data]


def test_a_worker_killed_mid_batch_loses_and_duplicates_no_line(client, minerva_server):
    ids = [f"line-{i}" for i in range(12)]
    batch = submit(client, [long_line(i) for i in ids])
    lines = BatchLine.objects.filter(batch_id=batch.id)
    wait_until(lambda: lines.filter(status="completed").count() >= 2 and lines.filter(status="running").exists(),
               120, "lines to run")  # fmt: skip
    (worker,) = [p for p in psutil.Process(minerva_server.process.pid).children() if "celery" in " ".join(p.cmdline())]
    worker.send_signal(signal.SIGKILL)  # `serve` starts a new worker; its reaper requeues what the dead one held
    batch = finished(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 12, 0)
    output = results(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(ids)  # each exactly once
    assert all(line["response"]["body"]["usage"]["completion_tokens"] == 40 for line in output)
    assert results(client, batch.error_file_id) == []


def test_cancelling_mid_run_keeps_finished_lines_and_accounts_for_every_line(client):
    ids = [f"line-{i}" for i in range(30)]
    batch = submit(client, [long_line(i) for i in ids])
    wait_until(lambda: BatchLine.objects.filter(batch_id=batch.id, status="completed").exists(), 120, "a line")
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = finished(client, batch.id, seconds=60)
    assert batch.status == "cancelled"
    output, errors = results(client, batch.output_file_id), results(client, batch.error_file_id)
    assert batch.request_counts.completed == len(output) >= 1
    assert batch.request_counts.failed == 0 and batch.request_counts.total == 30
    assert all(line["error"]["code"] == "batch_cancelled" for line in errors)
    assert sorted(line["custom_id"] for line in output + errors) == sorted(ids)  # each exactly once
    assert len(output) < 30  # it did stop early
