"""/v1/files: uploads streamed to disk with a size cap, batch input files checked line by line, downloads."""

import json

import pytest
from asgiref.sync import sync_to_async

from batches.models import File
from inference.models import RequestLog
from tests.conftest import HELLO, MODEL
from tests.openapi import assert_schema

pytestmark = pytest.mark.django_db(transaction=True)


def jsonl(*lines) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def chat_line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 0, **body}}  # fmt: skip


async def upload(async_client, content: bytes, purpose: str = "batch", name: str = "requests.jsonl"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return await async_client.post("/v1/files", {"purpose": purpose, "file": SimpleUploadedFile(name, content)})


async def test_an_uploaded_file_can_be_listed_retrieved_downloaded_and_deleted(async_client, settings, tmp_path):
    settings.FILES_DIR = tmp_path
    content = jsonl(chat_line("a"), chat_line("b"))
    response = await upload(async_client, content)
    assert response.status_code == 200, response.content
    created = response.json()
    assert_schema("OpenAIFile", created)
    assert (created["bytes"], created["filename"], created["purpose"]) == (len(content), "requests.jsonl", "batch")
    assert (tmp_path / created["id"]).read_bytes() == content

    listed = (await async_client.get("/v1/files?purpose=batch")).json()
    assert_schema("ListFilesResponse", listed)
    assert [f["id"] for f in listed["data"]] == [created["id"]]
    assert (await async_client.get(f"/v1/files/{created['id']}")).json() == created

    download = await async_client.get(f"/v1/files/{created['id']}/content")
    assert download.status_code == 200
    assert b"".join([chunk async for chunk in download.streaming_content]) == content

    deleted = await async_client.delete(f"/v1/files/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "file", "deleted": True}
    assert not (tmp_path / created["id"]).exists()
    assert (await async_client.get(f"/v1/files/{created['id']}")).status_code == 404


async def test_files_in_the_database_storage_round_trip_and_are_read_at_an_offset(async_client, settings, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    from asgiref.sync import sync_to_async

    from batches import storage
    from batches.models import File, StoredChunk

    settings.FILES_DIR, settings.FILES_STORAGE = tmp_path, "database"
    monkeypatch.setattr(storage, "CHUNK_BYTES", 64)  # lines across chunk boundaries
    content = jsonl(*(chat_line(f"line {i}") for i in range(5)))
    created = (await upload(async_client, content)).json()
    assert not (tmp_path / created["id"]).exists()  # nothing on this host's disk: every host reads it the same way
    assert await StoredChunk.objects.filter(name=created["id"]).acount() == -(-len(content) // 64)
    download = await async_client.get(f"/v1/files/{created['id']}/content")
    assert b"".join([chunk async for chunk in download.streaming_content]) == content

    def third_line() -> bytes:
        with File.objects.get(pk=created["id"]).open() as f:
            f.seek(content.index(b"line 2") - content[: content.index(b"line 2")][::-1].index(b"\n"))
            return f.readline()

    assert b"line 2" in await sync_to_async(third_line)()
    assert (await async_client.delete(f"/v1/files/{created['id']}")).json()["deleted"] is True
    assert not await StoredChunk.objects.filter(name=created["id"]).aexists()


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "Line 2 of the file is not valid JSON"),
        ('["a list"]', "Line 2 of the file is not a JSON object"),
        (json.dumps({**chat_line("a")}), "Line 2 of the file repeats custom_id 'a'"),
        (json.dumps({**chat_line("b"), "method": "GET"}), 'Line 2 of the file needs "method": "POST"'),
        (json.dumps({**chat_line("b"), "url": "/v1/images"}), "Line 2 of the file needs a url among"),
        (json.dumps({**chat_line("b"), "body": "text"}), "Line 2 of the file needs a body object"),
        (json.dumps({**chat_line("b"), "custom_id": 7}), "Line 2 of the file needs a custom_id string"),
    ],
)
async def test_a_malformed_batch_file_is_refused_with_a_400_naming_the_line(async_client, settings, tmp_path, line,
                                                                            says):  # fmt: skip
    settings.FILES_DIR = tmp_path
    response = await upload(async_client, jsonl(chat_line("a"), line))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith(says), error
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "file", "invalid_batch_line")
    # Nothing kept, no temp file left behind.
    assert not await sync_to_async(File.objects.exists)() and list(tmp_path.iterdir()) == []


async def test_a_file_over_the_size_cap_gets_a_413_and_leaves_nothing_behind(async_client, settings, tmp_path):
    settings.FILES_DIR, settings.MAX_FILE_BYTES = tmp_path, 1000
    response = await upload(async_client, b"x" * 5000, purpose="user_data")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert not await sync_to_async(File.objects.exists)() and list(tmp_path.iterdir()) == []


async def test_user_data_files_are_kept_as_they_are(async_client, settings, tmp_path):
    settings.FILES_DIR = tmp_path
    response = await upload(async_client, b"\x00\xffnot jsonl", purpose="user_data", name="blob.bin")
    assert response.status_code == 200 and response.json()["purpose"] == "user_data"


@pytest.mark.parametrize(
    ("request_kwargs", "param"),
    [({"purpose": "fine-tune"}, "purpose"), ({"purpose": None}, "purpose"), ({"file": None}, "file")],
)
async def test_uploads_without_a_file_or_a_known_purpose_are_refused(async_client, settings, tmp_path, request_kwargs,
                                                                     param):  # fmt: skip
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.FILES_DIR = tmp_path
    data = {"purpose": "batch", "file": SimpleUploadedFile("a.jsonl", jsonl(chat_line("a"))), **request_kwargs}
    response = await async_client.post("/v1/files", {k: v for k, v in data.items() if v is not None})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_files_list_in_pages_with_after_and_limit(async_client, settings, tmp_path):
    settings.FILES_DIR = tmp_path
    ids = [(await upload(async_client, b"x", purpose="user_data")).json()["id"] for _ in range(3)]
    first = (await async_client.get("/v1/files?limit=2")).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = (await async_client.get(f"/v1/files?limit=2&after={first['last_id']}")).json()
    assert [f["id"] for f in rest["data"]] == ids[:1] and rest["has_more"] is False
    ascending = (await async_client.get("/v1/files?order=asc")).json()
    assert [f["id"] for f in ascending["data"]] == ids
    assert (await async_client.get("/v1/files?limit=0")).json()["error"]["param"] == "limit"


async def test_every_files_request_is_logged_once(async_client, settings, tmp_path):
    settings.FILES_DIR = tmp_path
    await upload(async_client, b"x", purpose="user_data")
    await async_client.get("/v1/files/file-nope")
    rows = await sync_to_async(list)(
        RequestLog.objects.order_by("created").values_list("endpoint", "method", "status_code")
    )
    assert rows == [("/v1/files", "POST", 200), ("/v1/files/file-nope", "GET", 404)]


async def test_an_upload_name_with_a_nul_is_kept_without_it(async_client, settings, tmp_path):
    settings.FILES_DIR = tmp_path  # Django drops non-printable characters from upload names (PostgreSQL refuses NUL)
    response = await upload(async_client, jsonl(chat_line("a")), name="a\x00b.jsonl")
    assert response.status_code == 200, response.content
    assert response.json()["filename"] == "ab.jsonl"
