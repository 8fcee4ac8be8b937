"""The Ollama surface (/api/*): thin async views like the OpenAI ones. Each validates Ollama's wire format, hands
the neutral request to inference.serving, and renders the neutral deltas as Ollama's NDJSON lines (or, with
`stream: false`, their fold into one object); errors are Ollama's `{"error": "..."}`."""

import datetime
import hashlib
import json
import logging
import math
import struct
import time
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from access.services import auth_required
from core.errors import (
    InvalidRequest,
    MinervaError,
    ModelNotFound,
    NotFound,
    NotImplementedHere,
    PermissionDenied,
)
from inference.services import model_delete
from inference.serving import Generation, embedding_start, generation_start
from inference.streams import TokenStream
from inference.tools import template_thinks
from models_app.hub import HubError
from models_app.metadata import MetadataError, read_metadata
from models_app.models import LanguageModel
from models_app.pulls import pull_lines, pull_start
from models_app.selectors import model_alias_list, model_get, model_list, model_loaded_list, model_n_ctx
from models_app.services import (
    RegistryError,
    model_alias_create,
    model_alias_delete,
    model_is_pulled,
    models_set_enabled,
)

from ..decorators import api_view, error_headers, parse_body
from .protocol import (
    ChatRequest,
    CopyRequest,
    EmbeddingsRequest,
    EmbedRequest,
    Final,
    GenerateRequest,
    ListedModel,
    ModelDetails,
    ModelRequest,
    PullRequest,
    ResponseMessage,
    RunningModel,
    ShowResponse,
)

logger = logging.getLogger(__name__)

OLLAMA_VERSION = "0.12.0"  # the Ollama API level this surface follows (clients gate features on it)
NS = 1_000_000_000
ADDING_MODELS = (
    "Minerva does not {what} models. Pull a GGUF model from Hugging Face (/api/pull with owner/repo:QUANT, or "
    "`manage.py models pull`), or put a GGUF file (or a SafeTensors folder) under the models directory "
    '(MINERVA_MODELS_DIR) and run `manage.py models scan`; see the README, "Getting models".'
)


def ollama_error(exc: MinervaError) -> JsonResponse:
    """An error in Ollama's shape: `{"error": "message"}` with the error's status."""
    message = exc.message
    if isinstance(exc, ModelNotFound):
        message = f'model "{exc.model}" not found, try pulling it first'
    return error_headers(JsonResponse({"error": message}, status=exc.status), exc)


def ollama_view(*, methods: tuple[str, ...]):
    return api_view(methods=methods, render_error=ollama_error)


# ----------------------------------------------------------------------------------------------- models


@ollama_view(methods=("GET", "HEAD"))
async def version(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"version": OLLAMA_VERSION})


@ollama_view(methods=("GET", "HEAD"))
async def tags(request: HttpRequest) -> HttpResponse:
    listing = await sync_to_async(_tags)()
    if request.api_key is not None:  # a key scoped to some models sees only those (and their aliases)
        listing = [(name, entry) for name, entry in listing if request.api_key.allows(name)]
    return JsonResponse({"models": [entry for _, entry in listing]})


def _tags() -> list[tuple[str, dict]]:
    """(model name, entry) per served model and per alias, which Ollama lists like any model."""
    models = {m.name: m for m in model_list()}
    entries = [(m.name, _listed(m, m.name)) for m in models.values()]
    entries += [(target, _listed(models[target], alias)) for alias, target in model_alias_list() if target in models]
    return entries


@ollama_view(methods=("POST",))
async def show(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, ModelRequest)
    model = await _model(request, body.model_name())
    return JsonResponse((await sync_to_async(_show)(model)).model_dump())


def _show(model: LanguageModel) -> ShowResponse:
    template = model.chat_template_override
    if not template:
        try:  # the header again, not the registry row: the row keeps the template's hash, not its text
            template = read_metadata(model.path).chat_template or ""
        except MetadataError:
            template = ""
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if template_thinks(template):
        capabilities.append("thinking")
    parameters = "\n".join(
        f"{key:<30} {json.dumps(item) if isinstance(item, str) else item}"
        for key, value in sorted((model.default_params or {}).items())
        for item in (value if isinstance(value, list) else [value])
    )
    modelfile = f"# Minerva serves this model from its registry; it has no Modelfile.\nFROM {model.name}\n"
    modelfile += "".join(f"PARAMETER {line}\n" for line in parameters.splitlines())
    return ShowResponse(modelfile=modelfile, parameters=parameters, template=template, details=_details(model),
                        model_info=_model_info(model), capabilities=capabilities,
                        modified_at=_rfc3339(model.updated))  # fmt: skip


@ollama_view(methods=("GET", "HEAD"))
async def ps(request: HttpRequest) -> HttpResponse:
    running = await sync_to_async(_ps)()
    if request.api_key is not None:
        running = [entry for entry in running if request.api_key.allows(entry["model"])]
    return JsonResponse({"models": running})


def _ps() -> list[dict]:
    models = {m.name: m for m in model_list()}
    running: dict[str, dict] = {}
    for entry in model_loaded_list():
        model = models.get(entry["name"])
        if model is None or entry["name"] in running:
            continue
        size = entry.get("estimated_bytes") or model.file_size
        running[model.name] = RunningModel(
            name=model.name, model=model.name, size=size, digest=_digest(model), details=_details(model),
            expires_at=_expiry(entry["expires_at"]), size_vram=entry.get("device_bytes", 0),
            context_length=model_n_ctx(model),
        ).model_dump()  # fmt: skip
    return list(running.values())


@ollama_view(methods=("DELETE",))
async def delete(request: HttpRequest) -> HttpResponse:
    """Remove a name: an alias goes; a pulled model goes with its files (409 while requests for it are queued or
    running); any other model is disabled in the registry (its file is the administrator's)."""
    body = await parse_body(request, ModelRequest)
    _staff_only(request)
    name = body.model_name()

    def remove() -> None:
        if model_alias_delete(name=name):
            return
        model = model_get(name)
        if model_is_pulled(model):
            model_delete(model=model)
        else:
            models_set_enabled(names=[model.name], enabled=False)

    await sync_to_async(remove)()
    return HttpResponse(status=200)


@ollama_view(methods=("POST",))
async def copy(request: HttpRequest) -> HttpResponse:
    """Give a model another name: an alias in the registry."""
    body = await parse_body(request, CopyRequest)
    _staff_only(request)
    model = await _model(request, body.source)
    try:
        await sync_to_async(model_alias_create)(model=model, name=body.destination)
    except RegistryError as exc:
        raise InvalidRequest(f"Cannot copy to {body.destination!r}: {exc}.", param="destination") from None
    return HttpResponse(status=200)


@ollama_view(methods=("POST",))
async def pull(request: HttpRequest) -> HttpResponse:
    """Pull a GGUF model from Hugging Face: a pull task on the worker's pull queue (or the one already running for
    the same model, which this request then watches), its progress as Ollama's NDJSON lines."""
    body = await parse_body(request, PullRequest)
    _staff_only(request)
    ref = body.model_name()
    request.log_model = ref[:255]
    try:
        key = await sync_to_async(pull_start)(ref=ref)
    except HubError as exc:
        raise InvalidRequest(exc.message, param="model") from None
    lines = pull_lines(key, first_timeout=settings.REQUEST_TIMEOUT)
    # Wait for the line after the manifest: a repository or quant that does not exist is then a real 404, even
    # streamed, as the generation views wait for their first event.
    head = [line async for line in _until_past_manifest(lines)]
    if "error" in head[-1]:
        raise _pull_error(head[-1])
    if not body.stream:
        async for line in lines:
            if "error" in line:
                raise _pull_error(line)
        return JsonResponse({"status": "success"})
    response = StreamingHttpResponse(_pull_ndjson(head, lines), content_type="application/x-ndjson")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def _until_past_manifest(lines: AsyncIterator[dict]) -> AsyncIterator[dict]:
    async for line in lines:
        yield line
        if line.get("status") != "pulling manifest":
            return


def _pull_error(line: dict) -> MinervaError:
    return MinervaError.from_dict({"message": line["error"], "status": line.get("status_code", 500),
                                   "code": "pull_failed"})  # fmt: skip


async def _pull_ndjson(head: list[dict], lines: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Ollama's progress lines; an error after the 200 is a line `{"error": "..."}`. A client that goes away
    leaves the pull running: it belongs to whoever asks next."""
    for line in head:
        yield json.dumps(line) + "\n"
    async for line in lines:
        yield json.dumps({"error": line["error"]} if "error" in line else line) + "\n"


@ollama_view(methods=("POST",))
async def push(request: HttpRequest) -> HttpResponse:
    raise NotImplementedHere(ADDING_MODELS.format(what="push"))


@ollama_view(methods=("POST",))
async def create(request: HttpRequest) -> HttpResponse:
    raise NotImplementedHere(ADDING_MODELS.format(what="create"))


@ollama_view(methods=("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))
async def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    raise NotFound(f"404 page not found ({request.method} {request.path})")


async def _model(request: HttpRequest, name: str) -> LanguageModel:
    request.log_model = name[:255]
    model = await sync_to_async(model_get)(name)
    if request.api_key is not None and not request.api_key.allows(model.name):
        raise ModelNotFound(name)
    return model


def _staff_only(request: HttpRequest) -> None:
    """Changing the registry takes a staff key (or no key at all where keys are optional)."""
    key = request.api_key
    if (key is not None and not key.staff) or (key is None and auth_required()):
        raise PermissionDenied("Changing the model registry needs a staff key.")


def _listed(model: LanguageModel, name: str) -> dict:
    return ListedModel(name=name, model=name, modified_at=_rfc3339(model.updated), size=model.file_size,
                       digest=_digest(model), details=_details(model)).model_dump()  # fmt: skip


def _details(model: LanguageModel) -> ModelDetails:
    meta = model.metadata or {}
    family = meta.get("architecture") or ""
    return ModelDetails(format=model.format, family=family, families=[family] if family else None,
                        parameter_size=meta.get("size_label") or _count(meta.get("parameter_count")),
                        quantization_level=model.quantization or "")  # fmt: skip


def _model_info(model: LanguageModel) -> dict:
    """The header's facts under GGUF's own key names, as Ollama shows them (`llama.context_length`, ...)."""
    meta = model.metadata or {}
    arch = meta.get("architecture") or ""
    info = {"general.architecture": arch or None, "general.name": meta.get("name"),
            "general.size_label": meta.get("size_label"), "general.parameter_count": meta.get("parameter_count"),
            "general.quantization": meta.get("quantization")}  # fmt: skip
    if arch:
        for key in ("context_length", "block_count", "embedding_length", "vocab_size"):
            info[f"{arch}.{key}"] = meta.get(key)
        for key in ("head_count", "head_count_kv", "key_length", "value_length"):
            info[f"{arch}.attention.{key}"] = meta.get(key)
    return {key: value for key, value in info.items() if value is not None}


def _digest(model: LanguageModel) -> str:
    # Not the file's sha256 (hashing gigabytes per listing is too slow): one of its path, size and mtime, which
    # changes whenever the file does.
    return hashlib.sha256(f"{model.path}\0{model.file_size}\0{model.file_mtime}".encode()).hexdigest()


def _count(n: int | None) -> str:
    if not n:
        return ""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def _expiry(unix: float) -> str:
    if math.isinf(unix):  # keep_alive < 0: never; Ollama shows a date centuries away too
        return "2318-01-01T00:00:00Z"
    return _rfc3339(datetime.datetime.fromtimestamp(unix, datetime.UTC))


# ------------------------------------------------------------------------------------------ generation


@ollama_view(methods=("POST",))
async def api_chat(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, ChatRequest)
    return await _generate(request, body, chat=True)


@ollama_view(methods=("POST",))
async def api_generate(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, GenerateRequest)
    return await _generate(request, body, chat=False)


async def _generate(request: HttpRequest, body: ChatRequest | GenerateRequest, *, chat: bool) -> HttpResponse:
    began = time.monotonic()
    neutral = body.to_generation()

    def queued() -> None:
        request.request_logged = True  # from here on the worker owns the log row

    generation = await generation_start(request_id=request.request_id, endpoint=request.path, body=neutral,
                                        api_key=request.api_key, audit=request.audit, on_queued=queued)  # fmt: skip
    lines = _lines(generation, body, began=began, chat=chat)
    if body.stream:
        return _ndjson_response(generation.stream, lines)
    return JsonResponse(await _fold(lines, chat=chat))


@ollama_view(methods=("POST",))
async def api_embed(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, EmbedRequest)
    began = time.monotonic()
    vectors, prompt_tokens = await _embed(request, body)
    return JsonResponse({"model": body.model, "embeddings": vectors, "total_duration": _ns(time.monotonic() - began),
                         "load_duration": 0, "prompt_eval_count": prompt_tokens})  # fmt: skip


@ollama_view(methods=("POST",))
async def api_embeddings(request: HttpRequest) -> HttpResponse:
    body = await parse_body(request, EmbeddingsRequest)
    vectors, _ = await _embed(request, body)
    return JsonResponse({"embedding": vectors[0]})


async def _embed(request: HttpRequest, body: EmbedRequest | EmbeddingsRequest) -> tuple[list[list[float]], int]:
    def queued() -> None:
        request.request_logged = True  # from here on the worker owns the log row

    embedding = await embedding_start(request_id=request.request_id, endpoint=request.path, body=body.to_embedding(),
                                      api_key=request.api_key, audit=request.audit, on_queued=queued)  # fmt: skip
    result = await embedding.collect()
    vectors = [list(struct.unpack(f"<{len(raw) // 4}f", raw)) for raw in result.vectors]
    return vectors, result.prompt_tokens


async def _lines(generation: Generation, body: ChatRequest | GenerateRequest, *, began: float,
                 chat: bool) -> AsyncIterator[dict]:  # fmt: skip
    """The answer as Ollama streams it: a line per delta, then a `done` line with the counts and durations."""
    first = None  # when the first token came: before it, queue, load and prompt; after it, generation
    finish = "stop"

    def line(text: str = "", reasoning: str = "", calls: list[dict] | None = None, logprobs=None) -> dict:
        data: dict = {"model": body.model, "created_at": _rfc3339(datetime.datetime.now(datetime.UTC))}
        if chat:
            message = ResponseMessage(content=text, thinking=reasoning or None, tool_calls=calls or None)
            data["message"] = message.model_dump(exclude_none=True)
        else:
            data["response"] = text
            if reasoning:
                data["thinking"] = reasoning
        if logprobs is not None:
            data["logprobs"] = [_logprob(entry) for entry in logprobs]
        data["done"] = False
        return data

    async for delta in generation.deltas():
        if delta.ping:  # a quiet interval (queue, load, a long prompt): an empty line keeps proxies' timers alive
            yield line()
            continue
        if first is None and (delta.text or delta.reasoning or delta.tool_call_parts or delta.logprobs):
            first = time.monotonic()
        if delta.tool_calls:  # the end of an answer that called tools: its text, then the calls
            calls = [{"function": {"name": c["function"]["name"], "arguments": _arguments(c["function"])}}
                     for c in delta.tool_calls]  # fmt: skip
            yield line(delta.text.strip(), delta.reasoning, calls, delta.logprobs)
        elif delta.text or delta.reasoning or delta.logprobs:
            yield line(delta.text, delta.reasoning, logprobs=delta.logprobs)
        if delta.finish_reason:
            finish = "stop" if delta.finish_reason == "tool_calls" else delta.finish_reason
    end = time.monotonic()
    usage = generation.usage
    load = finish in ("load", "unload")
    first = first or end
    final = Final(done_reason=finish, total_duration=_ns(end - began), load_duration=_ns(end - began) if load else 0,
                  prompt_eval_count=usage.prompt_tokens, prompt_eval_duration=0 if load else _ns(first - began),
                  eval_count=usage.completion_tokens, eval_duration=_ns(end - first))  # fmt: skip
    yield {**line(), "done": True, **final.model_dump()}


async def _fold(lines: AsyncIterator[dict], *, chat: bool) -> dict:
    """A non-streamed answer: the stream's lines folded into its last one."""
    text, thought, calls, logprobs, last = [], [], [], [], {}
    async for last in lines:
        part = last.get("message", {}) if chat else last
        text.append(part.get("content" if chat else "response", ""))
        thought.append(part.get("thinking", ""))
        calls += part.get("tool_calls", [])
        logprobs += last.get("logprobs", [])
    result = dict(last)
    if chat:
        message = ResponseMessage(content="".join(text), thinking="".join(thought) or None, tool_calls=calls or None)
        result["message"] = message.model_dump(exclude_none=True)
    else:
        result["response"] = "".join(text)
        if any(thought):
            result["thinking"] = "".join(thought)
    if logprobs:
        result["logprobs"] = logprobs
    return result


def _arguments(function: dict) -> dict:
    """A call's arguments as the object Ollama always sends (the neutral call has the JSON text the model wrote).
    A call cut off by the token limit (done_reason `length`) has no whole object: `{}`, as the official client
    refuses anything but an object."""
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return {}
    return arguments if isinstance(arguments, dict) else {}


def _logprob(entry: dict) -> dict:
    result = {"token": entry["token"], "logprob": entry["logprob"]}
    if entry.get("top_logprobs"):
        result["top_logprobs"] = [{"token": t["token"], "logprob": t["logprob"]} for t in entry["top_logprobs"]]
    return result


def _ns(seconds: float) -> int:
    return max(int(seconds * NS), 0)


def _ndjson_response(stream: TokenStream, lines: AsyncIterator[dict]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(_ndjson(stream, lines), content_type="application/x-ndjson")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


async def _ndjson(stream: TokenStream, lines: AsyncIterator[dict]) -> AsyncIterator[str]:
    """An async generator (under ASGI a sync one would be read in full first). An error after the 200 is a line
    `{"error": "..."}`, as Ollama sends it."""
    finished = False
    try:
        async for data in lines:
            yield json.dumps(data, ensure_ascii=False) + "\n"
        finished = True
    except MinervaError as exc:
        finished = True
        yield json.dumps({"error": exc.message}, ensure_ascii=False) + "\n"
    finally:
        if not finished:  # the client went away: tell the worker to stop at its next token
            await stream.cancel()
