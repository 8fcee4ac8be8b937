"""API keys for DRF views (the history API): authentication, the staff permission, OpenAI-shaped errors.
Kept out of the views' module because DRF imports these classes while defining its own views."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.response import Response

from core.errors import MinervaError

from .services import InvalidApiKey, key_authenticate


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.headers.get("Authorization", "")
        key = key_authenticate(header) if header else None
        return (None, key) if key is not None else None

    def authenticate_header(self, request) -> str:  # makes DRF answer 401, not 403
        return 'Bearer realm="minerva"'


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """How the schema describes ApiKeyAuthentication: a bearer token."""

    target_class = ApiKeyAuthentication
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer"}


class IsStaffKey(permissions.BasePermission):
    """A staff API key, or (for the schema and its docs page in a browser) a staff user's admin session."""

    def has_permission(self, request, view) -> bool:
        if getattr(request.user, "is_staff", False):
            return True
        if request.auth is None:
            raise exceptions.NotAuthenticated()
        return request.auth.staff


def exception_handler(exc, context):
    """DRF errors in the OpenAI shape, like every other error Minerva sends."""
    if isinstance(exc, MinervaError):
        error = exc
    elif isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        error = InvalidApiKey("You didn't provide a valid API key.")
    else:
        from rest_framework.views import exception_handler as drf_exception_handler  # imports this module

        response = drf_exception_handler(exc, context)
        if response is None:
            return None
        error = MinervaError(str(getattr(exc, "detail", exc)))
        error.status = response.status_code
        if response.status_code == 403:
            error.type, error.code = "permission_error", "staff_key_required"
        elif response.status_code == 404:
            error.code = "not_found"
    response = Response(error.to_dict(), status=error.status)
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="minerva"'
    return response
