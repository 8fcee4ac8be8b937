from django.contrib import admin
from django.urls import include, path

from api import history, views
from inference.admin import cluster_view

from . import ops

urlpatterns = [
    path("admin/cluster/", admin.site.admin_view(cluster_view), name="admin-cluster"),
    path("admin/", admin.site.urls),
    path("v1/", include("batches.urls")),  # before api.urls, which ends in a catch-all
    path("v1/", include("api.urls")),
    path("tokenize", views.tokenize),  # llama-server's paths, beside /v1
    path("detokenize", views.detokenize),
    path("health", ops.health),
    path("ready", ops.ready),
    path("metrics", ops.prometheus),
    path("api/", include("api.ollama.urls")),  # Ollama's API; ends in a catch-all
    # Minerva's own JSON, under a prefix of its own so that no /api/ path is ambiguous
    path("minerva/api/requests", history.RequestList.as_view()),
    path("minerva/api/requests/<str:request_id>", history.RequestDetail.as_view()),
    path("minerva/api/usage", history.Usage.as_view()),
    path("minerva/api/schema", history.Schema.as_view(), name="schema"),
    path("minerva/api/docs", history.Docs.as_view(url_name="schema")),
]
