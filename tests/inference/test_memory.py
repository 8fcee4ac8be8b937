"""The memory budget where layers are offloaded: a worker's GPU pool, each model's GPU share, and what /api/ps,
/minerva/api/memory and the status page's selector show of it."""

import sys
import time

import pytest

from access.services import key_create
from core.workers import WORKER_ID, worker_announce
from inference import run
from inference.engine.host import Device
from models_app.selectors import memory_status
from tests.conftest import MODEL

pytestmark = pytest.mark.django_db

H200 = Device("CUDA0", "NVIDIA H200", "gpu", 100 * 2**30, 141 * 2**30)


def test_with_a_gpu_a_model_counts_its_offloaded_share_against_the_gpu_budget(smollm2, monkeypatch, settings):
    monkeypatch.setattr(run, "_devices", [H200])
    settings.GPU_MEMORY_BUDGET = 0
    assert run.device_budget() == int(H200.free * 0.9)
    settings.GPU_MEMORY_BUDGET = 2**30
    assert run.device_budget() == 2**30
    every = run._spec(smollm2)
    assert every.device_bytes == every.estimated_bytes  # MINERVA_N_GPU_LAYERS=-1: every layer
    smollm2.n_gpu_layers = 10
    some = run._spec(smollm2)
    assert some.device_bytes == int(some.estimated_bytes * 10 / 31)  # 30 layers and the output layer
    assert run._spec(smollm2, embedding=True).device_bytes > 0


def test_on_apple_silicon_the_gpu_is_system_memory(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(run, "_devices", None)
    monkeypatch.setattr(run, "gpu_devices", lambda: [H200])  # Metal would report itself: not counted twice
    assert run.devices() == [] and run.device_budget() == 0


def test_ps_and_the_memory_selector_show_size_and_size_vram(smollm2, client):
    memory = {"budget_bytes": 8 * 2**30, "used_bytes": 10**8, "device_budget_bytes": 90 * 2**30,
              "device_used_bytes": 2 * 10**8, "devices": [H200.to_dict()]}  # fmt: skip
    loaded = {"name": MODEL, "embedding": False, "path": smollm2.path, "estimated_bytes": 3 * 10**8,
              "device_bytes": 2 * 10**8, "busy_slots": 0, "requests": 0, "slots": 1, "keep_alive": 300,
              "idle_seconds": 0}  # fmt: skip
    worker_announce({"models": {}, "loaded": [loaded], "loaded_at": time.time(), "memory": memory})
    [ps] = client.get("/api/ps").json()["models"]
    assert (ps["name"], ps["size"], ps["size_vram"]) == (MODEL, 3 * 10**8, 2 * 10**8)
    shown_model = {"name": MODEL, "embedding": False, "size": 3 * 10**8, "size_vram": 2 * 10**8}
    expected = [{"worker": WORKER_ID, **memory, "models": [shown_model]}]
    assert memory_status() == expected
    _, staff = key_create(name="ops", staff=True)
    shown = client.get("/minerva/api/memory", headers={"Authorization": f"Bearer {staff}"}).json()
    assert shown == {"workers": expected}
