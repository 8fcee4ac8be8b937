"""@api_view: the one place an API request (/v1, Ollama's /api) gets its id, its key and edge checks, its method
check, its error rendering (in its surface's shape) and, when the view did not hand it to a worker, its
request-log row. @openai_view is it with OpenAI's error shape."""

import asyncio
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from access.models import ApiKey
from access.services import Limits, auth_required, client_address, key_authenticate, rate_limit_check, tokens_used
from core.errors import (
    InvalidHost,
    InvalidRequest,
    MethodNotAllowed,
    MinervaError,
    OriginNotAllowed,
    PermissionDenied,
    RequestTooLarge,
    ServerError,
    ServiceUnavailable,
)
from inference.services import request_log_record

from .bodies import json_check

logger = logging.getLogger(__name__)


def api_view(*, methods: tuple[str, ...], render_error: Callable[[MinervaError], HttpResponse], sessions: bool = False):
    """Wrap an async API view; `render_error` turns a MinervaError into the surface's error response (it must set
    `response.minerva_error`, which the request log reads). With `sessions`, a request without a key may come from
    a staff user's admin session instead (with Django's CSRF check): `request.staff_session` says so."""

    allowed = (*methods, "HEAD") if "GET" in methods and "HEAD" not in methods else methods

    def decorate(view):
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            request.request_id = uuid.uuid4().hex
            request.request_logged = False  # set by views once a worker owns the request's log row
            request.log_model = ""
            request.api_key, limits = None, None
            request.staff_session = False
            request.audit = {
                "client_ip": client_address(request.META),
                "user_agent": request.headers.get("User-Agent", "")[:255],
                "retry_count": _retry_count(request.headers.get("X-Stainless-Retry-Count", "")),
            }
            try:
                # A foreign Host or a web page's Origin before anything else; a CORS preflight ends here.
                response = browser_check(request)
                if response is None:
                    # The key next: a caller without one learns nothing, not even which methods a path takes.
                    header = authorization_header(request)
                    if sessions and not header:
                        request.staff_session = await staff_session_check(request)
                    if header or (auth_required() and not request.staff_session):
                        request.api_key, limits = await sync_to_async(_access)(header)
                    request.audit["api_key_prefix"] = request.api_key.prefix if request.api_key else ""
                    if request.headers.get(BODY_REFUSED) == "too-large":  # daphne did not read it (daphne.py)
                        raise RequestTooLarge("The request body is too large.")
                    head = request.method == "HEAD" and "HEAD" not in methods
                    if request.method not in allowed:
                        raise MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
                    if head:  # answered as a GET (monitors, `curl -I`); daphne sends the headers only
                        request.method = "GET"
                    try:
                        response = await view(request, *args, **kwargs)
                    finally:
                        if head:  # the log row says what was asked
                            request.method = "HEAD"
            except MinervaError as exc:
                response = render_error(exc)
                if isinstance(exc, MethodNotAllowed):
                    response["Allow"] = ", ".join(allowed)
            except (OperationalError, InterfaceError):  # unreachable, or locked past the busy timeout
                logger.warning("database unavailable for %s", request.request_id, exc_info=True)
                response = render_error(DATABASE_UNAVAILABLE)
            except RedisError:
                logger.warning("Redis unavailable for %s", request.request_id, exc_info=True)
                response = render_error(REDIS_UNAVAILABLE)
            except Exception:
                logger.exception("unhandled error in %s (request %s)", request.path, request.request_id)
                response = render_error(ServerError())
            if limits and limits.tpm is not None and request.method == "POST" and response.status_code < 400:
                limits.tokens = await _tokens_now(request.api_key, limits.tokens)  # with this request's reservation
            for header, value in (limits.headers() if limits else {}).items():
                response.setdefault(header, value)  # a 429 from the token reservation carries newer counts
            response["x-request-id"] = f"req_{request.request_id}"
            response["X-Content-Type-Options"] = "nosniff"
            if not request.request_logged:
                error = getattr(response, "minerva_error", None)
                try:
                    await sync_to_async(request_log_record)(
                        request_id=request.request_id,
                        endpoint=request.path,
                        route=route_label(request),
                        method=request.method,
                        model=request.log_model,
                        status_code=response.status_code,
                        error_type=error.type if error else "",
                        error_code=(error.code or "") if error else "",
                        audit=request.audit,
                    )
                except (OperationalError, InterfaceError):  # the database is away: the server log keeps it
                    logger.error("request %s %s %s -> %s not logged: database unavailable", request.request_id,
                                 request.method, request.path, response.status_code)  # fmt: skip
            return response

        return wrapper

    return decorate


def openai_view(*, methods: tuple[str, ...]):
    """@api_view with OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    return api_view(methods=methods, render_error=error_response)


DATABASE_UNAVAILABLE = ServiceUnavailable(
    "The database is unavailable; try again shortly.", code="database_unavailable"
)
REDIS_UNAVAILABLE = ServiceUnavailable("Redis is unavailable; try again shortly.", code="redis_unavailable")


async def staff_session_check(request: HttpRequest) -> bool:
    """Whether the request comes from a staff user's admin session and passes Django's CSRF check (a page's
    fetch sends the token as X-CSRFToken). Only paths outside /v1 and /api pass the session middleware."""
    if not hasattr(request, "auser"):
        return False
    user = await request.auser()
    if not user.is_staff:
        return False
    if CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is not None:
        raise PermissionDenied("CSRF check failed: send the page's CSRF token as X-CSRFToken.", code="csrf_failed")
    return True


def authorization_header(request: HttpRequest) -> str:
    """The request's Authorization header; Anthropic's clients send the key as `x-api-key` instead."""
    header = request.headers.get("Authorization", "")
    x_api_key = request.headers.get("x-api-key", "").strip()
    return f"Bearer {x_api_key}" if x_api_key and not header else header


def _access(header: str) -> tuple[ApiKey | None, Limits | None]:
    """The request's key and its rate-limit state (one trip to the sync thread for both)."""
    key = key_authenticate(header)
    return key, rate_limit_check(key=key) if key is not None else None


async def _tokens_now(key: ApiKey, before: int) -> int:
    """The key's tokens in this minute after the view ran (`before`, read with the key, left out what the request
    reserved), for its x-ratelimit-remaining-tokens; `before` if Redis is away."""
    try:
        return await sync_to_async(tokens_used)(key=key)
    except RedisError:
        return before


def error_response(exc: MinervaError) -> JsonResponse:
    """An error in OpenAI's shape, with the headers its status calls for."""
    return error_headers(JsonResponse(exc.to_dict(), status=exc.status), exc)


def error_headers(response: HttpResponse, exc: MinervaError) -> HttpResponse:
    """Mark a surface's error response with its error (for the request log) and add the headers its status calls
    for: Retry-After on a 503, WWW-Authenticate on a 401, and the error's own (a 429's rate-limit counts)."""
    response.minerva_error = exc
    if exc.status == 503:
        response["Retry-After"] = str(getattr(exc, "retry_after", 1))
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="minerva"'
    for header, value in getattr(exc, "headers", {}).items():
        response[header] = value
    return response


BODY_REFUSED = "X-Minerva-Body-Refused"  # set by minerva_project/daphne.py only
PREFLIGHT_HEADERS = "Authorization, Content-Type, X-Stainless-Retry-Count"


def browser_check(request: HttpRequest) -> HttpResponse | None:
    """Refuse a Host that is not ours (a DNS-rebinding page) and a browser request from an origin that is not
    allowed, whatever its method or Content-Type (a `text/plain` POST needs no preflight); answer the preflight
    of an allowed one. None: carry on. Requests without an Origin (curl, SDKs) are not browsers' and go on."""
    try:
        request.get_host()
    except DisallowedHost:
        raise InvalidHost(
            "The Host header names a host this server does not answer for (MINERVA_ALLOWED_HOSTS)."
        ) from None
    origin = request.headers.get("Origin")
    if origin is None:
        # A page's <img> or <script> sends no Origin, but browsers mark it; following a link is fine.
        fetch = request.headers.get("Sec-Fetch-Site"), request.headers.get("Sec-Fetch-Mode")
        if fetch[0] == "cross-site" and fetch[1] != "navigate":
            raise OriginNotAllowed("Cross-site requests from browsers are not allowed.")
        return None
    if not origin_allowed(request, origin):
        raise OriginNotAllowed(f"Requests from the origin {origin[:200]} are not allowed (MINERVA_CORS_ORIGINS).")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response = HttpResponse(status=204)
        response["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        requested = request.headers.get("Access-Control-Request-Headers", "")
        response["Access-Control-Allow-Headers"] = requested[:2000] or PREFLIGHT_HEADERS  # the SDKs' x-stainless-*
        response["Access-Control-Max-Age"] = "600"
        return response
    return None


def origin_allowed(request: HttpRequest, origin: str) -> bool:
    """The server's own origin (a page it serves), MINERVA_CORS_ORIGINS, and the origins the admin's forms may
    be posted from behind a proxy (MINERVA_CSRF_TRUSTED_ORIGINS)."""
    if origin in settings.CORS_ORIGINS or origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    return origin == f"{request.scheme}://{request.get_host()}"


def route_label(request: HttpRequest) -> str:
    """The URL pattern a request matched (`/v1/files/{file_id}`), or `unmatched`: a bounded metrics label,
    where the raw path would let any caller add series without end."""
    match = getattr(request, "resolver_match", None)
    if match is None or match.url_name == "unmatched":
        return "unmatched"
    route = re.sub(r"\(\?P<(\w+)>(?:[^()]|\([^()]*\))*\)", r"{\1}", match.route)  # re_path groups
    route = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)  # path() converters
    return "/" + route.replace("^", "").replace("$", "")


def _retry_count(raw: str) -> int:
    return int(raw) if raw.isdigit() and len(raw) < 6 else 0


NOT_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library "
    "correctly. This API expects a JSON payload, but what was sent was not valid JSON.)"
)
INLINE_BODY_BYTES = 64 * 1024  # smaller bodies cannot hold enough values to stall the event loop
_checker: ProcessPoolExecutor | None = None


async def parse_body(request: HttpRequest, model: type[BaseModel]) -> BaseModel:
    """Validate the JSON body into `model`, turning every fault into a 400/413 that names the parameter. A large
    body is first parsed and counted in another process (api/bodies.py), so the event loop never spends more
    than milliseconds on one: running streams keep flowing whatever arrives."""
    global _checker
    try:
        raw = request.body
    except RequestDataTooBig:
        raise RequestTooLarge("The request body is too large.") from None
    if len(raw) > INLINE_BODY_BYTES:
        # Spawned, not forked (daphne runs threads; the check needs nothing of Django), and niced: it must not
        # take the CPU from the worker's decoding.
        if _checker is None:
            _checker = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=os.nice, initargs=(10,))  # fmt: skip
        verdict = await asyncio.wrap_future(_checker.submit(json_check, raw))
        if verdict:
            raise InvalidRequest(NOT_JSON if verdict == "invalid" else verdict)
    try:
        data = json.loads(raw, parse_constant=_not_json, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise InvalidRequest(NOT_JSON) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if isinstance(data.get("model"), str):
        request.log_model = data["model"][:255]
    if b"\\ud" in raw.lower():
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequest("The request contains invalid Unicode (a lone surrogate).") from None
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    unknown = set(data) - set(model.model_fields)
    if unknown:
        logger.info("ignoring unknown fields %s in request %s", sorted(unknown), request.request_id)
    return body


def _not_json(constant: str):
    # Python's json accepts NaN and Infinity, which JSON does not; let through, they would reach the request-log
    # row as invalid JSON (a 500 from the database) and sampling code as numbers that compare false with anything.
    raise ValueError(f"{constant} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: valid JSON, but no double holds it
        raise ValueError(f"{text[:20]} is out of range")
    return value


# Names pydantic puts in `loc` for the branch of a union it tried; they are not request fields.
_UNION_TAGS = {"str", "int", "float", "bool", "none", "text", "image_url", "input_audio", "file", "refusal"}


def validation_error(exc: ValidationError) -> InvalidRequest:
    """The first pydantic error as an OpenAI error: `param` is the dotted path, e.g. `messages[0].role`."""
    error = exc.errors(include_url=False)[0]
    param = ""
    for part in error["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part not in _UNION_TAGS and "[" not in part and "-" not in part:
            param += f".{part}" if param else part
    if error["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param or None)
    return InvalidRequest(f"Invalid value for '{param}': {error['msg']}.", param=param or None)
