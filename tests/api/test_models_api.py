"""Minerva's own JSON for the model store (/minerva/api/pulls, /minerva/api/models/<name>, /minerva/api/memory),
for staff keys; the pull runs in-process here (Celery eager), against the Hub stand-in."""

import pytest

from access.services import key_create
from inference.models import RequestLog
from models_app.models import LanguageModel
from models_app.pulls import pulled_dir
from tests.conftest import SMOL_FILE, SMOL_REPO

pytestmark = pytest.mark.django_db(transaction=True)


def bearer(raw: str) -> dict:
    return {"Authorization": f"Bearer {raw}"}


def test_a_staff_key_pulls_watches_and_deletes_a_model(client, hub):
    _, staff = key_create(name="ops", staff=True)
    _, plain = key_create(name="app")
    assert client.post("/minerva/api/pulls", {"model": SMOL_REPO}, headers=bearer(plain)).status_code == 403

    started = client.post("/minerva/api/pulls", {"model": f"{SMOL_REPO}:Q4_1"}, headers=bearer(staff),
                          content_type="application/json")  # fmt: skip
    assert started.status_code == 202
    state = client.get(f"/minerva/api/pulls/{started.json()['id']}", headers=bearer(staff)).json()
    assert state == {"id": started.json()["id"], "status": "success", "done": True}
    assert (pulled_dir(SMOL_REPO) / SMOL_FILE).exists()

    missing = client.post("/minerva/api/pulls", {"model": f"{SMOL_REPO}:Q2_K"}, headers=bearer(staff),
                          content_type="application/json").json()  # fmt: skip
    assert missing["done"] and missing["status_code"] == 404 and "it has: Q4_1, Q8_0" in missing["error"]
    bad = client.post("/minerva/api/pulls", {"model": "x"}, headers=bearer(staff), content_type="application/json")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    assert client.get("/minerva/api/pulls/nope", headers=bearer(staff)).status_code == 404

    name = f"hf.co/{SMOL_REPO}:Q4_1"
    RequestLog.objects.create(request_id="running", endpoint="/v1/chat/completions", model=name,
                              status=RequestLog.Status.RUNNING)  # fmt: skip
    busy = client.delete(f"/minerva/api/models/{name}", headers=bearer(staff))
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_in_use"
    RequestLog.objects.filter(request_id="running").update(status=RequestLog.Status.COMPLETED)
    deleted = client.delete(f"/minerva/api/models/{name}", headers=bearer(staff)).json()
    assert deleted == {"deleted": name, "files": [str((pulled_dir(SMOL_REPO) / SMOL_FILE).resolve())]}
    assert not LanguageModel.objects.filter(name=name).exists() and not pulled_dir(SMOL_REPO).exists()
    schema = client.get("/minerva/api/schema?format=json", headers=bearer(staff)).json()
    paths = {"/minerva/api/pulls", "/minerva/api/pulls/{pull_id}", "/minerva/api/models/{name}", "/minerva/api/memory"}
    assert paths <= set(schema["paths"])


def test_deleting_a_model_that_was_not_pulled_keeps_its_file(client, smollm2):
    _, staff = key_create(name="ops", staff=True)
    refused = client.delete(f"/minerva/api/models/{smollm2.name}", headers=bearer(staff))
    assert refused.status_code == 400 and "was not pulled" in refused.json()["error"]["message"]
    assert LanguageModel.objects.filter(name=smollm2.name).exists()
