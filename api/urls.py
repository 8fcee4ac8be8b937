from django.urls import include, path, re_path

from . import views
from .anthropic import views as anthropic

# (?s:...): a model id or path may hold a newline (%0A); without DOTALL nothing would match it, and Django's HTML
# 404 would answer instead of ours.
urlpatterns = [
    # Anthropic's clients send `anthropic-version`: they get /v1/models in Anthropic's shape.
    path("models", anthropic.when_versioned(anthropic.list_models, otherwise=views.list_models)),
    re_path(
        r"^models/(?P<model_id>(?s:.+))$",
        anthropic.when_versioned(anthropic.retrieve_model, otherwise=views.retrieve_model),
    ),
    path("messages", anthropic.messages),
    path("messages/count_tokens", anthropic.count_tokens),
    path("chat/completions", views.chat_completions),
    path("completions", views.completions),
    path("embeddings", views.embeddings),
    path("", include("api.responses.urls")),  # the Responses API
    # Unknown /v1 paths answer 404 JSON, not Django's HTML; metrics count them under one label, `unmatched`.
    re_path(r"^(?P<path>(?s:.*))$", views.not_found, name="unmatched"),
]
