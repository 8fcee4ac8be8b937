"""Minerva's own operator JSON: POST /minerva/api/models/<name>/load and /unload, for a staff key or a staff
session, through the model's queue like Ollama's empty request; every call logged once."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from access.services import key_create
from inference.models import RequestLog
from tests.conftest import MODEL

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_staff_key_loads_then_unloads_a_model_through_its_queue(client, smollm2, settings):
    settings.AUTH = "on"
    _, staff = key_create(name="ops", staff=True)
    headers = {"Authorization": f"Bearer {staff}"}
    loaded = client.post(f"/minerva/api/models/{MODEL}/load", headers=headers)
    assert loaded.status_code == 200 and loaded.json() == {"model": MODEL, "done": "load"}
    unloaded = client.post(f"/minerva/api/models/{MODEL}/unload", headers=headers)
    assert unloaded.json() == {"model": MODEL, "done": "unload"}
    rows = RequestLog.objects.filter(endpoint__startswith="/minerva/api/models/").order_by("created")
    assert [(r.finish_reason, r.status, r.model) for r in rows] == [("load", "completed", MODEL),
                                                                   ("unload", "completed", MODEL)]  # fmt: skip


def test_only_staff_may_load_and_a_refusal_is_logged_in_openais_shape(client, smollm2, settings):
    settings.AUTH = "on"
    _, plain = key_create(name="app")
    path = f"/minerva/api/models/{MODEL}/load"
    anonymous = client.post(path)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    denied = client.post(path, headers={"Authorization": f"Bearer {plain}"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "staff_key_required"
    user = User.objects.create_user("someone", password="pw")
    client.force_login(user)
    assert client.post(path).status_code == 401  # a session that is not staff is nobody
    assert client.get(path).status_code == 401  # the key before the method: a stranger learns nothing
    assert RequestLog.objects.filter(endpoint=path).count() == 4


def test_a_staff_session_loads_with_the_csrf_token_and_not_without(smollm2, settings):
    settings.AUTH = "on"
    staff = User.objects.create_user("admin", password="pw", is_staff=True)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff)
    path = f"/minerva/api/models/{MODEL}/load"
    refused = browser.post(path)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    browser.get("/")  # the page sets the CSRF cookie and carries its token
    token = browser.cookies["csrftoken"].value
    assert browser.post(path, headers={"X-CSRFToken": token}).json()["done"] == "load"


def test_an_unknown_model_is_a_404_json(client, smollm2):
    missing = client.post("/minerva/api/models/no/such/model/load")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
