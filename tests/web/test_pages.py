"""The pages for people, in-process: who may see what (staff for other users' data, via the admin's login), the
status snapshot's content, the models page's enable switch, and API docs that cover every route."""

import re

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from access.services import key_create
from core.workers import HOST, WORKER_ID, worker_announce
from inference import metrics
from inference.models import RequestLog
from models_app.models import LanguageModel
from tests.conftest import MODEL

pytestmark = pytest.mark.django_db(transaction=True)

REDOC = "/static/drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js"


@pytest.fixture
def staff_client(client):
    client.force_login(User.objects.create_user("admin", password="pw", is_staff=True))
    return client


def test_the_chat_page_is_open_asks_for_a_key_only_when_keys_are_required_and_loads_nothing_from_elsewhere(
    client, settings
):
    settings.AUTH = "off"
    assert b'id="api-key-field" hidden' in client.get("/").content
    settings.AUTH = "on"
    page = client.get("/")
    assert page.status_code == 200 and b'id="api-key-field">' in page.content
    policy = page["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self';" in policy and "http" not in policy
    assert b"https://" not in page.content and b"http://" not in page.content


def test_status_and_models_send_anonymous_visitors_to_the_admin_login(client):
    for path in ("/status", "/models", "/minerva/api/docs"):
        response = client.get(path)
        assert response.status_code == 302 and response["Location"] == f"/admin/login/?next={path}", path
    refused = client.get("/status.json")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "staff_session_required"
    user = User.objects.create_user("someone", password="pw")
    client.force_login(user)
    assert client.get("/status.json").status_code == 403
    assert client.get("/status").status_code == 302


def test_the_status_snapshot_shows_models_queues_rates_latency_and_recent_requests(staff_client, smollm2):
    row = RequestLog.objects.create(request_id="r1", endpoint="/v1/chat/completions", model=MODEL, status="completed",
                                    status_code=200, prompt_tokens=12, completion_tokens=30, ttft_ms=80,
                                    latency_ms=380)  # fmt: skip
    metrics.metrics_record(row)
    worker_announce({"queues": [smollm2.queue], "slots": {"total": 4, "busy": 1}, "models": {}, "loaded": []})
    status = staff_client.get("/status.json").json()
    [model] = [m for m in status["models"] if m["name"] == MODEL]
    assert model["loaded"] is False and model["queue_depth"] == 0 and model["slots_busy"] == 0
    assert model["loading"] is None
    assert model["n_ctx"] > 0 and model["quantization"] and model["file_size"] > 0
    assert status["workers"] == [
        {
            "id": WORKER_ID,
            "host": HOST,
            "queues": [smollm2.queue],
            "slots": {"total": 4, "busy": 1},
            "seen_seconds_ago": pytest.approx(0, abs=5),
        }
    ]
    worker_announce({"queues": [smollm2.queue], "models": {}, "loaded": [], "preloading": [MODEL]})
    [loading] = [m for m in staff_client.get("/status.json").json()["models"] if m["name"] == MODEL]
    assert loading["loading"] == 0  # a worker is about to preload it (MINERVA_PRELOAD)
    worker_announce({"queues": [smollm2.queue], "models": {}, "loaded": [], "preloading": [MODEL],
                     "loading": {MODEL: 0.42}})  # fmt: skip
    [loading] = [m for m in staff_client.get("/status.json").json()["models"] if m["name"] == MODEL]
    assert loading["loading"] == 0.42  # and is that far into reading its weights
    assert status["rates"] == {"requests_per_minute": 1, "prompt_tokens_per_minute": 12,
                               "completion_tokens_per_minute": 30}  # fmt: skip
    # 80 ms falls in the 0.1 s bucket; (380 - 80) / 29 ms per token in the 0.025 s one
    assert status["latency"][MODEL]["ttft"]["p50"] == 0.1 and status["latency"][MODEL]["itl"]["p99"] == 0.025
    assert status["requests"][0]["request_id"] == "r1" and status["batches"] == []


def test_the_models_page_disables_and_enables_a_model(staff_client, smollm2):
    page = staff_client.get("/models")
    assert page.status_code == 200 and MODEL.encode() in page.content
    staff_client.post(f"/models/{MODEL}/enabled", {"enabled": "0"})
    assert not LanguageModel.objects.get(name=MODEL).enabled
    staff_client.post(f"/models/{MODEL}/enabled", {"enabled": "1"})
    assert LanguageModel.objects.get(name=MODEL).enabled


def _routes(resolver: URLResolver, prefix: str = "") -> list[str]:
    """Every route of the URLconf as an OpenAPI path (`/v1/files/{file_id}`), catch-alls left out."""
    routes = []
    for pattern in resolver.url_patterns:
        route = prefix + str(pattern.pattern).lstrip("^").rstrip("$")
        if isinstance(pattern, URLResolver):
            routes += _routes(pattern, route)
        elif isinstance(pattern, URLPattern) and pattern.name != "unmatched":
            routes.append(route)
    return routes


def test_the_api_docs_cover_every_route_of_every_surface(staff_client):
    documented = set(staff_client.get("/minerva/api/openapi.json").json()["paths"])
    api = [r for r in _routes(get_resolver()) if not r.startswith(("admin/", "static/"))]
    api = [r for r in api if r.startswith(("v1/", "api/", "minerva/")) or r in ("tokenize", "detokenize", "health",
                                                                              "ready", "metrics")]  # fmt: skip
    as_openapi = {"/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", re.sub(r"\(\?P<(\w+)>.*\)", r"{\1}", r)) for r in api}
    assert {"/v1/chat/completions", "/api/chat", "/v1/messages", "/minerva/api/models/{name}/load"} <= as_openapi
    assert as_openapi - documented == set()


def test_the_docs_page_serves_redoc_from_here_for_staff_and_the_document_for_a_staff_key(staff_client, client):
    page = staff_client.get("/minerva/api/docs")
    assert (
        page.status_code == 200 and b"/static/drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js" in page.content
    )
    assert b"cdn" not in page.content and "img-src 'self' data:" in page["Content-Security-Policy"]
    assert finders.find(REDOC.removeprefix("/static/"))  # daphne's static handler serves it
    client = Client()
    assert client.get("/minerva/api/openapi.json").status_code == 401
    _, staff = key_create(name="ops", staff=True)
    _, plain = key_create(name="app")
    assert client.get("/minerva/api/openapi.json", headers={"Authorization": f"Bearer {plain}"}).status_code == 401
    document = client.get("/minerva/api/openapi.json", headers={"Authorization": f"Bearer {staff}"}).json()
    assert {"OpenAI", "Anthropic", "Ollama", "Minerva"} <= {t["name"] for t in document["tags"]}
