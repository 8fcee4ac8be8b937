"""Registering models: discovery under the model roots, header metadata, aliases, enable/disable, removal."""

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .bundled import DEFAULT_MODEL_PACKAGE, EMBEDDING_MODEL, default_model_path, embedding_model_path
from .metadata import SPLIT_RE, MetadataError, read_metadata
from .models import LanguageModel, ModelAlias

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$")


class RegistryError(Exception):
    """A model cannot be registered (path outside the model roots, bad name, unreadable file)."""


@dataclass
class ScanResult:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # path -> why it was skipped


def model_roots() -> list[Path]:
    """Folders models may be registered from: MINERVA_MODELS_DIR, MINERVA_MODEL_ROOTS, the bundled model's."""
    roots = [Path(settings.MODELS_DIR).resolve(), *settings.MODEL_ROOTS]
    bundled = default_model_path()
    if bundled is not None:
        roots.append(bundled.parent)
    roots.append(bundled_dir().resolve())
    return roots


def bundled_dir() -> Path:
    """Where the bundled embedding model's GGUF is written (it ships as a checkpoint, not as a GGUF)."""
    return Path(settings.DATA_DIR) / "bundled"


def model_register(*, name: str, path: str | Path, aliases: list[str] | None = None) -> LanguageModel:
    """Create or update the registry row for a model file or folder, reading its header."""
    if not NAME_RE.match(name):
        raise RegistryError(f"invalid model name {name!r} (letters, digits and ._:/@+- only)")
    real = _checked_path(Path(path))
    try:
        metadata = read_metadata(real)  # raises before anything is written
    except MetadataError as exc:
        raise RegistryError(f"{real}: {exc}") from None
    file_size, file_mtime = _signature(real)
    with transaction.atomic():
        model, created = LanguageModel.objects.update_or_create(
            name=name,
            defaults={
                "path": str(real),
                "format": metadata.format,
                "quantization": metadata.quantization or "",
                "metadata": metadata.summary(),
                "context_length": metadata.context_length,
                "file_size": file_size,
                "file_mtime": file_mtime,
                "available": True,
            },
        )
        for alias in aliases or []:
            if not NAME_RE.match(alias):
                raise RegistryError(f"invalid alias {alias!r}")
            if LanguageModel.objects.filter(name=alias).exclude(pk=model.pk).exists():
                raise RegistryError(f"alias {alias!r} is already a model's name")
            ModelAlias.objects.update_or_create(name=alias, defaults={"model": model})
    logger.info("%s model %s (%s)", "registered" if created else "refreshed", name, real)
    return model


def model_refresh_metadata(*, model: LanguageModel) -> LanguageModel:
    """Read the model's header again (after the file changed); mark it unavailable if it is gone."""
    if not Path(model.path).exists():
        model.available = False
        model.save(update_fields=["available", "updated"])
        return model
    return model_register(name=model.name, path=model.path)


def model_remove(*, name: str) -> None:
    """Delete a model's registry row (its files stay; request logs keep its name)."""
    deleted, _ = LanguageModel.objects.filter(name=name).delete()
    if not deleted:
        raise RegistryError(f"no model is called {name!r}")


def pulled_root() -> Path:
    """Where `models pull` puts files (MINERVA_MODELS_DIR/hf.co): the only files Minerva ever deletes."""
    return (Path(settings.MODELS_DIR) / "hf.co").resolve()


def model_is_pulled(model: LanguageModel) -> bool:
    """Whether the model's files came from `models pull` (so deleting the model may delete them)."""
    return Path(model.path).resolve().is_relative_to(pulled_root())


def model_files_delete(*, model: LanguageModel) -> list[Path]:
    """Delete a pulled model: its files (every part of a split GGUF, and partial downloads) and its registry row
    with its aliases; RegistryError for a model that was not pulled (its files are the administrator's)."""
    if not model_is_pulled(model):
        raise RegistryError(f"{model.name} was not pulled (its file is {model.path}); only pulled models' files "
                            "are deleted: remove the file yourself, or disable the model")  # fmt: skip
    path = Path(model.path)
    split = SPLIT_RE.match(path.name)
    files = sorted(path.parent.glob(f"{split['stem']}-*-of-{split['count']}.gguf")) if split else [path]
    files += [f.with_name(f.name + ".partial") for f in files]
    removed = [f for f in files if f.exists()]
    model.delete()
    for file in removed:
        file.unlink(missing_ok=True)
    folder = path.parent
    while folder != pulled_root() and folder.is_relative_to(pulled_root()):  # empty repo and owner folders
        leftovers = [p for p in folder.iterdir() if p.name != ".pull.lock"]
        if leftovers:
            break
        shutil.rmtree(folder, ignore_errors=True)
        folder = folder.parent
    logger.info("deleted model %s and its files %s", model.name, [str(f) for f in removed])
    return removed


def models_set_enabled(*, names: list[str], enabled: bool) -> int:
    """Enable or disable models; returns how many changed."""
    changed = LanguageModel.objects.filter(name__in=names).update(enabled=enabled, updated=timezone.now())
    model_registry_changed()
    return changed


def model_alias_create(*, model: LanguageModel, name: str) -> ModelAlias:
    """Give `model` another name (an existing alias of that name moves to it); RegistryError if `name` is not a
    valid model name or is a model's own name."""
    if not NAME_RE.match(name):
        raise RegistryError(f"{name!r} is not a valid model name (letters, digits and ._:/@+-, at most 255)")
    if LanguageModel.objects.filter(name=name).exists():
        raise RegistryError(f"a model is already called {name!r}")
    alias, _ = ModelAlias.objects.update_or_create(name=name, defaults={"model": model})
    LanguageModel.objects.filter(pk=model.pk).update(updated=timezone.now())  # listings are cached per version
    return alias  # (the alias's save told model_get)


def model_alias_delete(*, name: str) -> bool:
    """Remove the alias called `name`; False if there is none."""
    alias = ModelAlias.objects.filter(name=name).select_related("model").first()
    if alias is None:
        return False
    alias.delete()
    LanguageModel.objects.filter(pk=alias.model.pk).update(updated=timezone.now())
    return True


def model_registry_changed(**_signal) -> None:
    """Make every process look its models up again (selectors.model_get keeps the rows it found per registry
    version): at once, and again once the transaction commits (a lookup in between reads the rows before it).
    Every save and delete of a model or alias sends it (apps.py); a queryset's update() must call it."""
    from redis.exceptions import ConnectionError, RedisError

    from core.redis import get_redis

    from .selectors import REGISTRY_VERSION_KEY

    def change() -> None:
        try:
            get_redis().set(REGISTRY_VERSION_KEY, uuid.uuid4().hex)
        except RedisError as exc:  # the write stands; processes may serve the rows before it until the next write
            # An embedded Redis that is not running (serve scans models before it starts it) starts empty: no one to
            # tell. Any other failure is worth a warning.
            quiet = settings.EMBEDDED_REDIS and isinstance(exc, ConnectionError)
            logger.log(logging.DEBUG if quiet else logging.WARNING,
                       "could not tell other processes that the model registry changed: %s", exc)  # fmt: skip

    change()
    transaction.on_commit(change)


def models_scan(*, progress: Callable[[int, int, str], None] | None = None) -> ScanResult:
    """Register the bundled models (SmolLM2, and all-MiniLM-L6-v2 for embeddings, written to GGUF on the first
    scan) and every model under MINERVA_MODELS_DIR: new files are added, changed ones (size or mtime) re-read,
    vanished ones marked unavailable. Rows are never deleted here."""
    result = ScanResult()
    found: dict[str, Path] = {}
    bundled = default_model_path()
    if bundled is not None:
        found[settings.DEFAULT_MODEL] = bundled
    else:
        logger.warning("the default model package %s is not installed", DEFAULT_MODEL_PACKAGE)
    try:
        embedding = embedding_model_path(bundled_dir())
    except (OSError, ValueError) as exc:  # an unwritable data dir, a checkpoint we cannot read: serve the rest
        result.errors[str(bundled_dir())] = str(exc)
        embedding = None
    if embedding is not None:
        found[EMBEDDING_MODEL] = embedding
    for name, path in discover(settings.MODELS_DIR, result.errors):
        found.setdefault(name, path)
    known = {m.name: m for m in LanguageModel.objects.all()}
    registered_paths = {m.path for m in known.values()}
    for i, (name, path) in enumerate(sorted(found.items())):
        if progress:
            progress(i + 1, len(found), name)
        model = known.get(name)
        if model is None and str(path.resolve()) in registered_paths:
            continue  # registered under another name (a pulled model is `hf.co/owner/repo:QUANT`)
        try:
            if model and model.available and model.path == str(path.resolve()) and _unchanged(model, path):
                result.unchanged.append(name)
                continue
            model_register(name=name, path=path)
            (result.changed if model else result.added).append(name)
        except RegistryError as exc:
            result.errors[str(path)] = str(exc)
            logger.warning("skipping %s: %s", path, exc)
    hosted_elsewhere = _hosted_by_workers()
    for name, model in known.items():
        if name not in found and model.available and not Path(model.path).exists() and name not in hosted_elsewhere:
            model.available = False
            model.save(update_fields=["available", "updated"])
            result.unavailable.append(name)
    return result


def _hosted_by_workers() -> set[str]:
    """Models that a live worker (on any host) has a file for: a scan here must not mark them unavailable."""
    from redis.exceptions import RedisError

    from core.workers import workers_list

    try:
        return {name for worker in workers_list() for name in worker.get("models", {})}
    except RedisError:  # `models scan` without Redis (before the first `serve`): only this host's files count
        return set()


def discover(root: Path, errors: dict[str, str]) -> list[tuple[str, Path]]:
    """(name, path) of every model under `root`: GGUF files (a split model once, by its first shard),
    .safetensors files, and folders holding a SafeTensors model (named after the folder)."""
    models: list[tuple[str, Path]] = []
    if not root.is_dir():
        return models
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs.sort()
        if "model.safetensors.index.json" in files or ("config.json" in files and any(
                f.endswith(".safetensors") for f in files)):  # fmt: skip
            models.append((here.name, here))
            continue
        for file in sorted(files):
            path = here / file
            if file.endswith(".gguf"):
                split = SPLIT_RE.match(file)
                if split and split["no"] != "00001":
                    continue
                models.append((split["stem"] if split else path.stem, path))
            elif file.endswith(".safetensors"):
                models.append((path.stem, path))
    return models


def _checked_path(path: Path) -> Path:
    """The real path, if it is a regular file or folder under a model root."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise RegistryError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not any(real.is_relative_to(root) for root in model_roots()):
        raise RegistryError(
            f"{path} is not under a model root ({', '.join(str(r) for r in model_roots())}); "
            "put it in MINERVA_MODELS_DIR or add its folder to MINERVA_MODEL_ROOTS"
        )
    if not (real.is_file() or real.is_dir()):
        raise RegistryError(f"{path} is not a regular file or folder")
    return real


def _signature(path: Path) -> tuple[int, float]:
    """(total size, latest mtime) of the files that make up a model: a rescan re-reads it when this changes."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()]
    else:
        split = SPLIT_RE.match(path.name)
        files = sorted(path.parent.glob(f"{split['stem']}-*-of-{split['count']}.gguf")) if split else [path]
    stats = [f.stat() for f in files]
    return sum(st.st_size for st in stats), max((st.st_mtime for st in stats), default=0.0)


def _unchanged(model: LanguageModel, path: Path) -> bool:
    try:
        return _signature(path) == (model.file_size, model.file_mtime)
    except OSError:
        return False


def header_hash(summary: dict) -> str:
    """A short hash of a model's header summary (what read_metadata found, no path): two hosts whose files hash
    alike have the same model under that name."""
    return hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()[:16]


_hashes: dict[tuple[str, int, float], str] = {}  # (path, size, mtime) -> header hash: a file is read once


def models_hosted(*, names: set[str] | None = None) -> dict[str, dict]:
    """The models this host can serve, {name: {"path", "hash"}}: files found here (the bundled models and
    MINERVA_MODELS_DIR, as a scan finds them) and registered rows whose path exists here, enabled, limited to
    `names` if given. Each worker host calls this for itself: a file new to the cluster is registered, a row some
    other host's scan marked unavailable becomes available again, and nothing is ever marked unavailable here,
    since a model missing on this host may be on another."""
    found: dict[str, Path] = {}
    bundled = default_model_path()
    if bundled is not None:
        found[settings.DEFAULT_MODEL] = bundled
    embedding = bundled_dir() / f"{EMBEDDING_MODEL}.gguf"
    if embedding.exists():
        found[EMBEDDING_MODEL] = embedding
    for name, path in discover(settings.MODELS_DIR, {}):
        found.setdefault(name, path)
    rows = {m.name: m for m in LanguageModel.objects.all()}
    for name, path in found.items():
        row = rows.get(name)
        try:
            if row is None:
                rows[name] = model_register(name=name, path=path)
            elif not row.available:
                LanguageModel.objects.filter(pk=row.pk).update(available=True, updated=timezone.now())
                model_registry_changed()
                row.available = True
        except RegistryError as exc:
            logger.warning("skipping %s: %s", path, exc)
    hosted: dict[str, dict] = {}
    roots = model_roots()
    for name, row in rows.items():
        path = found.get(name) or Path(row.path)
        if not row.enabled or not row.available or (names is not None and name not in names):
            continue
        try:
            real = path.resolve(strict=True)
            signature = _signature(real)
        except (OSError, RuntimeError):
            continue  # not on this host
        if name not in found and not any(real.is_relative_to(root) for root in roots):
            continue  # registered from a folder that is not one of this host's model roots
        key = (str(path), *signature)
        if key not in _hashes:
            same_file = str(path.resolve()) == row.path and signature == (row.file_size, row.file_mtime)
            try:
                _hashes[key] = header_hash(row.metadata if same_file else read_metadata(path).summary())
            except MetadataError as exc:
                logger.warning("skipping %s: %s", path, exc)
                continue
        hosted[name] = {"path": str(path.resolve()), "hash": _hashes[key]}
    return hosted


def models_sync() -> list[LanguageModel]:
    """Scan, then return every available model (what `make run` and the tests use)."""
    models_scan()
    return list(LanguageModel.objects.filter(available=True))
