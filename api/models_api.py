"""Our own JSON for the model store, for staff keys: start or watch a pull from Hugging Face, delete a pulled
model, and the workers' memory (system and GPU budgets, what each loaded model takes)."""

import re

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, generics, serializers
from rest_framework.response import Response

from core.errors import InvalidRequest
from inference.services import model_delete
from models_app.hub import HubError
from models_app.models import LanguageModel
from models_app.pulls import pull_start, pull_state
from models_app.selectors import memory_status
from models_app.services import RegistryError

PULL_ID_RE = re.compile(r"^[0-9a-f]{24}$")


class PullSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=600, help_text="owner/repo[:QUANT or file.gguf][@revision]")


class PullStateSerializer(serializers.Serializer):
    id = serializers.CharField()
    status = serializers.CharField(required=False, help_text="Ollama's progress status, e.g. `pulling 3f2a…`")
    digest = serializers.CharField(required=False)
    total = serializers.IntegerField(required=False)
    completed = serializers.IntegerField(required=False)
    error = serializers.CharField(required=False)
    status_code = serializers.IntegerField(required=False, help_text="With `error`: the HTTP status it maps to")
    done = serializers.BooleanField()


class DeletedSerializer(serializers.Serializer):
    deleted = serializers.CharField()
    files = serializers.ListField(child=serializers.CharField(), help_text="The files removed")


class MemorySerializer(serializers.Serializer):
    workers = serializers.ListField(child=serializers.DictField(), help_text="models_app.selectors.memory_status()")


class Pulls(generics.GenericAPIView):
    """Start a pull (a task on the workers' pull queue), or join the one already running for the same model."""

    serializer_class = PullSerializer

    @extend_schema(responses={202: PullStateSerializer})
    def post(self, request):
        body = PullSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            key = pull_start(ref=body.validated_data["model"])
        except HubError as exc:
            raise InvalidRequest(exc.message, param="model") from None
        return Response(pull_state(key) or {"id": key, "status": "queued", "done": False}, status=202)


class PullDetail(generics.GenericAPIView):
    """A pull's latest progress line; `done` once it ended with `success` or an `error`."""

    serializer_class = PullStateSerializer

    def get(self, request, pull_id: str):
        state = pull_state(pull_id) if PULL_ID_RE.match(pull_id) else None
        if state is None:
            raise exceptions.NotFound(f"No pull {pull_id}.")
        return Response(state)


class ModelDetail(generics.GenericAPIView):
    """Delete a pulled model: its files and registry row (409 while requests for it are queued or running)."""

    serializer_class = DeletedSerializer

    def delete(self, request, name: str):
        model = LanguageModel.objects.filter(name=name).first()
        if model is None:
            raise exceptions.NotFound(f"No model {name}.")
        try:
            removed = model_delete(model=model)
        except RegistryError as exc:
            raise InvalidRequest(str(exc), param="name") from None
        return Response({"deleted": name, "files": [str(f) for f in removed]})


class Memory(generics.GenericAPIView):
    """Per live worker: system and GPU memory budgets, GPUs, and each loaded model's size and size_vram."""

    serializer_class = MemorySerializer

    def get(self, request):
        return Response({"workers": memory_status()})
