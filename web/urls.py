from django.urls import path

from . import views

app_name = "web"
urlpatterns = [
    path("", views.chat, name="chat"),
    path("status", views.status, name="status"),
    path("status.json", views.status_json, name="status_json"),
    path("models", views.models, name="models"),
    path("models/<path:name>/enabled", views.model_enabled, name="model_enabled"),
]
