"""/v1/files and /v1/batches: thin async views over batches.files and batches.services (wired in
minerva_project/urls.py before api.urls, whose catch-all would answer first). Each sees only the rows of the
request's key (batches.files.owned)."""

from typing import Annotated

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.multipartparser import MultiPartParserError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from access.models import ApiKey
from api.decorators import openai_view, parse_body
from core.errors import InvalidRequest, RequestTooLarge

from .files import CappedUploadHandler, file_create, file_delete, file_get, file_object, owned, page
from .models import Batch, File
from .services import batch_cancel, batch_create, batch_get, batch_object

CHUNK_BYTES = 64 * 1024


class CreateBatchRequest(BaseModel):
    """POST /v1/batches (https://platform.openai.com/docs/api-reference/batch/create)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    input_file_id: str = Field(min_length=1, max_length=40, description="A file uploaded with purpose batch.")
    endpoint: str = Field(description="/v1/chat/completions, /v1/completions or /v1/embeddings.")
    completion_window: str = Field(description="Only 24h.")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16, description="Up to 16 string pairs kept with the batch."
    )

    @field_validator("metadata")
    @classmethod
    def _short_keys(cls, value):
        if value and any(len(key) > 64 for key in value):
            raise ValueError("keys are at most 64 characters")
        if value and any("\x00" in text for pair in value.items() for text in pair):
            raise ValueError("keys and values cannot contain NUL (U+0000)")
        return value


@openai_view(methods=("GET", "POST"))
async def files(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return JsonResponse(await sync_to_async(_upload)(request))
    return JsonResponse(await sync_to_async(_file_list)(request.GET, request.api_key))


def _upload(request: HttpRequest) -> dict:
    # Checked before anything is read: daphne has spooled the body to disk, but parsing a huge one still costs.
    if int(request.META.get("CONTENT_LENGTH") or 0) > settings.MAX_FILE_BYTES + CHUNK_BYTES:
        raise RequestTooLarge(f"The file is larger than the limit of {settings.MAX_FILE_BYTES} bytes.")
    handler = CappedUploadHandler(request)
    request.upload_handlers = [handler]
    try:
        try:
            upload, purpose = request.FILES.get("file"), request.POST.get("purpose")
        except MultiPartParserError as exc:
            raise InvalidRequest(f"The body must be multipart/form-data with a file and a purpose: {exc}") from None
        if upload is None:
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        if not purpose:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        file = file_create(path=upload.path, filename=upload.name or "upload", purpose=purpose, api_key=request.api_key)
        return file_object(file)
    finally:
        for path in handler.paths:  # whatever was not kept
            path.unlink(missing_ok=True)


def _file_list(query, api_key: ApiKey | None) -> dict:
    files = owned(File.objects.all(), api_key=api_key)
    if query.get("purpose"):
        files = files.filter(purpose=query["purpose"])
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc.", param="order")
    limit = _limit(query, 10_000, 10_000)
    rows, has_more = page(files, after=query.get("after"), limit=limit, ascending=order == "asc")
    return _listing([file_object(f) for f in rows], has_more)


def _limit(query, most: int, default: int) -> int:
    raw = query.get("limit") or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"limit must be an integer from 1 to {most}.", param="limit")
    return int(raw)


def _listing(data: list[dict], has_more: bool) -> dict:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}


@openai_view(methods=("GET", "DELETE"))
async def file(request: HttpRequest, file_id: str) -> HttpResponse:
    found = await sync_to_async(file_get)(file_id, api_key=request.api_key)
    if request.method == "DELETE":
        await sync_to_async(file_delete)(file=found)
        return JsonResponse({"id": file_id, "object": "file", "deleted": True})
    return JsonResponse(file_object(found))


@openai_view(methods=("GET",))
async def file_content(request: HttpRequest, file_id: str) -> HttpResponse:
    file = await sync_to_async(file_get)(file_id, api_key=request.api_key)
    return await sync_to_async(file_download)(file)  # opening may read the database (the database storage)


def file_download(file: File) -> StreamingHttpResponse:
    """A file's bytes, streamed (the API's download and the admin's)."""
    handle = file.open()  # opened now: on a disk, a delete during the download does not cut it short
    response = StreamingHttpResponse(_chunks(handle), content_type="application/octet-stream")
    response["Content-Length"] = str(file.bytes)
    response["Content-Disposition"] = f'attachment; filename="{file.id}.jsonl"'
    return response


async def _chunks(handle):
    # An async iterator: under ASGI, Django reads a sync one (FileResponse's) whole into memory before sending.
    with handle:
        # On Django's sync thread: with the database storage a read is a query, and Django manages that connection.
        while chunk := await sync_to_async(handle.read)(CHUNK_BYTES):
            yield chunk


@openai_view(methods=("GET", "POST"))
async def batches(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        body = await parse_body(request, CreateBatchRequest)
        return JsonResponse(await sync_to_async(_batch_create)(body, request.api_key))
    return JsonResponse(await sync_to_async(_batch_list)(request.GET, request.api_key))


def _batch_create(body: CreateBatchRequest, api_key: ApiKey | None) -> dict:
    return batch_object(batch_create(**body.model_dump(), api_key=api_key))


def _batch_list(query, api_key: ApiKey | None) -> dict:
    batches = owned(Batch.objects.all(), api_key=api_key)
    rows, has_more = page(batches, after=query.get("after"), limit=_limit(query, 100, 20))
    return _listing([batch_object(b) for b in rows], has_more)


@openai_view(methods=("GET",))
async def batch(request: HttpRequest, batch_id: str) -> HttpResponse:
    return JsonResponse(await sync_to_async(lambda: batch_object(batch_get(batch_id, api_key=request.api_key)))())


@openai_view(methods=("POST",))
async def cancel_batch(request: HttpRequest, batch_id: str) -> HttpResponse:
    def cancel() -> dict:
        return batch_object(batch_cancel(batch=batch_get(batch_id, api_key=request.api_key)))

    return JsonResponse(await sync_to_async(cancel)())
