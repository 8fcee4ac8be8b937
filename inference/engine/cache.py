"""The models a worker keeps loaded: lazy loads (one at a time), a memory budget with LRU eviction of idle
models, and keep-alive expiry (like Ollama: 5 minutes by default, per request `keep_alive`)."""

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .embed import EmbeddingModel
from .llama import LoadedModel, StepIO

logger = logging.getLogger(__name__)


HEARTBEAT_SECONDS = 5.0


class ModelUnavailable(Exception):
    """The model cannot be loaded: it does not fit in the memory budget, or llama.cpp refused the file."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how; `estimated_bytes` (weights + KV cache) is checked against the budget.

    `embedding=True` loads an EmbeddingModel (a pooling context) instead of a generating one; it is cached
    apart from the same model's generating context, and `n_ctx` is then the tokens of one batch (and the most
    one input may have), `n_parallel` the most inputs in one batch, and `estimated_bytes` weights plus
    `embedding_context_bytes()`."""

    name: str
    path: str
    n_ctx: int
    n_parallel: int = 1
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_batch: int = 512
    chat_template: str | None = None  # replaces the file's own
    shared_cells: bool = True  # the slots share one KV cache of n_ctx cells (LoadedModel)
    cache_type: str = "f16"  # the KV cache's type: f16, q8_0 or q4_0
    draft_max: int = 0  # speculative decoding: drafted tokens per step (0: off)
    draft_path: str | None = None  # the draft model's file; None: drafts come from prompt lookup
    cache_ram_bytes: int = 0  # host memory for prompts that left the slots (0: off)
    backend_sampling: bool = False  # sampler chains run in the decode's graph (LoadedModel)
    estimated_bytes: int = 0
    device_bytes: int = 0  # the part of estimated_bytes on GPUs (offloaded layers and their KV cache)
    embedding: bool = False

    @property
    def key(self) -> str:
        """The cache's key: a model's generating and embedding contexts are two entries."""
        return f"{self.name} (embeddings)" if self.embedding else self.name


@dataclass
class _Entry:
    spec: ModelSpec
    model: LoadedModel | EmbeddingModel
    keep_alive: float  # seconds after the last use; math.inf = forever
    pins: int = 0  # requests using the model right now: a pinned model is never unloaded

    def expired(self, now: float) -> bool:
        return self.pins == 0 and now - self.model.last_used > self.keep_alive


class ModelCache:
    def __init__(self, *, budget_bytes: int, device_budget_bytes: int = 0, default_keep_alive: float = 300.0,
                 io_factory: Callable[[], StepIO] | None = None, reap_interval: float = 1.0,
                 on_change: Callable[[list[dict]], None] | None = None):  # fmt: skip
        """`budget_bytes`: system memory for models; `device_budget_bytes`: GPU memory for their offloaded part."""
        self.budget_bytes = budget_bytes
        self.device_budget_bytes = device_budget_bytes
        self.default_keep_alive = default_keep_alive
        self.io_factory = io_factory
        self.on_change = on_change  # called with loaded() after each load and unload, and as a heartbeat
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()  # held while loading, so loads are serialized
        # Models whose weights are loading now, and how far (0 to 1): read without the lock, which the load holds.
        self.loading: dict[str, float] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(reap_interval,), name="model-reaper", daemon=True)
        self._reaper.start()

    @contextlib.contextmanager
    def use(self, spec: ModelSpec, *, keep_alive: float | None = None) -> Iterator[LoadedModel | EmbeddingModel]:
        """The loaded model for `spec`, loading it (evicting idle models to make room) if needed, and kept
        loaded until the block ends; its keep-alive countdown starts then."""
        with self._lock:
            entry = self._get(spec, keep_alive)
            entry.pins += 1
        try:
            yield entry.model
        finally:
            with self._lock:
                entry.pins -= 1
                entry.model.last_used = time.monotonic()

    def _get(self, spec: ModelSpec, keep_alive: float | None) -> _Entry:
        # Called with the lock held.
        entry = self._entries.get(spec.key)
        if entry is not None and entry.spec != spec and entry.pins == 0:  # load options changed in the registry
            self._unload(spec.key, "its load options changed")
            entry = None
        if entry is None:
            self._make_room(spec)
            logger.info("loading %s from %s (%s slots x %s tokens)", spec.name, spec.path, spec.n_parallel,
                        spec.n_ctx)  # fmt: skip
            try:
                model = self._load(spec)
            except (ValueError, OSError) as exc:
                raise ModelUnavailable(f"The model {spec.name} could not be loaded: {exc}") from None
            entry = self._entries[spec.key] = _Entry(
                spec, model, self.default_keep_alive if keep_alive is None else keep_alive
            )
            entry.model.last_used = time.monotonic()
            self._changed()
        elif keep_alive is not None and keep_alive != entry.keep_alive:
            entry.keep_alive = keep_alive
            self._changed()  # readers of on_change (Ollama's /api/ps) show the new expiry now, not at the next beat
        entry.model.last_used = time.monotonic()
        return entry

    def _load(self, spec: ModelSpec) -> LoadedModel | EmbeddingModel:
        if spec.embedding:
            return EmbeddingModel(spec.path, n_ctx=spec.n_ctx, n_seq_max=spec.n_parallel,
                                  n_gpu_layers=spec.n_gpu_layers, n_threads=spec.n_threads)  # fmt: skip
        self.loading[spec.name] = 0.0
        try:
            return LoadedModel(
                spec.path, n_ctx=spec.n_ctx, n_parallel=spec.n_parallel, n_gpu_layers=spec.n_gpu_layers,
                n_threads=spec.n_threads, n_batch=spec.n_batch, chat_template=spec.chat_template,
                shared_cells=spec.shared_cells, cache_type=spec.cache_type, draft_max=spec.draft_max,
                draft_path=spec.draft_path, cache_ram_bytes=spec.cache_ram_bytes,
                backend_sampling=spec.backend_sampling,
                io=self.io_factory() if self.io_factory else None,
                on_progress=lambda value: self.loading.__setitem__(spec.name, value),
            )  # fmt: skip
        finally:
            self.loading.pop(spec.name, None)

    def loaded(self) -> list[dict]:
        """What is loaded now: name, estimated size, busy and total slots, seconds until unload when idle."""
        with self._lock:
            return [
                {
                    "name": e.spec.name,
                    "embedding": e.spec.embedding,
                    "path": e.spec.path,
                    "estimated_bytes": e.spec.estimated_bytes,
                    "device_bytes": e.spec.device_bytes,
                    "busy_slots": e.model.busy_slots(),
                    "requests": e.pins,
                    "slots": e.spec.n_parallel,
                    "keep_alive": e.keep_alive,
                    "idle_seconds": round(time.monotonic() - e.model.last_used, 1),
                }
                for e in self._entries.values()
            ]

    def unload(self, name: str) -> bool:
        """Unload a model now, its generating and embedding contexts both (their running requests fail); False
        if it was not loaded."""
        with self._lock:
            keys = [key for key, e in self._entries.items() if e.spec.name == name]
            return any([self._unload(key, "asked to") for key in keys])

    def release(self, name: str) -> bool:
        """Unload a model (its generating and embedding contexts) as soon as no request uses it (now, if none
        does); False if it was not loaded."""
        with self._lock:
            entries = [(key, e) for key, e in self._entries.items() if e.spec.name == name]
            for key, entry in entries:
                if entry.pins:
                    entry.keep_alive = 0.0  # the reaper unloads it once its last request ends
                else:
                    self._unload(key, "asked to (keep_alive 0)")
            return bool(entries)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for name in list(self._entries):
                self._unload(name, "the worker is stopping")

    def memory(self) -> dict:
        """The budgets and what the loaded models take of them (estimates), in bytes."""
        with self._lock:
            used, device = self._used()
            return {"budget_bytes": self.budget_bytes, "used_bytes": used,
                    "device_budget_bytes": self.device_budget_bytes, "device_used_bytes": device}  # fmt: skip

    def _make_room(self, spec: ModelSpec) -> None:
        # Two pools: GPU memory for the offloaded part, system memory for the rest. A model that fits neither
        # empty pool is refused before llama.cpp tries (and fails, or swaps) with what it needs and what there is.
        host, device = spec.estimated_bytes - spec.device_bytes, spec.device_bytes
        if host > self.budget_bytes or device > self.device_budget_bytes:
            raise ModelUnavailable(f"The model {spec.name} needs about {_need(host, device)} (weights and KV "
                                   f"cache), more than the memory budget of "
                                   f"{_need(self.budget_bytes, self.device_budget_bytes)} (MINERVA_MEMORY_BUDGET, "
                                   "MINERVA_GPU_MEMORY_BUDGET).")  # fmt: skip
        while True:
            used_host, used_device = self._used()
            if used_host + host <= self.budget_bytes and used_device + device <= self.device_budget_bytes:
                return
            idle = [(e.model.last_used, n) for n, e in self._entries.items() if e.pins == 0]
            if not idle:
                free = _need(self.budget_bytes - used_host, self.device_budget_bytes - used_device)
                raise ModelUnavailable(
                    f"The model {spec.name} needs about {_need(host, device)} but only {free} of the memory budget "
                    "is free and every loaded model is busy. Try again shortly."
                )
            self._unload(min(idle)[1], "least recently used, to make room")

    def _used(self) -> tuple[int, int]:
        """(system, GPU) bytes the loaded models take."""
        device = sum(e.spec.device_bytes for e in self._entries.values())
        return sum(e.spec.estimated_bytes for e in self._entries.values()) - device, device

    def _unload(self, key: str, why: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        logger.info("unloading %s: %s", key, why)
        entry.model.close()
        self._changed()
        return True

    def _reap(self, interval: float) -> None:
        beat = 0.0
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                for name, entry in list(self._entries.items()):
                    if entry.expired(now):
                        self._unload(name, f"idle for more than {entry.keep_alive:g} s")
            if now - beat >= HEARTBEAT_SECONDS:  # tell readers of `on_change` we are still alive
                beat = now
                self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self.loaded())
            except Exception:  # reporting must never take the cache down (e.g. Redis restarting)
                logger.exception("reporting loaded models failed")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _need(host: int, device: int) -> str:
    return f"{_gib(device)} of GPU memory and {_gib(host)} of system memory" if device else f"{_gib(host)}"
