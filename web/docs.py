"""The API docs page (/minerva/api/docs): ReDoc from drf-spectacular-sidecar's bundle, served by Django like every
other static file (no CDN, no web fonts), over the document of every surface (web/openapi.py)."""

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.decorators import method_decorator
from django.views import View

from access.services import key_authenticate
from core.errors import MinervaError

from .csp import DOCS, csp
from .openapi import openapi_document


@method_decorator([csp(DOCS), staff_member_required], name="get")
class Docs(View):
    """For staff with the admin's login (anonymous visitors are sent to it)."""

    def get(self, request: HttpRequest) -> HttpResponse:
        return render(request, "web/docs.html")


def openapi(request: HttpRequest) -> HttpResponse:
    """The document, for a staff session or a staff key."""
    if not (request.user.is_staff or _staff_key(request)):
        error = {"message": "This document needs a staff key or a staff admin session.",
                 "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}  # fmt: skip
        return JsonResponse({"error": error}, status=401, headers={"WWW-Authenticate": 'Bearer realm="minerva"'})
    return JsonResponse(openapi_document())


def _staff_key(request: HttpRequest) -> bool:
    header = request.headers.get("Authorization", "")
    try:
        key = key_authenticate(header) if header else None
    except MinervaError:
        return False
    return key is not None and key.staff
