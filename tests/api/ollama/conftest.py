import ollama
import pytest


@pytest.fixture
def client(minerva_server, smollm2):
    """The official ollama client against a real `serve` (its own Redis, a Celery worker, SmolLM2)."""
    with ollama.Client(host=f"http://127.0.0.1:{minerva_server.port}", timeout=120) as client:
        yield client
