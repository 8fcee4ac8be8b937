"""Registering model files in the registry."""

import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction

from .bundled import DEFAULT_MODEL_PACKAGE, default_model_path
from .metadata import MetadataError, read_gguf_metadata
from .models import LanguageModel

logger = logging.getLogger(__name__)


def model_register(*, name: str, path: Path) -> LanguageModel:
    """Create or update the registry row for a model file, reading its header."""
    path = Path(path).resolve()
    metadata = read_gguf_metadata(path)  # raises MetadataError before anything is written
    with transaction.atomic():
        model, created = LanguageModel.objects.update_or_create(
            name=name,
            defaults={
                "path": str(path),
                "format": metadata.format,
                "metadata": metadata.summary(),
                "context_length": metadata.context_length,
                "available": True,
            },
        )
    logger.info("%s model %s (%s)", "registered" if created else "refreshed", name, path)
    return model


def models_sync() -> list[LanguageModel]:
    """Register the default model and every *.gguf under MINERVA_MODELS_DIR; mark vanished files unavailable."""
    found: list[LanguageModel] = []
    default = default_model_path()
    if default is not None:
        found.append(model_register(name=settings.DEFAULT_MODEL, path=default))
    else:
        logger.warning("the default model package %s is not installed", DEFAULT_MODEL_PACKAGE)
    if settings.MODELS_DIR.is_dir():
        for path in sorted(settings.MODELS_DIR.rglob("*.gguf")):
            try:
                found.append(model_register(name=path.stem, path=path))
            except MetadataError as exc:
                logger.warning("skipping %s: %s", path, exc)
    for model in LanguageModel.objects.exclude(pk__in=[m.pk for m in found]):
        available = Path(model.path).is_file()
        if model.available != available:
            model.available = available
            model.save(update_fields=["available", "updated"])
    return found
