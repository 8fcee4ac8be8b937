"""/v1/models in Anthropic's shape for requests that carry `anthropic-version` (the official client sends it), OpenAI's
for the others; and how Minerva's errors map onto Anthropic's types and statuses."""

import anthropic
import httpx2 as httpx
import pytest

from access.services import InvalidApiKey, RateLimited
from api.anthropic.views import error_type
from core.errors import (
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    PermissionDenied,
    RequestTooLarge,
    ServerError,
    ServiceUnavailable,
    Timeout,
)
from tests.conftest import MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_the_client_lists_and_retrieves_models_in_anthropics_shape(client):
    page = client.models.list()
    ids = [model.id for model in page.data]
    assert MODEL in ids and page.has_more is False
    assert page.first_id == ids[0] and page.last_id == ids[-1]
    model = client.models.retrieve(MODEL)
    assert model.type == "model" and model.id == MODEL == model.display_name
    assert model.created_at.year >= 2024
    assert model.model_dump()["max_input_tokens"] == 8192


def test_the_list_pages_by_limit_and_cursor(client):
    everything = [model.id for model in client.models.list(limit=1000).data]
    first = client.models.list(limit=1)
    assert [model.id for model in first.data] == everything[:1] and first.has_more == (len(everything) > 1)
    assert [model.id for model in client.models.list(after_id=everything[0]).data] == everything[1:]
    assert [model.id for model in client.models.list(before_id=everything[-1]).data] == everything[:-1]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.models.list(limit=0)
    assert caught.value.body["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_a_404_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.models.retrieve("claude-opus-4-1")
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "not_found_error"


def test_without_anthropic_version_models_stay_in_openais_shape(anthropic_server, api_key):
    url = f"http://127.0.0.1:{anthropic_server.port}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}", "Host": "127.0.0.1"}
    listing = httpx.get(url, headers=headers).json()
    assert listing["object"] == "list" and MODEL in [entry["id"] for entry in listing["data"]]
    assert httpx.get(f"{url}/{MODEL}", headers=headers).json()["object"] == "model"
    unauthorized = httpx.get(url, headers={"Host": "127.0.0.1"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
    versioned = httpx.get(url, headers={"Host": "127.0.0.1", "anthropic-version": "2023-06-01"})
    assert versioned.status_code == 401 and versioned.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [(InvalidRequest("x"), 400, "invalid_request_error"), (InvalidApiKey("x"), 401, "authentication_error"),
     (PermissionDenied("x"), 403, "permission_error"), (ModelNotFound("x"), 404, "not_found_error"),
     (MethodNotAllowed("x"), 405, "invalid_request_error"), (RequestTooLarge("x"), 413, "request_too_large"),
     (RateLimited("x"), 429, "rate_limit_error"), (ServerError(), 500, "api_error"),
     (ServiceUnavailable("x"), 529, "overloaded_error"), (Timeout("x"), 504, "api_error")],
)  # fmt: skip
def test_minerva_errors_map_onto_anthropics_types_and_statuses(error, status, kind):
    assert error_type(error) == (status, kind)
