"""The registry: discovery under the model roots, change detection, aliases, the CLI and /v1/models."""

import json
import os
import shutil
import time

import gguf
import numpy as np
import pytest
from django.core.management import call_command

from core.errors import ModelNotFound
from models_app.bundled import default_model_path
from models_app.metadata import kv_bytes_per_token
from models_app.models import LanguageModel
from models_app.selectors import model_get, model_n_ctx, model_shared_cells
from models_app.services import RegistryError, model_alias_delete, model_register, models_scan, models_set_enabled
from tests.models_app.test_metadata import write_gguf, write_safetensors

pytestmark = pytest.mark.django_db


@pytest.fixture
def models_dir(settings, tmp_path):
    settings.MODELS_DIR = tmp_path / "models"
    settings.MODELS_DIR.mkdir()
    return settings.MODELS_DIR


def test_the_default_model_is_registered_with_its_metadata():
    models_scan()
    model = model_get("smollm2-135m-instruct")
    assert (model.context_length, model.quantization, model.format) == (8192, "Q4_1", "gguf")
    assert model_n_ctx(model) == 8192  # its trained context: the memory budget holds its KV cache
    assert model.queue == "minerva.model.smollm2-135m-instruct"
    assert model.metadata["vocab_size"] == 49152


def test_a_models_context_is_its_trained_one_unless_set_or_the_memory_budget_is_too_small(settings):
    models_scan()
    model = model_get("smollm2-135m-instruct")
    settings.N_CTX = 2048
    assert model_n_ctx(model) == 2048  # MINERVA_N_CTX sets it
    settings.N_CTX = 100_000
    assert model_n_ctx(model) == 8192  # never past what the model was trained for
    settings.N_CTX = 0
    # SmolLM2 takes 30 layers x 3 KV heads x (64 + 64) x 2 bytes = 23,040 bytes of f16 KV cache per token; half
    # the budget must hold the weights and the cache.
    per_token = kv_bytes_per_token(model.metadata)
    assert per_token == 23_040
    settings.SHARED_CONTEXT = "on"  # one cache for the slots
    settings.MEMORY_BUDGET = 2 * (model.file_size + 5000 * per_token)
    assert model_n_ctx(model) == 4864  # 5,000 tokens fit; in steps of 256
    settings.SHARED_CONTEXT, settings.PARALLEL = "off", 2  # a cache per slot: two caches beside one set of weights
    settings.MEMORY_BUDGET = 2 * (model.file_size + 2 * 5000 * per_token)
    assert model_n_ctx(model) == 4864
    settings.SHARED_CONTEXT = "on"
    settings.KV_CACHE_TYPE = "q8_0"  # about half the bytes per token: the trained context fits again
    assert model_n_ctx(model) == 8192
    settings.MEMORY_BUDGET = model.file_size  # nothing fits: the floor still serves 2,048
    assert model_n_ctx(model) == 2048


def test_by_default_slots_share_one_cache_only_when_a_cache_each_would_not_fit(settings):
    models_scan()
    model = model_get("smollm2-135m-instruct")
    per_token = kv_bytes_per_token(model.metadata)
    settings.SHARED_CONTEXT, settings.N_CTX, settings.PARALLEL = "auto", 0, 4
    settings.MEMORY_BUDGET = 2 * 4 * (model.file_size + 8192 * per_token)  # four slots of 8,192 fit: apart
    assert not model_shared_cells(model) and model_n_ctx(model) == 8192
    settings.MEMORY_BUDGET = 2 * (model.file_size + 8192 * per_token)  # only one does: the slots share it
    assert model_shared_cells(model) and model_n_ctx(model) == 8192
    settings.PARALLEL = 1  # one slot has nothing to share
    assert not model_shared_cells(model)
    settings.SHARED_CONTEXT, settings.PARALLEL = "off", 4  # asked for apart: the context is lowered instead
    assert not model_shared_cells(model) and model_n_ctx(model) < 8192


def test_a_scan_finds_gguf_split_and_safetensors_models(models_dir):
    (models_dir / "team").mkdir()
    shutil.copy(default_model_path(), models_dir / "team" / "my-model.gguf")
    write_gguf(models_dir / "big.gguf", tensors=2, split_max_tensors=1)
    write_safetensors(models_dir / "single.safetensors", {"a": ("BF16", [4])})
    folder = models_dir / "qwen-tiny"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"a": ("BF16", [4])})
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (models_dir / "broken.gguf").write_bytes(b"not a model")
    result = models_scan()
    assert set(result.added) == {"smollm2-135m-instruct", "all-minilm-l6-v2", "my-model", "big", "single", "qwen-tiny"}
    assert list(result.errors) == [str(models_dir / "broken.gguf")]
    assert LanguageModel.objects.get(name="big").metadata["tensor_count"] == 2
    assert LanguageModel.objects.get(name="qwen-tiny").format == "safetensors"


def test_a_rescan_rereads_only_changed_files_and_marks_vanished_ones_unavailable(models_dir):
    write_gguf(models_dir / "a.gguf")
    write_gguf(models_dir / "b.gguf")
    models_scan()
    write_gguf(models_dir / "a.gguf", tensors=3)
    os.utime(models_dir / "a.gguf", (time.time() + 10, time.time() + 10))
    (models_dir / "b.gguf").unlink()
    result = models_scan()
    assert result.changed == ["a"] and result.unavailable == ["b"] and "smollm2-135m-instruct" in result.unchanged
    assert LanguageModel.objects.get(name="a").metadata["tensor_count"] == 3
    assert not LanguageModel.objects.get(name="b").available  # the row stays, for the request logs
    with pytest.raises(ModelNotFound):
        model_get("b")


def test_a_symlink_pointing_out_of_the_model_roots_is_refused(models_dir, tmp_path):
    write_gguf(tmp_path / "outside.gguf")
    (models_dir / "sneaky.gguf").symlink_to(tmp_path / "outside.gguf")
    result = models_scan()
    assert "sneaky" not in result.added and "not under a model root" in result.errors[str(models_dir / "sneaky.gguf")]
    with pytest.raises(RegistryError, match="not under a model root"):
        model_register(name="x", path=models_dir / ".." / "outside.gguf")


def test_a_fifo_in_the_models_dir_is_skipped(models_dir):
    os.mkfifo(models_dir / "pipe.gguf")
    result = models_scan()
    assert "pipe" not in result.added and str(models_dir / "pipe.gguf") in result.errors


def test_aliases_resolve_to_their_model_and_names_are_validated(models_dir):
    write_gguf(models_dir / "tiny.gguf")
    model_register(name="tiny", path=models_dir / "tiny.gguf", aliases=["gpt-4o-mini"])
    assert model_get("gpt-4o-mini").name == "tiny"
    with pytest.raises(RegistryError, match="invalid model name"):
        model_register(name="bad name!", path=models_dir / "tiny.gguf")


def test_a_models_own_name_wins_over_another_models_alias_and_a_disabled_models_alias_is_not_found(models_dir):
    write_gguf(models_dir / "tiny.gguf")
    write_gguf(models_dir / "other.gguf")
    model_register(name="other", path=models_dir / "other.gguf", aliases=["tiny", "old"])
    model_register(name="tiny", path=models_dir / "tiny.gguf")
    assert model_get("tiny").name == "tiny" and model_get("old").name == "other"
    models_set_enabled(names=["other"], enabled=False)
    with pytest.raises(ModelNotFound):
        model_get("old")


def test_a_model_looked_up_again_costs_no_query_until_the_registry_changes(models_dir, django_assert_num_queries):
    write_gguf(models_dir / "tiny.gguf")
    model_register(name="tiny", path=models_dir / "tiny.gguf", aliases=["small"])
    model_get("tiny"), model_get("small")
    with django_assert_num_queries(0):
        assert model_get("tiny").name == "tiny" and model_get("small").name == "tiny"
    row = LanguageModel.objects.get(name="tiny")
    row.n_ctx = 512
    row.save()  # a save anywhere (the admin, another process) is seen by the next lookup
    assert model_get("small").n_ctx == 512
    model_alias_delete(name="small")
    with pytest.raises(ModelNotFound):
        model_get("small")
    models_set_enabled(names=["tiny"], enabled=False)  # a queryset update
    with pytest.raises(ModelNotFound):
        model_get("tiny")


def test_a_looked_up_model_is_the_callers_own_copy(models_dir):
    write_gguf(models_dir / "tiny.gguf")
    model_register(name="tiny", path=models_dir / "tiny.gguf")
    model_get("tiny").generates = False
    model_get("tiny").n_ctx = 1
    assert not hasattr(model_get("tiny"), "generates") and model_get("tiny").n_ctx is None


def test_the_cli_adds_inspects_lists_disables_and_removes(models_dir, capsys):
    write_gguf(models_dir / "tiny.gguf")
    call_command("models", "add", str(models_dir / "tiny.gguf"), "--name", "tiny", "--alias", "small")
    call_command("models", "--json", "list")
    listed = {
        row["name"]: row for row in json.loads(capsys.readouterr().out.split("added tiny", 1)[-1].split("\n", 1)[1])
    }
    assert listed["tiny"]["aliases"] == ["small"] and listed["tiny"]["quantization"] == "F32"
    call_command("models", "--json", "inspect", str(models_dir / "tiny.gguf"))
    assert json.loads(capsys.readouterr().out)["context_length"] == 2048
    call_command("models", "disable", "tiny")
    assert not LanguageModel.objects.get(name="tiny").enabled
    call_command("models", "remove", "tiny")
    assert not LanguageModel.objects.filter(name="tiny").exists()


def test_the_cli_table_and_scan_are_human_readable(models_dir, capsys):
    call_command("models", "scan")
    assert "added: 2" in capsys.readouterr().out  # the bundled SmolLM2 and all-MiniLM-L6-v2
    call_command("models", "list")
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["NAME", "FORMAT", "QUANTIZATION"] and "135M" in out


@pytest.mark.django_db(transaction=True)
async def test_v1_models_entries_carry_meta_and_stay_small(async_client, models_dir):
    from asgiref.sync import sync_to_async

    from inference.run import model_cache

    await sync_to_async(models_scan)()
    await sync_to_async(write_gguf)(models_dir / "off.gguf")
    off = await sync_to_async(model_register)(name="off", path=models_dir / "off.gguf")
    off.enabled = False
    await off.asave()
    # An earlier test's request may have left the model loaded in this process, whose heartbeat says so in Redis.
    await sync_to_async(model_cache().unload)("smollm2-135m-instruct")
    data = (await async_client.get("/v1/models")).json()
    assert [m["id"] for m in data["data"]] == ["all-minilm-l6-v2", "smollm2-135m-instruct"]
    assert data["data"][0]["meta"]["architecture"] == "bert" and data["data"][0]["context_length"] == 512
    entry = data["data"][1]
    assert entry["max_model_len"] == entry["context_length"] == 8192
    expected = {
        "format": "gguf",
        "architecture": "llama",
        "quantization": "Q4_1",
        "file_size": 98362432,
        "tensor_count": 272,
        "layers": 30,
        "vocab_size": 49152,
        "trained_context_length": 8192,
        "loaded": False,
    }
    assert {k: v for k, v in entry["meta"].items() if k != "parameters"} == expected
    assert 134e6 < entry["meta"]["parameters"] < 136e6
    assert len(json.dumps(entry)) <= 1024
    assert (await async_client.get("/v1/models/off")).status_code == 404


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("default_params", {"temperature": "hot"}, "default_params"),
        ("default_params", {"tools": []}, "unknown parameters: tools"),
        ("keep_alive", "soon", "keep_alive"),
    ],
    ids=["wrong type", "unknown key", "bad duration"],
)
def test_bad_load_options_are_refused_by_validation(field, value, message):
    from django.core.exceptions import ValidationError

    models_scan()
    model = LanguageModel.objects.get(name="smollm2-135m-instruct")
    setattr(model, field, value)
    with pytest.raises(ValidationError, match=message):
        model.clean()


def test_the_cli_reports_registry_errors_without_a_traceback(models_dir, tmp_path):
    from django.core.management.base import CommandError

    write_gguf(tmp_path / "outside.gguf")
    with pytest.raises(CommandError, match="not under a model root"):
        call_command("models", "add", str(tmp_path / "outside.gguf"), "--name", "x")
    with pytest.raises(CommandError, match="no model is called"):
        call_command("models", "remove", "ghost")
    (models_dir / "bad.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(CommandError, match="bad magic"):
        call_command("models", "inspect", str(models_dir / "bad.gguf"))


def write_hostile_gguf(path, **values) -> None:
    """A tiny GGUF whose header carries `values` (key -> (value, GGUFValueType)) as the fuzzer found them."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, (value, value_type) in values.items():
        writer.add_key_value(key, value, value_type)
    writer.add_tensor("t", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("length", [-5, 2**40, 2**64 - 1], ids=["negative", "2**40", "u64 max"])
def test_a_gguf_claiming_an_absurd_context_length_registers_without_one(models_dir, length):
    value_type = gguf.GGUFValueType.INT64 if length < 0 else gguf.GGUFValueType.UINT64
    write_hostile_gguf(models_dir / "odd.gguf", **{"llama.context_length": (length, value_type)})
    model = model_register(name="odd", path=models_dir / "odd.gguf")  # the row's column is a PositiveIntegerField
    model.refresh_from_db()
    assert model.context_length is None and model.metadata["context_length"] is None


def test_a_safetensors_config_claiming_a_negative_context_length_registers_without_one(models_dir):
    write_safetensors(models_dir / "model.safetensors", {"a": ("F32", [2])})
    (models_dir / "config.json").write_text(json.dumps({"max_position_embeddings": -1}))
    model = model_register(name="odd", path=models_dir / "model.safetensors")
    assert model.context_length is None


def test_nul_in_header_strings_is_dropped_from_the_stored_summary(models_dir):
    text = gguf.GGUFValueType.STRING
    write_hostile_gguf(models_dir / "nul.gguf", **{"general.name": ("ti\x00ny", text)})
    model = model_register(name="nul", path=models_dir / "nul.gguf")  # PostgreSQL's jsonb refuses U+0000
    model.refresh_from_db()
    assert model.metadata["name"] == "tiny"


@pytest.mark.parametrize("embedded", [True, False])
def test_a_registry_write_without_redis_stands_and_warns_only_when_redis_is_not_the_embedded_one(
    models_dir, settings, caplog, tmp_path, embedded
):
    """serve scans models before it starts its embedded Redis (which starts empty): nothing to warn about then."""
    settings.REDIS_URL, settings.EMBEDDED_REDIS = f"unix://{tmp_path}/none.sock", embedded
    write_gguf(models_dir / "tiny.gguf")
    with caplog.at_level("DEBUG", logger="models_app.services"):
        model_register(name="tiny", path=models_dir / "tiny.gguf")
    assert LanguageModel.objects.filter(name="tiny").exists()
    told = [r for r in caplog.records if "registry changed" in r.getMessage()]
    assert told and {r.levelname for r in told} == ({"DEBUG"} if embedded else {"WARNING"})
