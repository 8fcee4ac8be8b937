"""Reading stored responses: only the requesting key's own (without a key, those made without one; a staff key
sees every key's), so another key's response is a 404, never a 403 that admits it exists."""

from access.models import ApiKey
from core.errors import InvalidRequest, NotFound

from .models import StoredResponse


def response_get(response_id: str, *, api_key: ApiKey | None, param: str = "response_id") -> StoredResponse:
    """The response with that id if `api_key` may see it, or a 404 naming `param`."""
    responses = StoredResponse.objects.all()
    if api_key is None or not api_key.staff:
        responses = responses.filter(api_key_prefix=api_key.prefix if api_key is not None else "")
    response = responses.filter(pk=response_id).first()
    if response is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param=param)
    return response


def response_input_items(response: StoredResponse, *, after: str | None, limit: int,
                         order: str) -> tuple[list[dict], bool]:  # fmt: skip
    """A page of the response's input items (the conversation it was given), in `order` ("asc": oldest first),
    after the item with id `after`; and whether more follow."""
    items = response.input_items if order == "asc" else response.input_items[::-1]
    if after:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequest(f"No input item with id '{after}' in response {response.id}.", param="after")
        items = items[ids.index(after) + 1 :]
    return items[:limit], len(items) > limit
