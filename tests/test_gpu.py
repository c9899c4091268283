from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from gputwin.reading.gpu import CpuProbe, GpuSample, Nvml, Sampler


class FakeNvml:
    """Stands in for the pynvml module (no NVIDIA driver here): two GPUs, the second an older card
    that reports no power draw, no power limit and no per-process memory."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, init_fails: bool = False) -> None:
        self.init_fails = init_fails
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_fails:
            raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index >= 2:
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        return "NVIDIA GeForce RTX 3090" if handle == 0 else b"Tesla K80"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=97 if handle == 0 else 12, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=20 * 2**30, total=24 * 2**30, free=4 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise self.NVMLError_NotSupported("Not Supported")
        return 312_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        if handle == 1:
            raise self.NVMLError_NotSupported("Not Supported")
        return 350_000

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 71

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        if handle == 1:
            raise self.NVMLError_NotSupported("Not Supported")
        return [SimpleNamespace(pid=4242, usedGpuMemory=18 * 2**30), SimpleNamespace(pid=4343, usedGpuMemory=None)]


def test_unsupported_values_are_none_not_errors() -> None:
    nvml = Nvml(FakeNvml())
    assert nvml.device_count() == 2
    full, old = nvml.sample(0, 10.0), nvml.sample(1, 10.0)
    assert full == GpuSample(index=0, name="NVIDIA GeForce RTX 3090", util_pct=97.0, mem_used=20 * 2**30,
                             mem_total=24 * 2**30, power_w=312.5, power_limit_w=350.0, temp_c=71.0, t=10.0,
                             proc_mem={4242: 18 * 2**30})
    assert full.label == "GPU0" and full.mem_pct == pytest.approx(100 * 20 / 24)
    assert old is not None and old.name == "Tesla K80"  # bytes from older bindings decoded
    assert (old.power_w, old.power_limit_w, dict(old.proc_mem)) == (None, None, {})
    assert old.util_pct == 12.0 and old.temp_c == 71.0
    assert nvml.sample(5, 10.0) is None  # a GPU that cannot be reached at all


def test_samples_are_immutable() -> None:
    sample = Nvml(FakeNvml()).sample(0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.util_pct = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        sample.proc_mem[1] = 2  # type: ignore[index]


def test_nvml_initialised_lazily_once_and_shut_down_once() -> None:
    fake = FakeNvml()
    nvml = Nvml(fake)
    assert fake.inits == 0
    nvml.sample(0, 1.0)
    nvml.device_count()
    assert fake.inits == 1
    nvml.shutdown()
    nvml.shutdown()
    assert fake.shutdowns == 1


def test_no_driver_means_cpu_mode_without_an_exception() -> None:
    fake = FakeNvml(init_fails=True)
    nvml = Nvml(fake)
    assert not nvml.available() and "Not Found" in (nvml.reason or "")
    assert nvml.device_count() == 0 and nvml.sample(0, 1.0) is None
    sampler = Sampler([os.getpid()], nvml=nvml)
    assert sampler.mode == "cpu"
    sampler.sample_once()
    assert sampler.latest_gpus() == {}


def test_real_nvml_here_falls_back_to_cpu_mode() -> None:
    nvml = Nvml()  # the real nvidia-ml-py: no driver on this machine
    if nvml.available():
        pytest.skip("this machine has an NVIDIA driver")
    assert nvml.reason and Sampler(nvml=nvml).mode == "cpu"


def test_cpu_mode_samples_this_process() -> None:
    sampler = Sampler([os.getpid()], nvml=Nvml(FakeNvml(init_fails=True)), clock=lambda: 42.0)
    sampler.sample_once()
    sum(i * i for i in range(200_000))  # some CPU time between the two readings
    sampler.sample_once()
    sample = sampler.latest_cpus()[os.getpid()]
    assert sample.label == "CPU" and sample.t == 42.0
    assert sample.rss is not None and sample.rss > 10 * 2**20
    assert sample.cpu_pct is not None and sample.cpu_pct >= 0
    assert 0 < sample.machine_mem_used < sample.machine_mem_total
    assert 0 <= sample.machine_cpu_pct <= 100 and 0 < sample.machine_mem_pct < 100
    assert len(sampler.cpu_history(os.getpid())) == 2


def test_a_process_that_ended_is_dropped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    probe = CpuProbe()
    assert probe.sample(child.pid, 1.0) is None


def test_gpu_mode_history_is_bounded_and_pids_can_change() -> None:
    sampler = Sampler([os.getpid()], nvml=Nvml(FakeNvml()), history=3)
    assert sampler.mode == "gpu"
    for _ in range(5):
        sampler.sample_once()
    assert sorted(sampler.latest_gpus()) == [0, 1]
    assert len(sampler.gpu_history(0)) == 3 and len(sampler.cpu_history(os.getpid())) == 3
    sampler.set_pids([])
    assert sampler.latest_cpus() == {}
    only_second = Sampler(nvml=Nvml(FakeNvml()), gpu_indices=[1])
    only_second.sample_once()
    assert list(only_second.latest_gpus()) == [1]


def test_background_thread_samples_and_stops() -> None:
    sampler = Sampler([os.getpid()], nvml=Nvml(FakeNvml()), interval=0.01)
    with sampler:
        deadline = time.monotonic() + 10
        while len(sampler.gpu_history(0)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(sampler.gpu_history(0)) >= 3
    assert sampler.failure is None
    assert not any(t.name == "gputwin-sampler" for t in threading.enumerate())


def test_thread_failure_is_kept_for_display() -> None:
    class Broken(FakeNvml):
        def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
            raise RuntimeError("driver bug")

    sampler = Sampler(nvml=Nvml(Broken()), interval=0.01).start()
    deadline = time.monotonic() + 10
    while sampler.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert isinstance(sampler.failure, RuntimeError)
