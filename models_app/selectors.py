"""Looking models up."""

from django.conf import settings

from api.errors import ModelNotFound

from .models import LanguageModel


def model_list() -> list[LanguageModel]:
    """Every model the API serves (enabled, file present)."""
    return list(LanguageModel.objects.filter(enabled=True, available=True))


def model_get(name: str) -> LanguageModel:
    """The served model called `name`, or ModelNotFound."""
    if "\x00" in name:  # PostgreSQL refuses NUL in text; no model is called that anyway
        raise ModelNotFound(name.replace("\x00", ""))
    try:
        return LanguageModel.objects.get(name=name, enabled=True, available=True)
    except LanguageModel.DoesNotExist:
        raise ModelNotFound(name) from None


def model_n_ctx(model: LanguageModel) -> int:
    """The context size the model is served with: its own setting, else MINERVA_N_CTX, capped by training."""
    n_ctx = model.n_ctx or settings.N_CTX or model.context_length or 2048
    return min(n_ctx, model.context_length) if model.context_length else n_ctx


def model_parallel(model: LanguageModel) -> int:
    """How many sequences the model decodes together: its own setting, else MINERVA_PARALLEL."""
    return model.n_parallel or settings.PARALLEL
