"""The worker registry as the request side reads it: a model that no live worker has is refused at once (503
`model_unavailable`, Retry-After) in each surface's shape, but not right after a start; the admin's cluster page."""

import time

import pytest

from core.workers import RECENT_KEY, worker_announce
from inference import cluster
from minerva_project import celery_app
from tests.conftest import HELLO, MODEL

pytestmark = pytest.mark.django_db


@pytest.fixture
def with_workers():
    """Requests are queued for real workers (not run in this process), so the registry is asked."""
    celery_app.conf.task_always_eager = False
    yield
    celery_app.conf.task_always_eager = True


def test_a_model_no_live_worker_has_is_a_503_at_once_in_each_surfaces_shape(client, smollm2, with_workers):
    worker_announce({"models": {"another-model": {"hash": "0"}}, "queues": ["minerva.model.another-model"]})
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
    openai = client.post("/v1/chat/completions", body, content_type="application/json")
    assert openai.status_code == 503 and openai.headers["Retry-After"] == "5"
    assert openai.json()["error"]["code"] == "model_unavailable"
    anthropic = client.post("/v1/messages", body, content_type="application/json",
                            headers={"anthropic-version": "2023-06-01"})  # fmt: skip
    assert anthropic.status_code == 529 and anthropic.json()["error"]["type"] == "overloaded_error"
    ollama = client.post("/api/chat", {"model": MODEL, "messages": HELLO}, content_type="application/json")
    assert ollama.status_code == 503 and "No running worker has the model" in ollama.json()["error"]


def test_with_no_worker_alive_a_request_is_refused_only_after_the_start_up_grace(smollm2, with_workers, monkeypatch,
                                                                                 redis_server):  # fmt: skip
    from core.errors import NoWorker
    from core.redis import get_redis

    monkeypatch.setattr(cluster, "_STARTED", time.monotonic())  # this process just started
    cluster.model_servable_check(smollm2)
    monkeypatch.setattr(cluster, "_STARTED", time.monotonic() - 3600)
    get_redis().set(RECENT_KEY, "a worker", ex=60)  # one beat a moment ago: restarting, not gone
    cluster.model_servable_check(smollm2)
    get_redis().delete(RECENT_KEY)
    with pytest.raises(NoWorker):
        cluster.model_servable_check(smollm2)


def test_a_live_worker_with_the_model_makes_it_routable_and_the_admin_shows_it(admin_client, smollm2, with_workers):
    worker_announce({"models": {MODEL: {"hash": "abc123"}}, "slots": {"total": 4, "busy": 1}, "backend": "cpu"})
    cluster.model_servable_check(smollm2)
    snapshot = cluster.cluster_get()
    model = next(m for m in snapshot["models"] if m["name"] == MODEL)
    assert model["routable"] and model["hashes"] == ["abc123"] and snapshot["slots"] == {"total": 4, "busy": 1}
    page = admin_client.get("/admin/cluster/")
    assert page.status_code == 200 and b"abc123" in page.content and snapshot["hosts"][0].encode() in page.content
