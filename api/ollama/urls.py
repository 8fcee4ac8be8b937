"""Ollama's API, under /api/."""

from django.urls import path, re_path

from . import views

urlpatterns = [
    path("version", views.version),
    path("tags", views.tags),
    path("show", views.show),
    path("ps", views.ps),
    path("chat", views.api_chat),
    path("generate", views.api_generate),
    path("embed", views.api_embed),
    path("embeddings", views.api_embeddings),
    path("delete", views.delete),
    path("copy", views.copy),
    path("pull", views.pull),
    path("push", views.push),
    path("create", views.create),
    # Unknown /api paths answer 404 in Ollama's shape; metrics count them under one label, `unmatched`.
    re_path(r"^(?P<path>(?s:.*))$", views.not_found, name="unmatched"),
]
