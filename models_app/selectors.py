"""Looking models up."""

import copy
import logging
import uuid

import psutil
from django.conf import settings
from redis.exceptions import RedisError

from core.errors import ModelNotFound
from core.redis import get_redis

from .metadata import ENCODER_ARCHITECTURES, context_that_fits
from .models import LanguageModel, ModelAlias

logger = logging.getLogger(__name__)


def model_list() -> list[LanguageModel]:
    """Every model the API serves (enabled, file present)."""
    # Only the columns /v1/models shows (n_parallel: the served context is sized per slot): templates are not needed.
    return list(
        LanguageModel.objects.filter(enabled=True, available=True).only(
            "name",
            "format",
            "quantization",
            "metadata",
            "context_length",
            "file_size",
            "n_ctx",
            "n_parallel",
            "created",
        )
    )


def model_alias_list() -> list[tuple[str, str]]:
    """(alias, model name) for every alias of a served model."""
    return list(
        ModelAlias.objects.filter(model__enabled=True, model__available=True).values_list("name", "model__name")
    )


# Each process keeps what it built from the registry (model_get's rows, /v1/models' entries) while the registry's
# version stands: a random token in Redis that services.model_registry_changed replaces on every write.
REGISTRY_VERSION_KEY = "minerva:registry:version"
_found: dict[str, tuple[str, LanguageModel]] = {}  # requested name -> (version, row); only names that were found


def model_registry_version() -> str | None:
    """The registry's version now, read before what is built from it; None when Redis cannot be read (then nothing
    may be reused). A new or flushed Redis gets a token never used before."""
    try:
        version = get_redis().get(REGISTRY_VERSION_KEY)
        if version is None:
            get_redis().set(REGISTRY_VERSION_KEY, uuid.uuid4().hex, nx=True)
        return version
    except RedisError:
        return None


def model_get(name: str) -> LanguageModel:
    """The served model called `name`, or ModelNotFound."""
    if "\x00" in name:  # PostgreSQL refuses NUL in text; no model is called that anyway
        raise ModelNotFound(name.replace("\x00", ""))
    version = model_registry_version()  # every request looks its model up: its row is reused while this stands
    found = _found.get(name)
    if found is not None and version is not None and found[0] == version:
        return copy.copy(found[1])  # a copy: callers may set attributes on theirs
    model = _model_lookup(name)
    if version is not None:
        _found[name] = (version, model)
    return copy.copy(model)


def _model_lookup(name: str) -> LanguageModel:
    # Its own name first (an alias of another model's name does not take it), in a query without the aliases' join.
    model = LanguageModel.objects.filter(name=name, enabled=True, available=True).first()
    if model is None:
        model = LanguageModel.objects.filter(aliases__name=name, enabled=True, available=True).first()
    if model is None:
        raise ModelNotFound(name)
    return model


def model_n_ctx(model: LanguageModel) -> int:
    """The context the model is served with (the most tokens one request may have; its slots share them): its
    own setting, else MINERVA_N_CTX, else its trained context lowered only as far as the memory budget requires
    (metadata.context_that_fits); never more than it was trained for."""
    trained = model.context_length or 0
    n_ctx = model.n_ctx or settings.N_CTX
    if not n_ctx:
        slots = 1 if model_shared_cells(model) else model_parallel(model)  # caches of n_ctx cells
        n_ctx = context_that_fits(model.metadata or {}, trained or 4096, memory_budget(), settings.KV_CACHE_TYPE, slots)
    return min(n_ctx, trained) if trained else n_ctx


def model_shared_cells(model: LanguageModel) -> bool:
    """Whether the model's slots share one KV cache (llama.cpp's unified cache): MINERVA_SHARED_CONTEXT on or off,
    else (auto) only when a cache of the context for every slot would not fit half the memory budget, so that the
    slots share the full context instead of each getting a lowered one."""
    if settings.SHARED_CONTEXT != "auto":
        return settings.SHARED_CONTEXT == "on"
    parallel = model_parallel(model)
    wanted = model.n_ctx or settings.N_CTX or model.context_length or 4096
    if parallel == 1:
        return False
    fits = context_that_fits(model.metadata or {}, wanted, memory_budget(), settings.KV_CACHE_TYPE, parallel)
    return fits < wanted


def memory_budget() -> int:
    """Bytes of system memory a worker may fill with loaded models: MINERVA_MEMORY_BUDGET, else 75% of physical
    memory (psutil: the same on Linux, macOS and Windows)."""
    return settings.MEMORY_BUDGET or int(psutil.virtual_memory().total * 0.75)


def model_generates(model: LanguageModel) -> bool:
    """Whether the model can generate text; an encoder (a BERT embedding model) can only embed."""
    return (model.metadata or {}).get("architecture") not in ENCODER_ARCHITECTURES


def model_parallel(model: LanguageModel) -> int:
    """How many sequences the model decodes together: its own setting, else MINERVA_PARALLEL."""
    return model.n_parallel or settings.PARALLEL


def model_loaded_names() -> set[str]:
    """Names of the models some live worker holds loaded right now."""
    return {m["name"] for m in model_loaded_list()}


def model_loaded_list() -> list[dict]:
    """What live workers hold loaded, as they report it in their heartbeat (ModelCache.loaded()), each entry with
    `worker` and `expires_at`: the unix time it unloads if no request comes (inf: never; a model in use counts its
    keep-alive from now)."""
    import time

    from redis.exceptions import RedisError

    from core.workers import workers_list

    loaded: list[dict] = []
    try:
        workers = workers_list()
    except RedisError:  # listing models must not fail because Redis is restarting; `loaded` is a hint
        logger.warning("cannot read loaded models from Redis", exc_info=True)
        return loaded
    now = time.time()
    for worker in workers:
        for model in worker.get("loaded", []):
            idle = 0 if model.get("requests") else model.get("idle_seconds", 0)
            start = now if model.get("requests") else worker["loaded_at"]
            loaded.append({**model, "worker": worker["id"], "expires_at": start + model["keep_alive"] - idle})
    return loaded


def memory_status() -> list[dict]:
    """Per live worker: its system and GPU memory budgets, what its loaded models take of them (estimates), the
    GPUs it offloads to (free memory as llama.cpp reported it at the worker's start) and each loaded model's
    `size` and `size_vram` in bytes (as Ollama's /api/ps shows them). For the status page."""
    from redis.exceptions import RedisError

    from core.workers import workers_list

    try:
        records = workers_list()
    except RedisError:
        logger.warning("cannot read the workers' memory from Redis", exc_info=True)
        return []
    workers = []
    for record in sorted(records, key=lambda r: r["id"]):
        models = [{"name": m["name"], "embedding": m.get("embedding", False), "size": m.get("estimated_bytes", 0),
                   "size_vram": m.get("device_bytes", 0)} for m in record.get("loaded", [])]  # fmt: skip
        workers.append({"worker": record["id"], **record.get("memory", {}), "models": models})
    return workers
