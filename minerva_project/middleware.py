from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.http import HttpResponse
from django.urls import resolve


class ApiFastPath:
    """Send /v1/ requests straight to their view. The admin's session, auth, CSRF and message middleware are
    sync (MiddlewareMixin): under ASGI each costs two thread hops per request, and the API uses none of them
    (`@openai_view` does what an API request needs)."""

    sync_capable, async_capable = False, True

    def __init__(self, get_response):
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request):
        if request.path_info.startswith("/v1/"):
            match = resolve(request.path_info)  # api/urls.py ends in a catch-all: this always resolves
            return await match.func(request, *match.args, **match.kwargs)
        return await self.get_response(request)


class Cors:
    """Browsers may call the API only from MINERVA_CORS_ORIGINS (none by default); preflights answer here."""

    sync_capable, async_capable = False, True

    def __init__(self, get_response):
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request):
        origin = request.headers.get("Origin")
        allowed = origin is not None and origin in settings.CORS_ORIGINS
        if allowed and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response = HttpResponse(status=204)
            response["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Stainless-Retry-Count"
            response["Access-Control-Max-Age"] = "600"
        else:
            response = await self.get_response(request)
        if allowed:
            response["Access-Control-Allow-Origin"] = origin
            response["Access-Control-Expose-Headers"] = "x-request-id, Retry-After, x-ratelimit-remaining-requests"
            response["Vary"] = "Origin"
        return response
