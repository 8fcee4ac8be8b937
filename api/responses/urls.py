"""The Responses API, under /v1/ (included by api/urls.py before its catch-all)."""

from django.urls import path

from . import views

urlpatterns = [
    path("responses", views.create_response),
    path("responses/<str:response_id>", views.response),
    path("responses/<str:response_id>/input_items", views.input_items),
    path("responses/<str:response_id>/cancel", views.cancel_response),
]
