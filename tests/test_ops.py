"""Operators' endpoints and production settings: /health, /ready, /metrics, check --deploy, SQLite under load."""

import os
import re
import subprocess
import sys
import threading

import pytest
from django.db import connection
from django.db.utils import ConnectionHandler

from access.services import key_create
from core.redis import start_embedded_redis
from core.workers import worker_announce
from inference.models import RequestLog
from tests.conftest import HELLO, MODEL, ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def test_health_answers_without_a_key(client, settings):
    settings.AUTH = "on"
    assert client.get("/health").json() == {"status": "ok"}


def test_ready_needs_a_worker_for_an_enabled_model(client, smollm2):
    response = client.get("/ready")
    assert response.status_code == 503 and response.json()["missing"] == ["worker: none alive for an enabled model"]
    worker_beat(smollm2)
    assert client.get("/ready").json()["status"] == "ready"


def test_ready_waits_for_the_models_a_worker_preloads(client, smollm2):
    worker_announce({"queues": [smollm2.queue], "models": {}, "loaded": [], "preloading": [smollm2.name]})
    response = client.get("/ready")
    assert response.status_code == 503 and response.json()["missing"] == [f"models: still loading {smollm2.name}"]
    worker_beat(smollm2)
    assert client.get("/ready").json()["status"] == "ready"


def test_a_preloaded_model_is_loaded_before_the_first_request(tmp_path, smollm2):
    import time

    import httpx2 as httpx

    from tests.conftest import Server

    server = Server(tmp_path, PRELOAD=MODEL)
    try:
        deadline = time.monotonic() + 90
        while (ready := httpx.get(f"http://127.0.0.1:{server.port}/ready", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.3)
        [loaded] = httpx.get(f"http://127.0.0.1:{server.port}/api/ps", timeout=5).json()["models"]
        assert loaded["name"] == MODEL and loaded["expires_at"].startswith("2318")  # Ollama's "forever"
        # no request loaded it: the only rows are the Server fixture's /v1/models polls and this /api/ps
        assert set(RequestLog.objects.values_list("endpoint", flat=True)) == {"/v1/models", "/api/ps"}
    finally:
        server.stop()


def test_ready_turns_503_when_redis_is_stopped(client, smollm2, settings, tmp_path):
    socket_path = tmp_path / "redis.sock"
    process = start_embedded_redis(socket_path, stdout=subprocess.DEVNULL)
    settings.REDIS_URL = f"unix://{socket_path}"
    try:
        worker_beat(smollm2)
        assert client.get("/ready").status_code == 200
        process.terminate()
        process.wait(timeout=10)
        response = client.get("/ready")
        assert response.status_code == 503 and response.json()["missing"][0].startswith("redis:")
    finally:
        if process.poll() is None:
            process.kill()


def worker_beat(model) -> None:
    """One heartbeat of a worker serving `model`, as inference/worker.py writes it."""
    worker_announce({"queues": [model.queue], "models": {model.name: {"hash": "0"}}, "slots": {"total": 4, "busy": 1}})


def _sample(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")) == labels:
            return float(match.group(3))
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_metrics_count_known_traffic(client, smollm2, settings):
    settings.AUTH = "on"
    _, staff = key_create(name="prometheus", staff=True)
    _, plain = key_create(name="app")
    usages = []
    for _ in range(2):
        response = client.post("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 4},
                               content_type="application/json",
                               headers={"Authorization": f"Bearer {plain}"})  # fmt: skip
        usages.append(response.json()["usage"])
    client.post("/v1/chat/completions", {"model": "nope", "messages": HELLO}, content_type="application/json",
                headers={"Authorization": f"Bearer {plain}"})  # fmt: skip
    worker_beat(smollm2)
    assert client.get("/metrics", headers={"Authorization": f"Bearer {plain}"}).status_code == 401
    text = client.get("/metrics", headers={"Authorization": f"Bearer {staff}"}).content.decode()
    chat = {"endpoint": "/v1/chat/completions"}
    assert _sample(text, "minerva_requests_total", **chat, model=MODEL, status="200") == 2
    assert _sample(text, "minerva_requests_total", **chat, model="unknown", status="404") == 1  # not "nope"
    assert _sample(text, "minerva_tokens_total", model=MODEL, kind="prompt") == sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert _sample(text, "minerva_tokens_total", model=MODEL, kind="completion") == completion
    assert _sample(text, "minerva_ttft_seconds_count", model=MODEL) == 2
    assert _sample(text, "minerva_queue_depth", model=MODEL) == 0
    assert _sample(text, "minerva_busy_slots", model=MODEL) == 0
    assert re.search(r"^minerva_workers 1\.0$", text, re.M)


def test_many_writers_do_not_hit_database_is_locked(settings):
    errors = []

    def write(n: int) -> None:
        try:
            for i in range(25):
                RequestLog.objects.create(request_id=f"w{n}-{i}", endpoint="/v1/models", status_code=200)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and RequestLog.objects.count() == 200


def test_a_closed_sqlite_connection_is_kept_for_the_next_one_with_nothing_uncommitted(tmp_path, monkeypatch):
    # Minerva's SQLite backend on a file of its own, whichever database the suite runs on.
    name = str(tmp_path / "kept.sqlite3")
    db = ConnectionHandler({"default": {"ENGINE": "minerva_project.sqlite3", "NAME": name}})["default"]
    db.cursor().execute("CREATE TABLE t (x)")
    kept = db.connection
    kept.execute("BEGIN")
    kept.execute("INSERT INTO t VALUES (1)")
    db.close()  # as at the end of a request, inside a transaction here
    db.ensure_connection()
    assert db.connection is kept and not kept.in_transaction
    assert db.cursor().execute("SELECT count(*) FROM t").fetchone() == (0,)
    db.close()
    db.settings_dict["OPTIONS"] = {"timeout": 3}  # opened with another busy timeout: not the kept one
    db.ensure_connection()
    assert db.connection is not kept
    db.close()
    monkeypatch.setattr(os, "getpid", lambda: -1)  # a forked child must not share its parent's connections
    db.settings_dict["OPTIONS"] = {}
    db.ensure_connection()
    assert db.connection is not kept
    db.close()


def test_check_deploy_is_clean_with_the_documented_production_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERVA_")}
    env |= {"MINERVA_DATA_DIR": str(tmp_path), "MINERVA_SECURE": "1", "MINERVA_ALLOWED_HOSTS": "llm.example.com",
            "MINERVA_AUTH": "on", "MINERVA_CSRF_TRUSTED_ORIGINS": "https://llm.example.com",
            "MINERVA_TRUSTED_PROXIES": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    secret = (tmp_path / "secret_key").read_text()
    assert len(secret) >= 50 and oct((tmp_path / "secret_key").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([sys.executable, "-c", "from django.conf import settings; import django; "
                            "django.setup(); print(settings.SECRET_KEY, settings.DEBUG)"], cwd=ROOT,
                           env=env | {"DJANGO_SETTINGS_MODULE": "minerva_project.settings"}, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.stdout.split() == [secret.strip(), "False"]


def test_a_served_minerva_is_ready_once_its_worker_beats(minerva_server, smollm2):  # smollm2: enabled in the DB
    import time

    import httpx2 as httpx

    deadline = time.monotonic() + 60
    while (response := httpx.get(f"http://127.0.0.1:{minerva_server.port}/ready", timeout=5)).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.5)
    assert response.json()["status"] == "ready" and response.json()["cluster"]["workers"] == 1


def test_several_web_processes_share_serves_port_and_a_killed_one_is_replaced(tmp_path, smollm2):
    import time

    import httpx2 as httpx
    import psutil

    from tests.conftest import Server

    def daphnes() -> list[psutil.Process]:
        return [c for c in server.children_now() if any("minerva_project.daphne" in part for part in c.cmdline())]

    def chat() -> int:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 3}
        return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).status_code

    server = Server(tmp_path, WEB_PROCESSES="2")
    try:
        first = daphnes()
        assert len(first) == 2
        first[0].kill()  # the other one keeps answering on the same port while serve starts a new one
        first[0].wait(10)
        assert [chat() for _ in range(4)] == [200] * 4
        deadline = time.monotonic() + 60
        while len(now := daphnes()) < 2:
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(0.3)
        assert first[1] in now and first[0] not in now
        assert chat() == 200
    finally:
        server.stop()


def test_serve_says_so_when_its_port_is_taken(tmp_path, smollm2):
    import socket

    from tests.conftest import serve_env

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "manage.py", "serve", "--port", str(port)], cwd=ROOT,
                                env=serve_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
