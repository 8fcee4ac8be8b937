"""The project's own middleware: the browser gate (Host, Origin, CORS) and the fast path for the APIs (/v1 and
Ollama's /api)."""

from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.urls import resolve

from access.services import auth_proxy_warn
from api.decorators import browser_check, error_response
from core.errors import MinervaError

API_PREFIXES = ("/v1/", "/api/")  # every path under these is an @api_view (each URL conf ends in a catch-all)


class ApiFastPath:
    """Send API requests (/v1/, /api/) straight to their view. The admin's session, auth, CSRF and message
    middleware are sync (MiddlewareMixin): under ASGI each costs two thread hops per request, and the API uses none
    of them (`@api_view` does what an API request needs)."""

    sync_capable, async_capable = False, True

    def __init__(self, get_response):
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request):
        if request.path_info.startswith(API_PREFIXES):
            match = request.resolver_match = resolve(request.path_info)  # both URL confs end in a catch-all
            return await match.func(request, *match.args, **match.kwargs)
        return await self.get_response(request)


class Cors:
    """The browser gate for every path: a foreign Host is refused (DNS rebinding), and so is a request from a web
    page whose origin is not allowed (MINERVA_CORS_ORIGINS, or the server's own); allowed origins get their
    preflights answered and CORS headers. API requests are checked by `@api_view`, so a refusal is logged like
    any other request (in its surface's error shape); this middleware only adds their CORS headers."""

    sync_capable, async_capable = False, True

    def __init__(self, get_response):
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request):
        auth_proxy_warn(request.META)
        if request.path_info.startswith(API_PREFIXES):
            response = await self.get_response(request)
        else:
            try:
                response = browser_check(request) or await self.get_response(request)
            except MinervaError as exc:
                response = error_response(exc)
        origin = request.headers.get("Origin")
        if origin is not None and origin in settings.CORS_ORIGINS:
            response["Access-Control-Allow-Origin"] = origin
            response["Access-Control-Expose-Headers"] = "x-request-id, Retry-After, x-ratelimit-remaining-requests"
            response["Vary"] = "Origin"
        return response
