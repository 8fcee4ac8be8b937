"""The AI SDK (`@ai-sdk/openai-compatible` + `streamText`, what OpenCode is built on) against a real `manage.py serve`:
tests/node/stream_text.mjs runs an agent loop with a tool and checks every part it streams. `make test` installs its
npm packages (tests/node/package-lock.json) before pytest runs."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NODE_DIR = Path(__file__).parent / "node"


def test_the_ai_sdk_streams_a_tool_call_and_the_answer_to_its_result(minerva_server, smollm2):
    node = shutil.which("node")
    assert node, "Node.js is needed for this test (the AI SDK is a JavaScript library)"
    assert (NODE_DIR / "node_modules" / "ai").is_dir(), "run `make test` (it runs npm ci in tests/node)"
    env = {"PATH": str(Path(node).parent), "MINERVA_BASE_URL": minerva_server.base_url, "MINERVA_MODEL": MODEL}
    run = subprocess.run([node, "stream_text.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["ok"] and isinstance(report["call"]["city"], str)
