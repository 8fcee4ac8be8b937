"""Ollama's /api/pull and /api/delete through the official `ollama` client, against a real `serve` whose worker
runs the pull task, pulling from a Hub stand-in (HF_ENDPOINT) that serves SmolLM2's GGUF."""

import os
import threading

import ollama
import pytest

from inference.models import RequestLog
from models_app.bundled import default_model_path
from models_app.models import LanguageModel
from models_app.services import models_sync
from tests.conftest import SMOL_FILE, SMOL_REPO, Server, hub_start

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Q8 = "SmolLM2-135M-Instruct-Q8_0.gguf"


@pytest.fixture(scope="module")
def pulls(django_db_setup, django_db_blocker, tmp_path_factory):
    """(server, hub, models dir): a `serve` pulling from the stand-in into a models folder of its own."""
    hub = hub_start()
    models_dir = tmp_path_factory.mktemp("models")
    before = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = hub.url  # the serve child inherits it
    with django_db_blocker.unblock():
        models_sync()
    server = Server(tmp_path_factory.mktemp("serve"), MODELS_DIR=str(models_dir))
    yield server, hub, models_dir
    server.stop()
    hub.server.shutdown()
    os.environ.pop("HF_ENDPOINT") if before is None else os.environ.update(HF_ENDPOINT=before)


def client(server) -> ollama.Client:
    return ollama.Client(host=f"http://127.0.0.1:{server.port}", timeout=120)


def test_a_pull_streams_ollamas_progress_then_the_model_is_listed(pulls):
    server, _, models_dir = pulls
    lines = list(client(server).pull(f"hf.co/{SMOL_REPO}:Q4_1", stream=True))

    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = [line for line in lines if line.digest]
    size = default_model_path().stat().st_size
    assert progress and all(line.total == size and line.status == f"pulling {line.digest[7:19]}" for line in progress)
    assert progress[-1].completed == size
    assert (models_dir / "hf.co" / SMOL_REPO / SMOL_FILE).stat().st_size == size
    listed = {m.model for m in client(server).list().models}
    assert {f"hf.co/{SMOL_REPO}:Q4_1", f"{SMOL_REPO}:Q4_1"} <= listed
    assert client(server).show(f"hf.co/{SMOL_REPO}:Q4_1").details.quantization_level == "Q4_1"


def test_a_second_pull_of_the_same_model_joins_the_first(pulls):
    server, hub, _ = pulls
    gate = threading.Event()
    hub.gates[Q8] = (20_000_000, gate)  # the stand-in holds the file there until the test goes on
    first = client(server).pull(f"{SMOL_REPO}:Q8_0", stream=True)
    assert next(first).status == "pulling manifest"
    second = client(server).pull(f"hf.co/{SMOL_REPO}:q8_0", stream=True)
    assert next(second).status == "pulling manifest"  # answered from the first pull's lines: it has joined
    gate.set()
    assert [line.status for line in first][-1] == [line.status for line in second][-1] == "success"
    assert len(hub.ranges(Q8)) == 1  # one download for both


def test_stream_false_answers_once_and_errors_come_with_their_status(pulls):
    server = pulls[0]
    done = client(server).pull(f"{SMOL_REPO}:Q4_1", stream=False)  # already here: verified, registered again
    assert done.status == "success" and done.completed is None
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as missing:
            list(client(server).pull(f"{SMOL_REPO}:Q2_K", stream=True)) if stream else client(server).pull(
                f"{SMOL_REPO}:Q2_K", stream=False)  # fmt: skip
        assert missing.value.status_code == 404 and "it has: Q4_1, Q8_0" in missing.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client(server).pull("not a repo")
    assert bad.value.status_code == 400 and "owner/repo" in bad.value.error


def test_delete_removes_a_pulled_models_files_but_not_while_a_request_for_it_waits(pulls):
    server, _, models_dir = pulls
    name = f"hf.co/{SMOL_REPO}:Q4_1"
    client(server).pull(name, stream=False)
    row = RequestLog.objects.create(request_id="waiting", endpoint="/api/chat", model=name)  # queued
    with pytest.raises(ollama.ResponseError) as busy:
        client(server).delete(name)
    assert busy.value.status_code == 409 and "1 request(s) queued or running" in busy.value.error
    assert (models_dir / "hf.co" / SMOL_REPO / SMOL_FILE).exists()

    RequestLog.objects.filter(pk=row.pk).update(status=RequestLog.Status.COMPLETED)
    assert client(server).delete(name).status == "success"
    assert not (models_dir / "hf.co" / SMOL_REPO / SMOL_FILE).exists()
    assert not LanguageModel.objects.filter(name=name).exists()
    assert name not in {m.model for m in client(server).list().models}


def test_a_pull_goes_on_when_the_client_that_started_it_goes_away(pulls):
    server, hub, models_dir = pulls
    name = "SmolLM2-135M-Instruct-Q6_K.gguf"
    hub.add(SMOL_REPO, name, default_model_path())
    gate = threading.Event()
    hub.gates[name] = (20_000_000, gate)
    with client(server) as gone:
        lines = gone.pull(f"{SMOL_REPO}:Q6_K", stream=True)
        assert next(lines).status == "pulling manifest"
        lines.close()  # the client hangs up mid-download
    gate.set()
    assert client(server).pull(f"{SMOL_REPO}:Q6_K", stream=False).status == "success"
    assert len(hub.ranges(name)) == 1  # the first pull finished the file: nothing was fetched twice
    assert (models_dir / "hf.co" / SMOL_REPO / name).exists()
