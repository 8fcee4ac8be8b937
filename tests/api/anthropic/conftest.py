import anthropic
import pytest

from access.services import key_create
from models_app.services import models_sync
from tests.conftest import Server


@pytest.fixture(scope="package")
def anthropic_server(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real `serve` (its own Redis, a Celery worker, SmolLM2) with keys required, for this folder's tests."""
    with django_db_blocker.unblock():
        models_sync()  # the worker's queues come from the registered models
    server = Server(tmp_path_factory.mktemp("serve"), AUTH="on")
    yield server
    server.stop()


@pytest.fixture
def api_key(smollm2) -> str:
    """A real key (transactional tests flush the table, so one per test); smollm2: registered for the test."""
    return key_create(name="anthropic-tests")[1]


@pytest.fixture
def client(anthropic_server, api_key):
    """The official anthropic client, sending its key as `x-api-key` as it always does."""
    with anthropic.Anthropic(base_url=f"http://127.0.0.1:{anthropic_server.port}", api_key=api_key, timeout=120,
                             max_retries=0) as client:  # fmt: skip
        yield client
