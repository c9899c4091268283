"""GPU and CPU sampling for the live view: NVML through nvidia-ml-py, psutil for processes.

    GpuSample     one immutable reading of one GPU (None for anything the GPU does not report)
    CpuSample     one reading of a trainer process and the machine, for arms without a GPU ("CPU")
    Nvml          lazy NVML session: initialised on first use, shut down at exit; no driver -> unavailable
    CpuProbe      per-pid CPU%/RSS via psutil (a pid reused by another process is not mistaken for it)
    Sampler       a background thread polling at ~1 Hz, keeping a short history per GPU and per pid;
                  ``latest_gpus()``, ``latest_cpus()``, ``gpu_history(i)``, ``cpu_history(pid)`` are thread-safe

As in nvitop, the NVML layer never raises for a value a GPU lacks (fan-less cards, no power reading,
no permission): the field is None. A machine without NVIDIA driver works in CPU mode, with no error.
GPU indices are NVML's, in PCI bus order; CUDA numbers cards the same way only under
CUDA_DEVICE_ORDER=PCI_BUS_ID, so trainers should run with it for "cuda:1" to be GPU 1 here.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Iterable, Mapping

import psutil

HISTORY = 120  # samples kept per GPU and per pid (two minutes at 1 Hz)
INTERVAL_S = 1.0


@dataclass(frozen=True)
class GpuSample:
    """One GPU at time ``t``. Memory in bytes, power in watts; ``proc_mem`` maps pid -> GPU bytes."""

    index: int
    name: str | None
    util_pct: float | None
    mem_used: int | None
    mem_total: int | None
    power_w: float | None
    power_limit_w: float | None
    temp_c: float | None
    t: float
    proc_mem: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "proc_mem", MappingProxyType(dict(self.proc_mem)))

    @property
    def label(self) -> str:
        return f"GPU{self.index}"

    @property
    def mem_pct(self) -> float | None:
        if self.mem_used is None or not self.mem_total:
            return None
        return 100.0 * self.mem_used / self.mem_total


@dataclass(frozen=True)
class CpuSample:
    """A trainer process (CPU %, may exceed 100 on several cores; RSS bytes) and the machine as a whole."""

    pid: int
    cpu_pct: float | None
    rss: int | None
    machine_cpu_pct: float
    machine_mem_used: int
    machine_mem_total: int
    t: float

    label = "CPU"

    @property
    def machine_mem_pct(self) -> float:
        return 100.0 * self.machine_mem_used / self.machine_mem_total if self.machine_mem_total else 0.0


def _import_pynvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class Nvml:
    """A lazily opened NVML session. ``module`` is pynvml (tests pass a stand-in with the same names)."""

    def __init__(self, module: ModuleType | Any | None = None) -> None:
        self._module = module
        self._tried = False
        self._open = False
        self._lock = threading.Lock()
        self.reason: str | None = None  # why NVML is unavailable, for display

    def available(self) -> bool:
        """Initialise NVML once; False (with ``reason``) when there is no library, driver or GPU."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self._init()
            return self._open

    def _init(self) -> None:
        if self._module is None:
            self._module = _import_pynvml()
        if self._module is None:
            self.reason = "nvidia-ml-py is not installed"
            return
        try:
            self._module.nvmlInit()
        except self._module.NVMLError as exc:
            self.reason = f"NVML unavailable: {exc}"
            return
        self._open = True
        atexit.register(self.shutdown)

    def shutdown(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                try:
                    self._module.nvmlShutdown()
                except self._module.NVMLError:
                    pass  # the driver went away first; nothing left to release

    def _get(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML query; None when the GPU does not support it or refuses (NVMLError of any kind)."""
        try:
            return fn(*args)
        except self._module.NVMLError:
            return None

    def device_count(self) -> int:
        if not self.available():
            return 0
        return self._get(self._module.nvmlDeviceGetCount) or 0

    def sample(self, index: int, t: float) -> GpuSample | None:
        """Read one GPU; None when the GPU cannot be reached at all (lost, index out of range)."""
        if not self.available():
            return None
        nv = self._module
        handle = self._get(nv.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return None
        name = self._get(nv.nvmlDeviceGetName, handle)
        if isinstance(name, bytes):
            name = name.decode("utf-8", errors="replace")
        util = self._get(nv.nvmlDeviceGetUtilizationRates, handle)
        memory = self._get(nv.nvmlDeviceGetMemoryInfo, handle)
        power_mw = self._get(nv.nvmlDeviceGetPowerUsage, handle)
        limit_mw = self._get(nv.nvmlDeviceGetEnforcedPowerLimit, handle)
        temp = self._get(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU)
        procs = self._get(nv.nvmlDeviceGetComputeRunningProcesses, handle) or []
        proc_mem = {p.pid: int(p.usedGpuMemory) for p in procs if getattr(p, "usedGpuMemory", None) is not None}
        return GpuSample(
            index=index,
            name=name,
            util_pct=None if util is None else float(util.gpu),
            mem_used=None if memory is None else int(memory.used),
            mem_total=None if memory is None else int(memory.total),
            power_w=None if power_mw is None else power_mw / 1000.0,
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
            temp_c=None if temp is None else float(temp),
            t=t,
            proc_mem=proc_mem,
        )


class CpuProbe:
    """CPU readings per pid. psutil measures CPU % between two calls, so the first reading is 0."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        psutil.cpu_percent(interval=None)  # start the machine-wide measurement

    def machine(self) -> tuple[float, int, int]:
        memory = psutil.virtual_memory()
        return psutil.cpu_percent(interval=None), int(memory.total - memory.available), int(memory.total)

    def sample(self, pid: int, t: float, machine: tuple[float, int, int] | None = None) -> CpuSample | None:
        """None once the process is gone (or the pid now belongs to another process)."""
        proc = self._procs.get(pid)
        try:
            if proc is None or not proc.is_running():  # is_running() also checks the create time
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                cpu = proc.cpu_percent(interval=None)
                rss = proc.memory_info().rss
        except psutil.NoSuchProcess:
            self._procs.pop(pid, None)
            return None
        except psutil.AccessDenied:
            cpu, rss = None, None
        cpu_pct, used, total = machine or self.machine()
        return CpuSample(pid, cpu, rss, cpu_pct, used, total, t)

    def forget(self, keep: Iterable[int]) -> None:
        keep = set(keep)
        for pid in [p for p in self._procs if p not in keep]:
            del self._procs[pid]


class Sampler:
    """Polls GPUs (all NVML devices, or ``gpu_indices``) and the given pids in a daemon thread."""

    def __init__(self, pids: Iterable[int] = (), *, gpu_indices: Iterable[int] | None = None,
                 interval: float = INTERVAL_S, history: int = HISTORY, nvml: Nvml | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.interval, self.history, self.clock = interval, history, clock
        self.nvml = nvml or Nvml()
        self._gpu_indices = None if gpu_indices is None else list(gpu_indices)
        self._pids: list[int] = list(pids)
        self._cpu = CpuProbe()
        self._gpus: dict[int, deque[GpuSample]] = {}
        self._cpus: dict[int, deque[CpuSample]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # an unexpected error that ended the thread

    @property
    def mode(self) -> str:
        """"gpu" when NVML sees at least one GPU, else "cpu"."""
        return "gpu" if self.nvml.device_count() > 0 else "cpu"

    def set_pids(self, pids: Iterable[int]) -> None:
        """The trainer pids to follow (arms start, restart and end while the UI runs)."""
        with self._lock:
            self._pids = list(pids)
            for pid in [p for p in self._cpus if p not in self._pids]:
                del self._cpus[pid]

    def sample_once(self) -> None:
        now = self.clock()
        indices = self._gpu_indices if self._gpu_indices is not None else range(self.nvml.device_count())
        gpus = [s for s in (self.nvml.sample(i, now) for i in indices) if s is not None]
        with self._lock:
            pids = list(self._pids)
        machine = self._cpu.machine()
        cpus = [s for s in (self._cpu.sample(pid, now, machine) for pid in pids) if s is not None]
        self._cpu.forget(pids)
        with self._lock:
            for sample in gpus:
                self._gpus.setdefault(sample.index, deque(maxlen=self.history)).append(sample)
            for sample in cpus:
                if sample.pid in self._pids:
                    self._cpus.setdefault(sample.pid, deque(maxlen=self.history)).append(sample)

    def latest_gpus(self) -> dict[int, GpuSample]:
        with self._lock:
            return {i: d[-1] for i, d in self._gpus.items() if d}

    def latest_cpus(self) -> dict[int, CpuSample]:
        with self._lock:
            return {p: d[-1] for p, d in self._cpus.items() if d}

    def gpu_history(self, index: int) -> list[GpuSample]:
        with self._lock:
            return list(self._gpus.get(index, ()))

    def cpu_history(self, pid: int) -> list[CpuSample]:
        with self._lock:
            return list(self._cpus.get(pid, ()))

    def _run(self) -> None:
        try:
            while True:
                self.sample_once()
                if self._stop.wait(self.interval):
                    return
        except Exception as exc:  # surfaced through .failure: the UI shows it instead of a trace on screen
            self.failure = exc

    def start(self) -> Sampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gputwin-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
