"""Registering models: the default model and any *.gguf dropped into the models dir."""

import shutil

import pytest

from api.errors import ModelNotFound
from models_app.models import LanguageModel
from models_app.selectors import model_get, model_n_ctx
from models_app.services import default_model_path, models_sync

pytestmark = pytest.mark.django_db


def test_the_default_model_is_registered_with_its_context_length():
    models_sync()
    model = model_get("smollm2-135m-instruct")
    assert model.context_length == 8192
    assert model_n_ctx(model) == 4096  # MINERVA_N_CTX caps it
    assert model.queue == "minerva.model.smollm2-135m-instruct"


def test_gguf_files_in_the_models_dir_are_registered_by_stem(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    (tmp_path / "team").mkdir()
    shutil.copy(default_model_path(), tmp_path / "team" / "my-model.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"not a model")
    names = {m.name for m in models_sync()}
    assert "my-model" in names and "broken" not in names


def test_a_vanished_file_makes_its_model_unavailable(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    shutil.copy(default_model_path(), tmp_path / "gone.gguf")
    models_sync()
    (tmp_path / "gone.gguf").unlink()
    models_sync()
    assert not LanguageModel.objects.get(name="gone").available
    with pytest.raises(ModelNotFound):
        model_get("gone")
