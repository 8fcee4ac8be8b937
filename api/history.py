"""Our own JSON (not OpenAI's): the request history for staff keys, with an OpenAPI schema (drf-spectacular)."""

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate
from drf_spectacular.utils import OpenApiParameter, extend_schema
from drf_spectacular.views import SpectacularAPIView
from rest_framework import exceptions, generics
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from inference.models import RequestLog

from .serializers import RequestLogSerializer, UsageSerializer

FILTERS = ["model", "status", "status_code", "endpoint", "api_key_prefix"]


@extend_schema(parameters=[OpenApiParameter(name, str) for name in [*FILTERS, "since", "until"]])
class RequestList(generics.ListAPIView):
    """Request log rows, newest first; filter by any of the parameters, page with limit/offset."""

    serializer_class = RequestLogSerializer

    def get_queryset(self):
        params = self.request.query_params
        rows = RequestLog.objects.filter(**{name: params[name] for name in FILTERS if params.get(name)})
        if params.get("since"):
            rows = rows.filter(created__date__gte=params["since"])
        if params.get("until"):
            rows = rows.filter(created__date__lte=params["until"])
        return rows


class RequestDetail(generics.RetrieveAPIView):
    """One request, by the id sent back as x-request-id (with or without its `req_` prefix)."""

    serializer_class = RequestLogSerializer
    queryset = RequestLog.objects.all()

    def get_object(self):
        request_id = self.kwargs["request_id"].removeprefix("req_")
        log = RequestLog.objects.filter(request_id=request_id).first()
        if log is None:
            raise exceptions.NotFound(f"No request {request_id}.")
        return log


class Usage(generics.GenericAPIView):
    """Requests and tokens per day, key and model."""

    serializer_class = UsageSerializer

    def get(self, request):
        rows = (
            RequestLog.objects.annotate(day=TruncDate("created"))
            .values("day", "api_key_prefix", "model")
            .annotate(
                requests=Count("id"), prompt_tokens=Sum("prompt_tokens"), completion_tokens=Sum("completion_tokens")
            )
            .order_by("day", "api_key_prefix", "model")
        )
        return Response(UsageSerializer(rows, many=True).data)


class _JsonErrors:
    """Errors as OpenAI-shaped JSON even on views that render YAML or HTML (the schema, its docs page)."""

    def finalize_response(self, request, response, *args, **kwargs):
        if response.status_code >= 400:
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), "application/json"
        return super().finalize_response(request, response, *args, **kwargs)


class Schema(_JsonErrors, SpectacularAPIView):
    """The history API's OpenAPI document."""
