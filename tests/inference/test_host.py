"""What the engine asks of the machine, on any OS: each Linux-only call has a fallback, run here by hiding the
Linux call (CI cannot run macOS or Windows)."""

import os
import subprocess
import sys

import pytest

from inference.engine import host
from inference.engine.llama import LoadedModel
from inference.management.commands import serve
from models_app.bundled import default_model_path
from models_app.metadata import read_metadata
from models_app.selectors import memory_budget


def test_without_sched_getaffinity_the_engine_uses_every_cpu_and_still_loads(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    assert host.usable_cpus() == os.cpu_count()
    model = LoadedModel(str(default_model_path()), n_ctx=256)
    try:
        assert model.n_ctx == 256
    finally:
        model.close()


def test_without_proc_cpuinfo_the_cpu_has_no_amx(monkeypatch):
    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(host, "open", no_proc, raising=False)
    assert host.cpu_has_amx() is False


def test_serves_children_get_prctl_only_on_linux(monkeypatch):
    assert "preexec_fn" in serve.child_options()
    monkeypatch.setattr(sys, "platform", "darwin")
    options = serve.child_options()
    assert options == {"start_new_session": True}
    assert subprocess.run([sys.executable, "-c", "pass"], **options).returncode == 0


def test_the_memory_budget_needs_no_sysconf(monkeypatch, settings):
    settings.MEMORY_BUDGET = 0
    monkeypatch.delattr(os, "sysconf")
    assert memory_budget() == int(host.system_memory()[0] * 0.75) > 0


def test_model_headers_are_read_without_o_nonblock(monkeypatch):
    monkeypatch.delattr(os, "O_NONBLOCK")
    assert read_metadata(default_model_path()).quantization == "Q4_1"


def test_without_llama_cpps_device_calls_there_are_no_gpus(monkeypatch):
    from llama_cpp import llama_cpp as bindings

    assert host.gpu_devices() == []  # this CPU-only build: its one device, the CPU, is not a GPU
    monkeypatch.setattr(bindings, "_lib", object())
    assert host.gpu_devices() == []


@pytest.mark.parametrize(("layers", "share"), [(0, 0.0), (-1, 1.0), (999, 1.0), (31, 1.0), (10, 10 / 31)])
def test_the_offloaded_share_counts_the_output_layer(layers, share):
    assert host.offloaded_fraction(layers, 30) == share
