from django.urls import path, re_path

from . import views

urlpatterns = [
    path("models", views.list_models),
    path("models/<path:model_id>", views.retrieve_model),
    path("chat/completions", views.chat_completions),
    path("completions", views.completions),
    re_path(r"^(?P<path>.*)$", views.not_found),  # unknown /v1 paths answer 404 JSON, not Django's HTML
]
