"""Files: uploads streamed to a temp file under FILES_DIR (never held in memory), checked line by line when they are
a batch's input, then kept in the files storage (batches/storage.py) and described by File rows. Files and batches
belong to the API key that made them."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.db import transaction
from django.db.models import Q

from access.models import ApiKey
from core.errors import InvalidRequest, NotFound, RequestTooLarge

from .models import Batch, File
from .storage import LocalFile, files_storage

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
UPLOAD_PURPOSES = (File.Purpose.BATCH, File.Purpose.USER_DATA)


def _temp_path(prefix: str) -> Path:
    """A new empty file in FILES_DIR: on the same filesystem as the default storage's files, so keeping it is a
    rename there."""
    settings.FILES_DIR.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=settings.FILES_DIR, prefix=prefix)
    os.close(fd)
    return Path(name)


class DiskUpload(UploadedFile):
    """An uploaded file already on disk at `path`."""

    def __init__(self, path: Path, name: str, size: int):
        super().__init__(file=None, name=name, size=size)
        self.path = path


class CappedUploadHandler(FileUploadHandler):
    """Writes each uploaded file straight to a temp file in FILES_DIR, refusing one larger than MAX_FILE_BYTES."""

    def __init__(self, request=None):
        super().__init__(request)
        self.paths: list[Path] = []  # every temp file made, for the caller to clean up

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self.paths.append(_temp_path(".upload-"))
        self.out = self.paths[-1].open("wb")
        self.size = 0

    def receive_data_chunk(self, raw_data, start):
        self.size += len(raw_data)
        if self.size > settings.MAX_FILE_BYTES:
            self.out.close()
            raise RequestTooLarge(f"The file is larger than the limit of {settings.MAX_FILE_BYTES} bytes.")
        self.out.write(raw_data)

    def file_complete(self, file_size):
        self.out.close()
        return DiskUpload(self.paths[-1], self.file_name, file_size)


def owned(queryset, *, api_key: ApiKey | None):
    """The rows (File or Batch) a request with `api_key` may see: its key's own (without a key, those made without
    one); a staff key sees every key's. Others' rows are not there at all: a 404, never a 403 that admits them."""
    if api_key is not None and api_key.staff:
        return queryset
    return queryset.filter(api_key_prefix=api_key.prefix if api_key is not None else "")


def file_create(*, path: Path, filename: str, purpose: str, api_key: ApiKey | None) -> File:
    """Keep the file at `path` (moved, not copied) as a new File of `api_key`; a batch input file must pass its
    checks."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}.", param="purpose")
    if purpose == File.Purpose.BATCH:
        with path.open("rb") as f:
            if not sum(1 for _ in batch_input_lines(f)):  # reads every line
                raise InvalidRequest("The file holds no requests.", param="file")
    with transaction.atomic():
        file = File.objects.create(filename=filename[:255] or "upload", purpose=purpose, bytes=path.stat().st_size,
                                   api_key_prefix=api_key.prefix if api_key is not None else "")  # fmt: skip
        with LocalFile(path) as content:  # if this fails the row goes too
            files_storage().save(file.id, content)
    return file


def file_import(*, source: Path, purpose: str) -> File:
    """Copy a local file in (the `batch` command's upload; it belongs to no key)."""
    temp = _temp_path(".import-")
    try:
        with source.open("rb") as src, temp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        return file_create(path=temp, filename=source.name, purpose=purpose, api_key=None)
    finally:
        temp.unlink(missing_ok=True)


def file_get(file_id: str, *, api_key: ApiKey | None, operator: bool = False) -> File:
    """The file with that id if `api_key` may see it (an operator sees every file), or a 404."""
    files = File.objects.all() if operator else owned(File.objects.all(), api_key=api_key)
    file = files.filter(pk=file_id).first()
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return file


def file_delete(*, file: File) -> None:
    """Delete a file's row and bytes, unless a batch still running reads it."""
    if Batch.objects.filter(input_file=file, status__in=Batch.ACTIVE).exists():
        raise InvalidRequest(f"File {file.id} is the input of a batch that is still running.", param="file_id")
    name = file.id  # delete() clears it
    file.delete()
    files_storage().delete(name)


def file_object(file: File) -> dict:
    """The OpenAI File object."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created.timestamp()),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
    }


def page(queryset, *, after: str | None, limit: int, ascending: bool = False) -> tuple[list, bool]:
    """A page of `queryset` (File or Batch rows) by creation, after the object with id `after`; and whether more
    follow. Rows created in the same instant are ordered by id."""
    order = ("created", "id") if ascending else ("-created", "-id")
    queryset = queryset.order_by(*order)
    if after:
        anchor = queryset.filter(pk=after).values("created").first()
        if anchor is None:
            raise InvalidRequest(f"No object with id {after} to list after.", param="after")
        if ascending:
            queryset = queryset.filter(Q(created__gt=anchor["created"]) | Q(created=anchor["created"], id__gt=after))
        else:
            queryset = queryset.filter(Q(created__lt=anchor["created"]) | Q(created=anchor["created"], id__lt=after))
    rows = list(queryset[: limit + 1])
    return rows[:limit], len(rows) > limit


def batch_input_lines(f) -> Iterator[tuple[int, int, dict]]:
    """(line number, byte offset, request) for each request of a batch input file (open, binary), read one line at a
    time. Raises InvalidRequest naming the first malformed line; blank lines are skipped."""
    seen: set[str] = set()
    number, offset = 0, 0
    while raw := f.readline(settings.MAX_BODY_BYTES + 1):
        number, start, offset = number + 1, offset, offset + len(raw)
        if len(raw) > settings.MAX_BODY_BYTES:
            raise _line_error(number, f"is longer than {settings.MAX_BODY_BYTES} bytes (MINERVA_MAX_BODY_BYTES)")
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            raise _line_error(number, "is not valid JSON") from None
        problem = _line_problem(line, seen)
        if problem:
            raise _line_error(number, problem)
        yield number, start, line


def _line_problem(line, seen: set[str]) -> str | None:
    if not isinstance(line, dict):
        return "is not a JSON object"
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "needs a custom_id string"
    if len(custom_id) > 512 or "\x00" in custom_id or not _encodes(custom_id):
        return "has a custom_id longer than 512 characters, or with a NUL or a lone surrogate"
    if custom_id in seen:
        return f"repeats custom_id {custom_id!r}; each must be unique"
    seen.add(custom_id)
    if line.get("method") != "POST":
        return 'needs "method": "POST"'
    if line.get("url") not in BATCH_URLS:
        return f"needs a url among {', '.join(BATCH_URLS)}"
    if not isinstance(line.get("body"), dict):
        return "needs a body object"
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"), which no database column can hold
        return False
    return True


def _line_error(number: int, problem: str) -> InvalidRequest:
    return InvalidRequest(f"Line {number} of the file {problem}.", param="file", code="invalid_batch_line")
