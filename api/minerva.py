"""Minerva's own JSON for operators beside the history API: load and unload a model now
(`POST /minerva/api/models/<name>/load` and `.../unload`), for a staff key or a staff user's admin session."""

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse

from access.services import InvalidApiKey, auth_required
from core.errors import PermissionDenied
from inference.serving import model_load

from .decorators import api_view, error_response


def staff_view(*, methods: tuple[str, ...]):
    """@api_view in OpenAI's error shape for operators: a staff key, a staff session, or nothing at all where keys
    are optional (as /metrics)."""

    def decorate(view):
        async def checked(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if request.api_key is not None and not request.api_key.staff:
                raise PermissionDenied("This endpoint needs a staff key.", code="staff_key_required")
            if request.api_key is None and not request.staff_session and await sync_to_async(auth_required)():
                raise InvalidApiKey("This endpoint needs a staff key.")
            return await view(request, *args, **kwargs)

        checked.__name__, checked.__doc__ = view.__name__, view.__doc__
        return api_view(methods=methods, render_error=error_response, sessions=True)(checked)

    return decorate


@staff_view(methods=("POST",))
async def load(request: HttpRequest, name: str) -> HttpResponse:
    """Load the model now, with its keep-alive (as an empty Ollama request does)."""
    return await _load(request, name, unload=False)


@staff_view(methods=("POST",))
async def unload(request: HttpRequest, name: str) -> HttpResponse:
    """Unload the model once its running requests end."""
    return await _load(request, name, unload=True)


async def _load(request: HttpRequest, name: str, *, unload: bool) -> HttpResponse:
    request.log_model = name

    def queued() -> None:
        request.request_logged = True  # from here on the worker owns the log row

    done = await model_load(request_id=request.request_id, endpoint=request.path, name=name, unload=unload,
                            api_key=request.api_key, audit=request.audit, on_queued=queued)  # fmt: skip
    return JsonResponse({"model": name, "done": done})
