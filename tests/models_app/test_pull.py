"""Pulling from the Hugging Face Hub (a local stand-in at HF_ENDPOINT, serving SmolLM2's GGUF): progress, resuming,
digests, quants, disk space, and a pull's progress through Redis."""

import asyncio
import hashlib
import json

import pytest

from models_app import hub as hub_module
from models_app.bundled import default_model_path
from models_app.hub import DigestMismatch, NoDiskSpace, NotOnHub, Ref, quant_of, resolve
from models_app.models import LanguageModel
from models_app.pulls import LOCK_KEY, STREAM_KEY, model_pull, pull_key, pull_lines, pull_start, pulled_dir
from models_app.selectors import model_get
from models_app.services import models_scan
from tests.conftest import SMOL_FILE, SMOL_REPO

pytestmark = pytest.mark.django_db


def pulled(settings):
    return pulled_dir(SMOL_REPO) / SMOL_FILE


def smol_sha256() -> str:
    return hashlib.sha256(default_model_path().read_bytes()).hexdigest()


def test_a_pulled_model_is_registered_with_its_aliases_after_progress_in_ollamas_order(hub, settings):
    lines = []
    model = model_pull(ref=f"{SMOL_REPO.lower()}:q4_1", progress=lines.append)  # named as the Hub spells it

    assert model.name == f"hf.co/{SMOL_REPO}:Q4_1" and model.quantization == "Q4_1"
    assert model.path == str(pulled(settings).resolve()) and model.context_length == 8192
    assert model_get(f"{SMOL_REPO}:Q4_1") == model
    assert not [name for name in models_scan().added if "SmolLM2" in name]  # already registered, as pulled
    assert not list(pulled_dir(SMOL_REPO).glob("*.partial"))
    size, digest = default_model_path().stat().st_size, smol_sha256()
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = lines[1:-3]
    assert {line["status"] for line in progress} == {f"pulling {digest[:12]}"}
    assert all(line["digest"] == f"sha256:{digest}" and line["total"] == size for line in progress)
    completed = [line["completed"] for line in progress]
    # from 0 to the whole file (how many lines between depends on the machine's speed: progress is throttled)
    assert completed == sorted(completed) and completed[0] == 0 and completed[-1] == size


def test_a_connection_cut_mid_file_resumes_where_it_stopped(hub, settings):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    hub.cut_after[SMOL_FILE] = 40_000_000
    model_pull(ref=f"{SMOL_REPO}:Q4_1")
    # huggingface_hub writes whole 10 MiB chunks: the one the cut interrupted is asked for again, none before it
    kept = 40_000_000 // DOWNLOAD_CHUNK_SIZE * DOWNLOAD_CHUNK_SIZE
    assert hub.ranges(SMOL_FILE) == [None, f"bytes={kept}-"] and kept > 0
    assert hub_module.sha256_of(pulled(settings)) == smol_sha256()


def test_a_pull_stopped_earlier_resumes_from_its_partial_file(hub, settings):
    partial = hub_module.partial_path(pulled(settings))
    partial.parent.mkdir(parents=True)
    with default_model_path().open("rb") as f:
        partial.write_bytes(f.read(30_000_000))
    model_pull(ref=f"{SMOL_REPO}:Q4_1")
    assert hub.ranges(SMOL_FILE) == ["bytes=30000000-"]
    assert hub_module.sha256_of(pulled(settings)) == smol_sha256() and not partial.exists()


def test_a_corrupted_download_is_refused_by_its_digest_and_removed(hub, settings):
    hub.corrupt.add(SMOL_FILE)
    with pytest.raises(DigestMismatch, match=f"the Hub says {smol_sha256()}"):
        model_pull(ref=f"{SMOL_REPO}:Q4_1")
    assert not list(pulled_dir(SMOL_REPO).iterdir()) or list(pulled_dir(SMOL_REPO).iterdir()) == [
        pulled_dir(SMOL_REPO) / ".pull.lock"
    ]
    assert not LanguageModel.objects.filter(name=f"hf.co/{SMOL_REPO}:Q4_1").exists()


def test_a_quant_that_does_not_exist_is_refused_listing_those_that_do(hub):
    with pytest.raises(NotOnHub, match="has no quant Q2_K; it has: Q4_1, Q8_0") as refused:
        model_pull(ref=f"{SMOL_REPO}:Q2_K")
    assert refused.value.status == 404
    assert not [r for r in hub.requests if "/resolve/" in r[1]]  # nothing was downloaded


def test_an_unknown_repository_is_a_404_naming_it(hub):
    with pytest.raises(NotOnHub, match="no model someone/nothing-GGUF") as refused:
        model_pull(ref="someone/nothing-GGUF")
    assert refused.value.status == 404


def test_an_unreachable_hub_is_a_502_naming_it(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard: nothing listens
    with pytest.raises(hub_module.HubUnreachable, match=r"cannot reach http://127\.0\.0\.1:9") as refused:
        model_pull(ref=f"{SMOL_REPO}:Q4_1")
    assert refused.value.status == 502


def test_without_disk_space_a_pull_is_refused_and_its_partial_file_removed(hub, settings, monkeypatch):
    partial = hub_module.partial_path(pulled(settings))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(hub_module, "free_bytes", lambda folder: 10_000_000)
    with pytest.raises(NoDiskSpace, match=r"not enough disk space .*: 94 MiB to download, 10 MiB free") as refused:
        model_pull(ref=f"{SMOL_REPO}:Q4_1")
    assert refused.value.status == 507 and not partial.exists()
    assert hub.ranges(SMOL_FILE) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 40 MiB tmpfs (needs root, as CI runs): a disk that really fills up."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_disk_that_fills_up_mid_download_fails_the_pull_and_removes_the_partial_file(hub, settings, tiny_disk,
                                                                                      monkeypatch):  # fmt: skip
    settings.MODELS_DIR = tiny_disk
    monkeypatch.setattr(hub_module, "free_bytes", lambda folder: 10**12)  # as if the disk filled after the check
    with pytest.raises(NoDiskSpace, match="the disk filled up while downloading SmolLM2") as refused:
        model_pull(ref=f"{SMOL_REPO}:Q4_1")
    assert refused.value.status == 507
    assert not list(pulled_dir(SMOL_REPO).glob("*.partial")) and not pulled(settings).exists()


def test_a_split_gguf_resolves_to_every_part_and_a_bare_repo_to_q4_k_m(hub, tmp_path):
    part = tmp_path / "part"
    part.write_bytes(b"GGUF")
    for i in (1, 2, 3):
        hub.add("someone/Big-GGUF", f"Q4_K_M/Big-Q4_K_M-0000{i}-of-00003.gguf", part)
    hub.add("someone/Big-GGUF", "Big-Q2_K.gguf", part)
    hub.add("someone/Big-GGUF", "mmproj-Big-F16.gguf", part)
    names = [f.name for f in resolve(Ref.parse("hf.co/someone/Big-GGUF:q4_k_m")).files]
    assert names == [f"Q4_K_M/Big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert [f.name for f in resolve(Ref.parse("someone/Big-GGUF")).files] == names
    assert [f.name for f in resolve(Ref.parse("someone/Big-GGUF:Big-Q2_K.gguf")).files] == ["Big-Q2_K.gguf"]


def test_quant_labels_are_read_from_file_names():
    assert quant_of("Qwen2.5-Coder-7B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert quant_of("model-IQ2_XXS-00001-of-00002.gguf") == "IQ2_XXS"
    assert quant_of("nomic-embed-text-v1.5.f16.gguf") == "F16"
    assert quant_of("UD-Q4_K_XL/GLM-UD-Q4_K_XL-00001-of-00003.gguf") == "UD-Q4_K_XL"
    for bad in ("not a repo", "../models", "owner/..", "hf.co/./x"):
        with pytest.raises(hub_module.HubError, match="not a Hugging Face model"):
            Ref.parse(bad)


@pytest.mark.django_db(transaction=True)
def test_a_pull_publishes_its_lines_and_a_second_one_joins_it(hub, settings):
    from core.redis import get_redis

    ref = f"{SMOL_REPO}:Q4_1"
    key = pull_start(ref=ref)  # Celery is eager here: the task ran inside pull_start
    lines = asyncio.run(_collect(key))
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert not get_redis().exists(LOCK_KEY.format(key))

    get_redis().set(LOCK_KEY.format(key), "running")  # as if a worker were pulling it now
    get_redis().xadd(STREAM_KEY.format(key), {"line": '{"status": "pulling abc"}'})
    gets = len(hub.ranges(SMOL_FILE))
    assert pull_start(ref=f"hf.co/{SMOL_REPO}:q4_1") == key == pull_key(Ref.parse(ref))
    assert len(hub.ranges(SMOL_FILE)) == gets  # joined: nothing new was queued or downloaded
    assert get_redis().xlen(STREAM_KEY.format(key)) == len(lines) + 1


async def _collect(key: str) -> list[dict]:
    return [line async for line in pull_lines(key, first_timeout=5)]


def test_the_models_pull_command_shows_progress_and_says_what_it_pulled(hub, capsys):
    from django.core.management import CommandError, call_command

    call_command("models", "pull", f"{SMOL_REPO}:Q4_1")
    out, err = capsys.readouterr()
    assert f"pulled hf.co/{SMOL_REPO}:Q4_1 (Q4_1, 94 MiB)" in out and f"also called {SMOL_REPO}:Q4_1" in out
    assert "pulling manifest" in err and "93.8M/93.8M" in err and err.rstrip().endswith("success")
    call_command("models", "--json", "pull", f"{SMOL_REPO}:Q4_1")  # already here: verified only
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    with pytest.raises(CommandError, match="has no quant Q3_K_S; it has: Q4_1, Q8_0"):
        call_command("models", "pull", f"{SMOL_REPO}:Q3_K_S")
