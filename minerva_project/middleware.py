from asgiref.sync import markcoroutinefunction
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
