"""API keys: who may call what, keys scoped to models, rate limits shared through Redis."""

import json
import socket
from datetime import timedelta

import httpx2 as httpx
import pytest
from django.core.management import call_command
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from access.models import ApiKey
from access.services import auth_required, key_create, key_revoke
from tests.conftest import HELLO, MODEL, Server

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def keys_on(settings):
    settings.AUTH = "on"


def bearer(raw: str) -> dict:
    return {"Authorization": f"Bearer {raw}"}


def _urls(patterns, prefix=""):
    """One concrete path per URL pattern, with every converter filled in."""
    for pattern in patterns:
        route = str(pattern.pattern).lstrip("^").rstrip("$").replace("\\Z", "")
        route = route.replace("(?P<path>.*)", "anything").replace("(?P<url>.*)", "anything")
        for converter in ("<path:model_id>", "<str:request_id>", "<path:object_id>", "<path:app_label>"):
            route = route.replace(converter, "x")
        for name in ("app_label", "model_name", "object_id", "content_type_id", "uidb64", "token"):
            route = route.replace(f"(?P<{name}>[^/]+)", "1").replace(f"<{name}>", "1")
        route = route.replace("<int:content_type_id>", "1").replace("<path:object_id>", "1")
        if isinstance(pattern, URLResolver):
            yield from _urls(pattern.url_patterns, prefix + route)
        elif isinstance(pattern, URLPattern):
            yield prefix + route


def test_every_url_needs_a_key_except_health_ready_the_chat_page_and_the_staff_login(client, keys_on):
    paths = sorted(set(_urls(get_resolver().url_patterns)))
    assert "/" + "v1/chat/completions" in ["/" + p for p in paths] and "metrics" in paths
    for path in paths:
        response = client.get("/" + path)
        if path in ("health", "ready"):
            assert response.status_code in (200, 503), path
        elif path == "":  # the chat page: a shell with no data; its API calls need the key (README, "The page")
            assert response.status_code == 200 and b"API key" in response.content, path
        elif path in ("status", "minerva/api/docs") or path.startswith("models"):  # staff pages: the admin's login
            assert response.status_code == 302 and response["Location"].startswith("/admin/login/?next="), path
        elif path in ("status.json", "minerva/api/openapi.json") and response.status_code == 403:
            assert response.json()["error"]["code"] == "staff_session_required", path
        elif path.startswith("admin/"):
            # The admin is the staff's session login: every page but the login itself ends there.
            final = client.get("/" + path, follow=True)
            assert final.status_code == 200 and final.request["PATH_INFO"] == "/admin/login/", path
        else:
            assert response.status_code == 401, (path, response.status_code)
            assert response["WWW-Authenticate"].startswith("Bearer"), path
            if path.startswith("api/"):  # Ollama's API: its own error shape
                assert "API key" in response.json()["error"], path
            elif path.startswith("v1/messages"):  # Anthropic's API: its own error shape
                assert response.json()["error"]["type"] == "authentication_error", path
            else:
                assert response.json()["error"]["code"] == "invalid_api_key", path


async def test_a_wrong_key_gets_401_with_the_openai_error(async_client, keys_on):
    response = await async_client.get("/v1/models", headers=bearer("sk-mnrv-notarealkey"))
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}


def test_a_revoked_key_gets_401(client, keys_on):
    key, raw = key_create(name="ci")
    assert client.get("/v1/models", headers=bearer(raw)).status_code == 200
    key_revoke(key=key)
    assert client.get("/v1/models", headers=bearer(raw)).status_code == 401


def test_an_expired_key_gets_401(client, keys_on):
    _, raw = key_create(name="old", expires=timezone.now() - timedelta(seconds=1))
    assert client.get("/v1/models", headers=bearer(raw)).status_code == 401


def test_a_key_with_the_right_prefix_but_wrong_secret_gets_401(client, keys_on):
    _, raw = key_create(name="ci")
    assert client.get("/v1/models", headers=bearer(raw[:-1] + ("a" if raw[-1] != "a" else "b"))).status_code == 401


def test_keys_are_optional_on_loopback_and_required_elsewhere(settings):
    settings.AUTH = ""
    assert not auth_required("127.0.0.1") and not auth_required("::1") and not auth_required("localhost")
    assert auth_required("0.0.0.0") and auth_required("192.168.1.5") and auth_required("example.com")
    settings.AUTH = "off"
    assert not auth_required("0.0.0.0")
    settings.AUTH = "on"
    assert auth_required("127.0.0.1")


def test_a_key_scoped_away_from_a_model_sees_it_neither_listed_nor_by_request(client, keys_on, smollm2):
    _, other = key_create(name="other", models=["some-other-model"])
    _, mine = key_create(name="mine", models=[MODEL])
    assert [m["id"] for m in client.get("/v1/models", headers=bearer(other)).json()["data"]] == []
    assert MODEL in [m["id"] for m in client.get("/v1/models", headers=bearer(mine)).json()["data"]]
    response = client.get(f"/v1/models/{MODEL}", headers=bearer(other))
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = client.post("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 1},
                           content_type="application/json", headers=bearer(other))  # fmt: skip
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_the_request_after_the_rpm_limit_gets_429_with_headers(client, keys_on):
    _, raw = key_create(name="limited", rpm=2)
    first = client.get("/v1/models", headers=bearer(raw))
    assert first["x-ratelimit-limit-requests"] == "2" and first["x-ratelimit-remaining-requests"] == "1"
    assert client.get("/v1/models", headers=bearer(raw)).status_code == 200
    response = client.get("/v1/models", headers=bearer(raw))
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(response["Retry-After"]) <= 60
    assert response["x-ratelimit-remaining-requests"] == "0"
    assert response["x-ratelimit-reset-requests"].endswith("s")


def test_x_forwarded_for_does_not_reset_a_bucket(client, keys_on, settings):
    settings.TRUSTED_PROXIES = 0
    _, raw = key_create(name="limited", rpm=1)
    assert client.get("/v1/models", headers=bearer(raw) | {"X-Forwarded-For": "10.0.0.1"}).status_code == 200
    assert client.get("/v1/models", headers=bearer(raw) | {"X-Forwarded-For": "10.0.0.2"}).status_code == 429
    settings.TRUSTED_PROXIES = 1
    assert client.get("/v1/models", headers=bearer(raw) | {"X-Forwarded-For": "10.0.0.3"}).status_code == 429


def test_a_key_past_its_tokens_per_minute_gets_429(client, keys_on, smollm2):
    _, raw = key_create(name="tokens", tpm=10)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 0}
    first = client.post("/v1/chat/completions", body, content_type="application/json", headers=bearer(raw))
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 10
    second = client.post("/v1/chat/completions", body, content_type="application/json", headers=bearer(raw))
    assert second.status_code == 429 and second["x-ratelimit-remaining-tokens"] == "0"


def test_only_a_staff_key_may_unload_a_model_or_pin_it_in_memory(client, keys_on, smollm2):
    import math

    from inference.run import model_cache

    _, user = key_create(name="user")
    _, staff = key_create(name="ops", staff=True)

    def chat(raw: str, keep_alive) -> float:  # the loaded model's keep-alive after the request
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 1, "keep_alive": keep_alive}
        response = client.post("/v1/chat/completions", body, content_type="application/json", headers=bearer(raw))
        assert response.status_code == 200, response.content
        return next(m["keep_alive"] for m in model_cache().loaded() if m["name"] == MODEL)

    assert chat(staff, "5m") == 300
    assert chat(user, -1) == 300  # not pinned for good by one client of a shared server
    assert chat(user, "1h") == 300
    unload = client.post("/api/generate", {"model": MODEL, "keep_alive": 0}, content_type="application/json",
                         headers=bearer(user))  # fmt: skip
    assert unload.status_code == 403 and "staff key" in unload.json()["error"]
    assert any(m["name"] == MODEL for m in model_cache().loaded())
    assert chat(staff, -1) == math.inf  # a staff key still may
    assert chat(staff, "5m") == 300


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(capsys):
    call_command("keys", "create", "--name", "ci", "--models", f"{MODEL},other", "--rpm", "5", "--tpm", "100",
                 "--expires", "2099-01-01T00:00:00Z")  # fmt: skip
    raw = capsys.readouterr().out.strip()
    key = ApiKey.objects.get()
    assert (
        raw.startswith("sk-mnrv-")
        and key.prefix == raw[:16]
        and raw not in json.dumps(list(ApiKey.objects.values()), default=str)
    )
    assert key.models == [MODEL, "other"] and (key.rpm, key.tpm) == (5, 100) and key.expires.year == 2099
    call_command("keys", "revoke", key.prefix)
    key.refresh_from_db()
    assert not key.active


def test_cors_answers_only_allowed_origins(client, settings):
    settings.CORS_ORIGINS = ["https://app.example.com"]
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    response = client.options("/v1/chat/completions", headers=preflight)
    assert response.status_code == 204 and response["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Authorization" in response["Access-Control-Allow-Headers"]
    assert client.get("/v1/models", headers={"Origin": "https://app.example.com"})["Access-Control-Allow-Origin"]
    other = client.get("/v1/models", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other


def test_the_admin_shows_a_new_key_once_and_stores_its_hash(admin_client):
    response = admin_client.post("/admin/access/apikey/add/", {"name": "web", "models": "[]"}, follow=True)
    shown = [str(m) for m in response.context["messages"]]
    raw = shown[0].split("The new key is ")[1].split(" ")[0]
    key = ApiKey.objects.get(name="web")
    assert raw.startswith(key.prefix) and raw not in json.dumps(list(ApiKey.objects.values()), default=str)


def test_with_keys_optional_an_unknown_key_is_ignored_but_a_revoked_one_is_not(client, settings):
    settings.AUTH = "off"
    assert client.get("/v1/models", headers=bearer("sk-whatever-the-sdk-sends")).status_code == 200
    key, raw = key_create(name="old")
    key_revoke(key=key)
    assert client.get("/v1/models", headers=bearer(raw)).status_code == 401


def test_the_body_guard_lets_a_staff_sessions_request_through_to_minervas_api_only(keys_on):
    from minerva_project.daphne import key_missing

    session = b"csrftoken=a; sessionid=b"
    assert not key_missing(b"/minerva/api/models/x/load", b"", b"", session)  # the view checks the session
    assert key_missing(b"/minerva/api/models/x/load", b"", b"", b"csrftoken=a")
    assert key_missing(b"/v1/chat/completions", b"", b"", session)  # /v1 takes keys only
    assert key_missing(b"/tokenize", b"", b"") and not key_missing(b"/tokenize", b"Bearer sk-x", b"")
    assert not key_missing(b"/admin/login/", b"", b"")  # the staff login page takes no key


def _raw_request(port: int, head: str, body: bytes = b"", timeout: float = 60) -> bytes:
    """Send a request's head and the start of a body it says is much longer; return what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        return sock.recv(65536)


@pytest.mark.e2e
def test_serve_bound_to_every_address_requires_keys_in_every_process(django_db_setup, smollm2, tmp_path):
    _, raw = key_create(name="lan")
    server = Server(tmp_path, host="0.0.0.0")  # and no MINERVA_HOST: its default is loopback
    try:
        chat = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
        models = httpx.get(f"{server.base_url}/models", timeout=30)
        assert models.status_code == 401 and models.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{server.base_url}/chat/completions", json=chat, timeout=30).status_code == 401
        assert httpx.get(f"{server.base_url}/models", headers=bearer(raw), timeout=30).status_code == 200
        answer = httpx.post(f"{server.base_url}/chat/completions", json=chat, headers=bearer(raw), timeout=120)
        assert answer.status_code == 200 and answer.json()["choices"]
        # Without a key, a body is not worth reading: the 401 comes before the 100 MB this one announces.
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000000\r\n")  # fmt: skip
        assert _raw_request(server.port, head, b'{"model": ').startswith(b"HTTP/1.1 401 ")
        encoded = head.replace("POST /v1/", "POST /%761/").replace("100000000", "5000000")  # routed as /v1/...
        assert _raw_request(server.port, encoded, b'{"model": ', timeout=20).startswith(b"HTTP/1.1 401 ")
        for path in ("/tokenize", "/minerva/api/models/x/load"):  # llama-server's paths, Minerva's own API
            other = head.replace("/v1/chat/completions", path).replace("100000000", "5000000")
            assert _raw_request(server.port, other, b'{"model": ', timeout=20).startswith(b"HTTP/1.1 401 "), path
        # Nor with a made-up key: a large body waits, unread, until its key is checked (it was read whole, 513 MiB
        # on /v1/files, before the 401). A small chunked one whole in the first packet too.
        forged = head.replace(
            "Content-Length: 100000000", "Authorization: Bearer sk-mnrv-made-up\r\nContent-Length: 5000000"
        )
        assert _raw_request(server.port, forged, b'{"model": ', timeout=20).startswith(b"HTTP/1.1 401 ")
        chunked = forged.replace("Content-Length: 5000000", "Transfer-Encoding: chunked")
        assert _raw_request(server.port, chunked, b"2\r\n{}\r\n0\r\n\r\n").startswith(b"HTTP/1.1 401 ")
        # A good key's large body is read, after a "100 Continue" when the client waits for one.
        upload = b"".join(b'{"custom_id": "%d", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' % i
                          for i in range(30_000))  # fmt: skip
        assert len(upload) > 1024 * 1024
        files = httpx.post(f"{server.base_url}/files", headers=bearer(raw), timeout=120,
                           data={"purpose": "batch"}, files={"file": ("big.jsonl", upload)})  # fmt: skip
        assert files.status_code in (200, 400), files.text  # read and checked (its lines are not valid batch lines)
        assert files.json()["error"]["param"] if files.status_code == 400 else files.json()["bytes"] == len(upload)
        body = json.dumps({**chat, "user": "u" * (2 * 1024 * 1024)}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {raw}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
            sock.sendall(head.encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]  # read whole, and answered
    finally:
        server.stop()


def test_a_proxied_request_with_keys_optional_is_warned_about_once(client, settings, caplog, monkeypatch):
    from access import services

    monkeypatch.setattr(services, "_proxy_warned", False)
    settings.AUTH, settings.HOST = "", "127.0.0.1"
    for _ in range(2):
        assert client.get("/health", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    warnings = [r for r in caplog.records if "MINERVA_AUTH=on" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
