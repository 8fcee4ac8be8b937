"""The `batch` command and the admin's batch pages: submit, follow, fetch results, cancel, download files."""

import json
from io import StringIO

import pytest
from asgiref.sync import async_to_sync
from django.core.management import CommandError, call_command

from batches.models import Batch
from tests.batches.test_files import chat_line, jsonl

pytestmark = pytest.mark.django_db(transaction=True)


def batch(*args) -> str:
    out = StringIO()
    call_command("batch", *map(str, args), stdout=out)
    return out.getvalue()


@pytest.fixture
def requests_file(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl(chat_line("good"), chat_line("bad", model="no-such-model")))
    return path


def downloaded(response) -> bytes:
    async def read() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(read)()


def test_the_batch_command_submits_waits_and_writes_results_and_errors(smollm2, files_dir, requests_file, tmp_path):
    submitted = batch("submit", requests_file, "--wait")
    batch_id = submitted.split()[0]
    assert submitted.splitlines()[-1] == f"{batch_id} completed: 1 completed, 1 failed, 2 total"
    assert json.loads(batch("status", batch_id))["request_counts"] == {"total": 2, "completed": 1, "failed": 1}

    out = tmp_path / "out.jsonl"
    assert batch("results", batch_id, "-o", out).strip() == f"wrote {out}, {tmp_path / 'out.errors.jsonl'}"
    [good] = [json.loads(line) for line in out.read_text().splitlines()]
    [bad] = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert (good["custom_id"], good["response"]["status_code"]) == ("good", 200)
    assert (bad["custom_id"], bad["response"]["status_code"]) == ("bad", 404)


def test_the_batch_command_cancels_and_refuses_what_it_cannot_do(smollm2, files_dir, requests_file, tmp_path,
                                                                  lanes_left_queued):  # fmt: skip
    batch_id = batch("submit", requests_file).split()[0]
    assert Batch.objects.get(pk=batch_id).status == "in_progress"  # no worker takes its lane here
    with pytest.raises(CommandError, match="in_progress; its results are written when it ends"):
        batch("results", batch_id, "-o", tmp_path / "out.jsonl")
    assert batch("cancel", batch_id).strip() == f"{batch_id} cancelled"  # nothing was running: cancelled at once
    assert batch("cancel", batch_id).strip() == f"{batch_id} cancelled"  # again: the same answer
    with pytest.raises(CommandError, match="batch_nope"):
        batch("status", "batch_nope")
    with pytest.raises(CommandError, match="is not a file"):
        batch("submit", tmp_path / "missing.jsonl")


def test_the_admin_shows_progress_and_file_links_and_downloads_with_a_staff_login(admin_client, smollm2, files_dir,
                                                                                  requests_file, settings):  # fmt: skip
    settings.AUTH = "on"  # /v1/files/ wants a key; the admin's download wants a staff login
    batch_id = batch("submit", requests_file).split()[0]
    found = Batch.objects.get(pk=batch_id)
    page = admin_client.get("/admin/batches/batch/").content.decode()
    assert batch_id in page and "1 / 1 / 2" in page  # done / failed / total
    link = f"/admin/batches/file/{found.output_file_id}/content/"
    assert link in page
    assert admin_client.get(f"/v1/files/{found.output_file_id}/content").status_code == 401  # a login is no key
    response = admin_client.get(link)
    assert response.status_code == 200
    assert [json.loads(line)["custom_id"] for line in downloaded(response).splitlines()] == ["good"]
    assert admin_client.get("/admin/batches/file/file-nope/content/").status_code == 404


def test_the_admin_cancel_action_cancels_a_running_batch(admin_client, smollm2, files_dir, requests_file,
                                                         lanes_left_queued):  # fmt: skip
    batch_id = batch("submit", requests_file).split()[0]
    response = admin_client.post("/admin/batches/batch/", {"action": "cancel", "_selected_action": [batch_id]})
    assert response.status_code == 302
    assert Batch.objects.get(pk=batch_id).status == "cancelled"
