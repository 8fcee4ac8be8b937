"""Django admin lists models and request logs; request logs are read-only."""

import pytest
from django.core.exceptions import ValidationError

from inference.models import RequestLog
from models_app.models import LanguageModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(admin_client, smollm2):
    RequestLog.objects.create(request_id="abc123", endpoint="/v1/chat/completions", model=smollm2.name, status_code=200)
    return admin_client


def test_admin_lists_models(staff):
    response = staff.get("/admin/models_app/languagemodel/")
    assert response.status_code == 200
    assert b"smollm2-135m-instruct" in response.content


def test_admin_lists_request_logs_with_filters(staff):
    response = staff.get("/admin/inference/requestlog/?status_code=200&model=smollm2-135m-instruct")
    assert response.status_code == 200
    assert b"abc123" in response.content
    assert b"By status code" in response.content and b"By created" in response.content


def test_request_logs_cannot_be_added_changed_or_deleted(staff):
    row = RequestLog.objects.get(request_id="abc123")
    assert staff.get("/admin/inference/requestlog/add/").status_code == 403
    assert staff.post(f"/admin/inference/requestlog/{row.pk}/change/", {"model": "x"}).status_code == 403
    assert staff.post(f"/admin/inference/requestlog/{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert RequestLog.objects.get(pk=row.pk).model == "smollm2-135m-instruct"


def test_the_model_page_shows_readable_metadata_and_takes_aliases(staff, smollm2):
    page = staff.get(f"/admin/models_app/languagemodel/{smollm2.pk}/change/")
    assert page.status_code == 200
    assert b"<th>vocab_size</th><td>49152</td>" in page.content


def test_the_rescan_action_registers_new_files(staff, settings, tmp_path):
    from tests.models_app.test_metadata import write_gguf

    settings.MODELS_DIR = tmp_path
    write_gguf(tmp_path / "fresh.gguf")
    any_pk = LanguageModel.objects.first().pk
    response = staff.post("/admin/models_app/languagemodel/", {"action": "rescan", "_selected_action": [any_pk]})
    assert response.status_code == 302
    assert LanguageModel.objects.filter(name="fresh", available=True).exists()


def test_disable_action_hides_a_model_from_the_api(staff, smollm2):
    staff.post("/admin/models_app/languagemodel/", {"action": "disable", "_selected_action": [smollm2.pk]})
    assert not LanguageModel.objects.get(pk=smollm2.pk).enabled


@pytest.mark.django_db(transaction=True)
def test_the_models_admin_loads_and_unloads_through_the_models_queue(admin_client, smollm2):
    changelist = "/admin/models_app/languagemodel/"
    for action, done in (("load_now", "load"), ("unload_now", "unload")):
        page = admin_client.post(changelist, {"action": action, "_selected_action": [smollm2.pk]}, follow=True)
        assert f"{done.capitalize()}ed {smollm2.name}".encode() in page.content
    rows = RequestLog.objects.filter(endpoint=changelist).order_by("created")
    assert [(r.finish_reason, r.status) for r in rows] == [("load", "completed"), ("unload", "completed")]


def test_the_admin_pulls_a_model_and_shows_its_progress(admin_client, hub):
    from tests.conftest import SMOL_REPO

    assert b"Pull from Hugging Face" in admin_client.get("/admin/models_app/languagemodel/").content
    form = admin_client.get("/admin/models_app/languagemodel/pull/")
    assert form.status_code == 200 and b'name="ref"' in form.content
    started = admin_client.post("/admin/models_app/languagemodel/pull/", {"ref": f"{SMOL_REPO}:Q4_1"})
    assert started.status_code == 302  # to the progress page (Celery is eager here: the pull has run)
    page = admin_client.get(started["Location"])
    assert b'<p id="pull-status">success</p>' in page.content and b"refresh" not in page.content
    model = LanguageModel.objects.get(name=f"hf.co/{SMOL_REPO}:Q4_1")
    action = {"action": "pull_again", "_selected_action": [model.pk]}
    again = admin_client.post("/admin/models_app/languagemodel/", action, follow=True)
    assert b"Pulling hf.co/" in again.content and b"progress</a>" in again.content
    refused = admin_client.post("/admin/models_app/languagemodel/pull/", {"ref": "not a repo"})
    assert b"is not a Hugging Face model" in refused.content


def test_the_model_page_offers_a_draft_model_but_not_itself_nor_one_with_another_vocabulary(staff, smollm2):
    page = staff.get(f"/admin/models_app/languagemodel/{smollm2.pk}/change/")
    assert b'name="draft_model"' in page.content
    smollm2.draft_model = smollm2
    with pytest.raises(ValidationError, match="a model cannot draft for itself"):
        smollm2.full_clean()
    smollm2.draft_model = LanguageModel.objects.get(name="all-minilm-l6-v2")
    with pytest.raises(ValidationError, match="vocabulary of 30522 tokens, this model 49152: a draft model must share"):
        smollm2.full_clean()
