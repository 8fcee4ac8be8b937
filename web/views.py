"""The pages: the chat playground (/, for anyone who may use the API: it calls the API from the browser with the
key typed into it), and for staff (the admin's login) the live status (/status) and the models (/models)."""

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from access.services import auth_required
from models_app.models import LanguageModel
from models_app.selectors import model_generates
from models_app.services import models_set_enabled

from .csp import csp
from .selectors import status_snapshot


@csp()
def chat(request: HttpRequest) -> HttpResponse:
    return render(request, "web/chat.html", {"auth_required": auth_required(), "page": "chat"})


@csp()
@staff_member_required
def status(request: HttpRequest) -> HttpResponse:
    return render(request, "web/status.html", {"page": "status"})


def status_json(request: HttpRequest) -> HttpResponse:
    """The status page's data, polled every two seconds: staff only (it shows every user's requests)."""
    if not request.user.is_staff:
        error = {"message": "Log in as staff at /admin/login/ to read the status.", "type": "permission_error",
                 "param": None, "code": "staff_session_required"}  # fmt: skip
        return JsonResponse({"error": error}, status=403)
    return JsonResponse(status_snapshot())


@csp()
@staff_member_required
def models(request: HttpRequest) -> HttpResponse:
    models = list(LanguageModel.objects.all())
    for model in models:
        model.generates = model_generates(model)  # an embedding model loads with its first request instead
    return render(request, "web/models.html", {"page": "models", "models": models})


@staff_member_required
@require_POST
def model_enabled(request: HttpRequest, name: str) -> HttpResponse:
    """Enable or disable a model (the form's `enabled` is "1" or "0")."""
    enabled = request.POST.get("enabled") == "1"
    if models_set_enabled(names=[name], enabled=enabled):
        messages.success(request, f"{name} {'enabled' if enabled else 'disabled'}.")
    return redirect("web:models")
