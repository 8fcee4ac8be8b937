"""The HTTP edge against strangers: Host and Origin checks (DNS rebinding, web pages posting to a local Minerva),
CORS preflights, metrics that junk cannot grow, bodies refused before they are read."""

import itertools
import json
import re
import socket
import threading
import time
import uuid

import httpx2 as httpx
import pytest

from access.services import VISIBLE, key_create
from core.redis import get_redis
from inference import metrics
from inference.models import RequestLog
from tests.conftest import HELLO, MODEL

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "temperature": 0}
EVIL = "https://evil.example"


def test_a_foreign_host_is_refused_on_every_path_so_a_rebinding_page_reads_nothing(client):
    for path in ("/v1/files/file-x/content", "/v1/models", "/v1/nowhere", "/health", "/metrics", "/admin/"):
        response = client.get(path, headers={"Host": "evil.example:11434"})
        assert response.status_code == 400, path
        assert response.json()["error"]["code"] == "invalid_host", path
    assert client.get("/v1/models", headers={"Host": "localhost:11434"}).status_code == 200


def test_the_default_hosts_are_loopback_and_the_bound_address_or_this_machine_when_bound_to_all():
    from minerva_project.settings import _default_allowed_hosts

    loopback = ["localhost", "127.0.0.1", "[::1]"]
    assert _default_allowed_hosts("127.0.0.1") == loopback
    assert _default_allowed_hosts("192.168.1.5") == [*loopback, "192.168.1.5"]
    assert _default_allowed_hosts("fd00::5") == [*loopback, "[fd00::5]"]
    everywhere = _default_allowed_hosts("0.0.0.0")
    assert everywhere[:3] == loopback and socket.gethostname() in everywhere and "evil.example" not in everywhere


def test_a_web_pages_text_plain_post_is_refused_and_nothing_runs(client, smollm2):
    response = client.post("/v1/chat/completions", json.dumps(CHAT), content_type="text/plain",
                           headers={"Origin": EVIL})  # fmt: skip
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "origin_not_allowed" and set(response.json()["error"]) == {
        "message", "type", "param", "code"}  # fmt: skip
    assert list(RequestLog.objects.values_list("status_code", "model")) == [(403, "")]  # logged, never queued


def test_a_cross_site_subresource_without_an_origin_is_refused_but_following_a_link_is_not(client):
    fetch = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    assert client.get("/v1/files/file-x/content", headers=fetch).status_code == 403
    assert client.get("/v1/models", headers=fetch | {"Sec-Fetch-Mode": "navigate"}).status_code == 200


def test_an_allowed_origin_gets_its_preflight_answered_and_a_foreign_one_is_refused(client, settings):
    settings.CORS_ORIGINS = ["https://app.example.com"]
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/files/file-x", "DELETE"), ("/v1/models", "GET")):
        preflight = {"Access-Control-Request-Method": method, "Access-Control-Request-Headers": "authorization"}
        response = client.options(path, headers=preflight | {"Origin": "https://app.example.com"})
        assert response.status_code == 204, path
        assert response["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert method in response["Access-Control-Allow-Methods"]
        assert response["Access-Control-Allow-Headers"] == "authorization"
        refused = client.options(path, headers=preflight | {"Origin": EVIL})
        assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused


def test_curl_without_a_content_type_and_the_servers_own_pages_are_served(client, smollm2):
    curl = client.post("/v1/chat/completions", json.dumps(CHAT), content_type="application/x-www-form-urlencoded")
    assert curl.status_code == 200 and curl.json()["choices"]
    own = client.post("/v1/chat/completions", json.dumps(CHAT), content_type="application/json",
                      headers={"Origin": "http://testserver"})  # fmt: skip
    assert own.status_code == 200


def test_head_on_a_get_endpoint_answers_its_headers_and_is_logged_as_head(client, smollm2):
    head = client.head("/v1/models")
    assert head.status_code == 200 and head["Content-Type"] == "application/json" and head.content == b""
    assert RequestLog.objects.filter(endpoint="/v1/models", method="HEAD", status_code=200).count() == 1
    refused = client.head("/v1/chat/completions")  # a POST endpoint: still a 405 that names what it takes
    assert refused.status_code == 405 and refused["Allow"] == "POST"


def _series(text: str) -> int:
    """How many series the scrape has, but those of live workers: a worker coming or going meanwhile is not junk."""
    return sum(1 for line in text.splitlines() if line and not line.startswith(("#", "minerva_worker")))


def test_junk_paths_and_model_names_add_no_metrics_series_or_redis_keys(client, settings, smollm2):
    settings.AUTH = "on"
    _, staff = key_create(name="prometheus", staff=True)
    auth = {"Authorization": f"Bearer {staff}"}

    def junk() -> None:
        assert client.get(f"/v1/{uuid.uuid4()}").status_code == 401
        assert client.get(f"/v1/files/{uuid.uuid4()}", headers=auth).status_code == 404
        bad = {**CHAT, "model": f"m-{uuid.uuid4()}"}
        response = client.post("/v1/chat/completions", bad, content_type="application/json", headers=auth)
        assert response.status_code == 404

    junk()  # the first of each kind makes its series
    series, keys = _series(client.get("/metrics", headers=auth).content.decode()), set(get_redis().keys())
    for _ in range(200):
        junk()
    text = client.get("/metrics", headers=auth).content.decode()
    assert _series(text) == series
    # Nothing per request is new. What may be: a worker of another test beating meanwhile (its registry keys,
    # Celery's own), and the staff key's rate-limit counters for a new minute, if the loop crossed one.
    bounded = ("minerva:worker", "_kombu", "unacked", f"minerva:rl:{staff[:VISIBLE]}:")
    new = [key for key in set(get_redis().keys()) - keys if not key.startswith(bounded)]
    assert new == []
    assert 'minerva_requests_total{endpoint="unmatched",model="",status="401"} 201.0' in text
    assert re.search(r'endpoint="/v1/files/\{file_id\}",model="",status="404"\} 201\.0', text)
    assert 'endpoint="/v1/chat/completions",model="unknown",status="404"} 201.0' in text
    assert get_redis().hlen(metrics.REQUESTS) == 3


def _raw(port: int, head: str, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        return sock.recv(65536)


@pytest.mark.e2e
def test_a_body_over_the_cap_is_refused_before_it_is_read(minerva_server, smollm2):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{minerva_server.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000\r\n")  # fmt: skip
    answer = _raw(minerva_server.port, head, b'{"model": "')  # the other gigabyte never comes
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in answer
    # Chunked bodies announce no length: they are cut off once past the cap.
    head = head.replace("Content-Length: 1000000000", "Transfer-Encoding: chunked")
    chunk = b"x" * 1024 * 1024  # eight of them fill the cap, then ten bytes more (and no end of the body)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [chunk] * 8 + [b"x" * 10])
    assert _raw(minerva_server.port, head, chunks).startswith(b"HTTP/1.1 413 ")
    codes = RequestLog.objects.filter(status_code=413).values_list("endpoint", flat=True)
    assert list(codes) == ["/v1/chat/completions"] * 2  # logged like any other request


@pytest.mark.e2e
def test_a_body_of_millions_of_values_does_not_stall_the_event_loop(minerva_server, smollm2):
    """Parsing and validating hold the GIL, so a large body is checked in another process: while that works on
    2.8 million empty arrays (seconds of CPU), daphne keeps answering /health and delivering a running stream."""
    stream_arrivals: list[float] = []
    health_answers: list[float] = []
    started, finished = threading.Event(), threading.Event()

    def stream() -> None:
        body = {**CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{minerva_server.base_url}/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    stream_arrivals.append(time.monotonic())
                    started.set()
                    if finished.is_set():
                        return

    def probe() -> None:
        while not finished.is_set():
            assert httpx.get(f"http://127.0.0.1:{minerva_server.port}/health", timeout=120).status_code == 200
            health_answers.append(time.monotonic())
            time.sleep(0.02)

    reader, prober = threading.Thread(target=stream), threading.Thread(target=probe)
    reader.start()
    assert started.wait(60)
    prober.start()
    hostile = b'{"model": "%s", "messages": [' % MODEL.encode() + b"[]," * 2_790_000 + b"[]]}"  # just under 8 MiB
    sent = time.monotonic()
    response = httpx.post(f"{minerva_server.base_url}/chat/completions", content=hostile, timeout=120)
    done = time.monotonic()
    finished.set()
    reader.join(timeout=120)
    prober.join(timeout=120)
    # A blocked loop answers nothing while the body is parsed: one gap as long as the hostile request.
    answers = [sent, *(t for t in health_answers if sent < t < done), done]
    assert max(b - a for a, b in itertools.pairwise(answers)) < (done - sent) / 4
    assert sum(1 for t in stream_arrivals if sent < t < done) >= 3
    assert response.status_code == 400 and "too many JSON values" in response.json()["error"]["message"]
