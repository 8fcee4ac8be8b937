from django.contrib import admin
from django.urls import include, path, re_path

from api import history, minerva, models_api, views
from inference.admin import cluster_view
from web import docs

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
    path("minerva/api/pulls", models_api.Pulls.as_view()),
    path("minerva/api/pulls/<str:pull_id>", models_api.PullDetail.as_view()),
    # load/unload before the model's own route: <path:name> would take "name/load" too
    path("minerva/api/models/<path:name>/load", minerva.load),
    path("minerva/api/models/<path:name>/unload", minerva.unload),
    path("minerva/api/models/<path:name>", models_api.ModelDetail.as_view()),
    path("minerva/api/memory", models_api.Memory.as_view()),
    path("minerva/api/schema", history.Schema.as_view(), name="schema"),
    path("minerva/api/docs", docs.Docs.as_view(), name="docs"),
    path("minerva/api/openapi.json", docs.openapi, name="openapi"),
    re_path(r"^minerva/api/(?P<path>(?s:.*))$", views.not_found, name="unmatched"),  # JSON, not the pages' HTML 404
    path("", include("web.urls")),  # the pages for people: /, /status, /models
]
