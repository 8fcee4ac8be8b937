"""Ollama's model endpoints (version, tags, show, ps, copy, delete, push, create), loading and unloading with
keep_alive, and the request log and metrics, through the official `ollama` client against a real `serve`."""

import time

import httpx2 as httpx
import ollama
import pytest

from access.services import key_create
from inference.models import RequestLog
from models_app.models import LanguageModel
from tests.conftest import HELLO, MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

OPTIONS = {"temperature": 0, "num_predict": 5}


def loaded(client) -> set[str]:
    return {m.model for m in client.ps().models}


def wait_until(predicate, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.3)


def test_version_and_tags_list_the_registry_in_ollamas_shape(client, minerva_server):
    version = httpx.get(f"http://127.0.0.1:{minerva_server.port}/api/version").json()["version"]
    assert version.count(".") == 2
    [model] = [m for m in client.list().models if m.model == MODEL]
    assert model.size > 50_000_000 and len(model.digest) == 64 and model.modified_at is not None
    details = model.details
    assert details.format == "gguf" and details.family == "llama" and details.families == ["llama"]
    assert details.parameter_size and details.quantization_level


def test_show_gives_details_model_info_template_and_capabilities(client):
    shown = client.show(MODEL)
    info = shown.modelinfo
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 8192
    assert info["llama.block_count"] == 30 and info["general.parameter_count"] > 100_000_000
    assert "<|im_start|>" in shown.template and shown.capabilities[0] == "completion"
    assert shown.details.family == "llama" and shown.modified_at is not None
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404


def test_show_reports_default_params_as_parameters(client, smollm2):
    smollm2.default_params = {"temperature": 0.2, "stop": ["<|im_end|>"]}
    smollm2.save()
    parameters = client.show(MODEL).parameters.splitlines()
    assert [p.split() for p in parameters] == [["stop", '"<|im_end|>"'], ["temperature", "0.2"]]


def test_a_load_only_request_loads_and_keep_alive_0_unloads(client):
    for reply in (client.chat(model=MODEL, messages=[]), client.generate(model=MODEL)):
        assert reply.done and reply.done_reason == "load" and reply.eval_count == 0
    [running] = [m for m in client.ps().models if m.model == MODEL]
    assert running.size > 0 and running.context_length > 0 and running.details.family == "llama"
    assert running.expires_at.timestamp() > time.time()
    unloaded = client.generate(model=MODEL, keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert MODEL not in loaded(client)  # unloaded before the answer, when nothing else runs on it
    streamed = list(client.chat(model=MODEL, messages=[], stream=True))
    assert [p.done_reason for p in streamed] == ["load"] and MODEL in loaded(client)


def test_keep_alive_0_on_a_chat_unloads_the_model_once_it_answered(client):
    reply = client.chat(model=MODEL, messages=HELLO, options=OPTIONS, keep_alive="10m")
    assert reply.done and MODEL in loaded(client)
    [running] = [m for m in client.ps().models if m.model == MODEL]
    assert running.expires_at.timestamp() > time.time() + 300
    assert client.chat(model=MODEL, messages=HELLO, options=OPTIONS, keep_alive=0).message.content
    wait_until(lambda: MODEL not in loaded(client))


def test_a_keep_alive_past_any_clock_is_forever_and_ps_still_answers(client):
    assert client.chat(model=MODEL, messages=HELLO, options=OPTIONS, keep_alive=1e12).done  # 31,700 years
    [running] = [m for m in client.ps().models if m.model == MODEL]  # was a 500: no date that far
    assert running.expires_at.year > 2300  # Ollama's "forever"
    client.chat(model=MODEL, messages=[], keep_alive="5m")


def test_copy_makes_an_alias_to_chat_with_and_delete_removes_it_then_disables_the_model(client):
    assert client.copy(MODEL, "my-assistant").status == "success"
    assert "my-assistant" in {m.model for m in client.list().models}
    assert client.chat(model="my-assistant", messages=HELLO, options=OPTIONS).message.content
    assert client.chat(model=f"{MODEL}:latest", messages=HELLO, options=OPTIONS).message.content
    assert client.delete("my-assistant").status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="my-assistant", messages=HELLO)
    assert caught.value.status_code == 404
    assert LanguageModel.objects.get(name=MODEL).enabled
    client.delete(MODEL)
    assert not LanguageModel.objects.get(name=MODEL).enabled  # disabled; the file stays
    assert MODEL not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete(MODEL)
    assert caught.value.status_code == 404


def test_changing_the_registry_needs_a_staff_key(client, minerva_server):
    _, plain = key_create(name="app")
    host = f"http://127.0.0.1:{minerva_server.port}"
    with ollama.Client(host=host, headers={"Authorization": f"Bearer {plain}"}) as keyed:
        for call in (lambda: keyed.copy(MODEL, "mine"), lambda: keyed.delete(MODEL)):
            with pytest.raises(ollama.ResponseError) as caught:
                call()
            assert caught.value.status_code == 403 and "staff key" in caught.value.error
        assert keyed.list().models  # reading is for every key
    assert LanguageModel.objects.get(name=MODEL).enabled


def test_push_and_create_say_how_models_are_added(client):
    for call in (lambda: client.push(MODEL), lambda: client.create("x", from_=MODEL)):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 501 and "Getting models" in caught.value.error


def test_unknown_paths_and_methods_answer_in_ollamas_shape(minerva_server, smollm2):
    base = f"http://127.0.0.1:{minerva_server.port}"
    missing = httpx.get(f"{base}/api/nope")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}
    wrong = httpx.get(f"{base}/api/chat")
    assert wrong.status_code == 405 and set(wrong.json()) == {"error"} and wrong.headers["Allow"] == "POST"
    not_json = httpx.post(f"{base}/api/chat", content=b"{nope")
    assert not_json.status_code == 400 and set(not_json.json()) == {"error"}
    assert "JSON" in not_json.json()["error"] and "OpenAI" not in not_json.json()["error"]  # not another API's words
    foreign = httpx.get(f"{base}/api/tags", headers={"Host": "evil.example"})
    assert foreign.status_code == 400 and set(foreign.json()) == {"error"}
    page = httpx.post(f"{base}/api/chat", headers={"Origin": "https://evil.example"}, json={"model": MODEL})
    assert page.status_code == 403 and set(page.json()) == {"error"}


def test_each_request_is_logged_once_and_counted_by_route(minerva_server, smollm2):
    base = f"http://127.0.0.1:{minerva_server.port}"
    requests = [
        ("/api/chat", {"model": MODEL, "messages": HELLO, "options": OPTIONS, "stream": False}, 200),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": OPTIONS}, 200),  # streamed
        ("/api/chat", {"model": "no-such-model", "messages": HELLO}, 404),
        ("/api/show", {"model": MODEL}, 200),
    ]
    for path, body, status in requests:
        response = httpx.post(f"{base}{path}", json=body, timeout=60)
        assert response.status_code == status
        request_id = response.headers["x-request-id"].removeprefix("req_")
        wait_until(lambda rid=request_id: RequestLog.objects.filter(request_id=rid).exclude(status_code=None)
                   .exclude(status__in=["queued", "running"]).exists())  # fmt: skip
        [row] = RequestLog.objects.filter(request_id=request_id)
        assert row.endpoint == path and row.status_code == status
    metrics = httpx.get(f"{base}/metrics").text
    for series in (f'endpoint="/api/chat",model="{MODEL}",status="200"',
                   f'endpoint="/api/generate",model="{MODEL}",status="200"',
                   'endpoint="/api/chat",model="unknown",status="404"', 'endpoint="/api/show"'):  # fmt: skip
        assert series in metrics, series
