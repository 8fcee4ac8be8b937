"""@openai_view: the one place an /v1 request gets its id, its method check, its error rendering and, when
the view did not hand it to a worker, its request-log row."""

import functools
import json
import logging
import math
import uuid

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from access.models import ApiKey
from access.services import Limits, auth_required, client_address, key_authenticate, rate_limit_check
from inference.services import request_log_record

from .errors import InvalidRequest, MethodNotAllowed, OpenAIError, RequestTooLarge, ServerError, ServiceUnavailable

logger = logging.getLogger(__name__)


def openai_view(*, methods: tuple[str, ...]):
    def decorate(view):
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            request.request_id = uuid.uuid4().hex
            request.request_logged = False  # set by views once a worker owns the request's log row
            request.log_model = ""
            request.api_key, limits = None, None
            request.audit = {
                "client_ip": client_address(request.META),
                "user_agent": request.headers.get("User-Agent", "")[:255],
                "retry_count": _retry_count(request.headers.get("X-Stainless-Retry-Count", "")),
            }
            try:
                # The key first: a caller without one learns nothing, not even which methods a path takes.
                header = request.headers.get("Authorization", "")
                if header or auth_required():
                    request.api_key, limits = await sync_to_async(_access)(header)
                request.audit["api_key_prefix"] = request.api_key.prefix if request.api_key else ""
                if request.method not in methods:
                    raise MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
                response = await view(request, *args, **kwargs)
            except OpenAIError as exc:
                response = error_response(exc)
                if isinstance(exc, MethodNotAllowed):
                    response["Allow"] = ", ".join(methods)
            except (OperationalError, InterfaceError):  # unreachable, or locked past the busy timeout
                logger.warning("database unavailable for %s", request.request_id, exc_info=True)
                response = error_response(DATABASE_UNAVAILABLE)
            except RedisError:
                logger.warning("Redis unavailable for %s", request.request_id, exc_info=True)
                response = error_response(REDIS_UNAVAILABLE)
            except Exception:
                logger.exception("unhandled error in %s (request %s)", request.path, request.request_id)
                response = error_response(ServerError())
            for header, value in (limits.headers() if limits else {}).items():
                response.setdefault(header, value)  # a 429 from the token reservation carries newer counts
            response["x-request-id"] = f"req_{request.request_id}"
            response["X-Content-Type-Options"] = "nosniff"
            if not request.request_logged:
                error = getattr(response, "openai_error", None)
                try:
                    await sync_to_async(request_log_record)(
                        request_id=request.request_id,
                        endpoint=request.path,
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


DATABASE_UNAVAILABLE = ServiceUnavailable(
    "The database is unavailable; try again shortly.", code="database_unavailable"
)
REDIS_UNAVAILABLE = ServiceUnavailable("Redis is unavailable; try again shortly.", code="redis_unavailable")


def _access(header: str) -> tuple[ApiKey | None, Limits | None]:
    """The request's key and its rate-limit state (one trip to the sync thread for both)."""
    key = key_authenticate(header)
    return key, rate_limit_check(key=key) if key is not None else None


def error_response(exc: OpenAIError) -> JsonResponse:
    response = JsonResponse(exc.to_dict(), status=exc.status)
    response.openai_error = exc
    if exc.status == 503:
        response["Retry-After"] = str(getattr(exc, "retry_after", 1))
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="minerva"'
    for header, value in getattr(exc, "headers", {}).items():
        response[header] = value
    return response


def _retry_count(raw: str) -> int:
    return int(raw) if raw.isdigit() and len(raw) < 6 else 0


def parse_body(request: HttpRequest, model: type[BaseModel]) -> BaseModel:
    """Validate the JSON body into `model`, turning every fault into a 400/413 that names the parameter."""
    try:
        raw = request.body
    except RequestDataTooBig:
        raise RequestTooLarge("The request body is too large.") from None
    try:
        data = json.loads(raw, parse_constant=_not_json, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        ) from None
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
