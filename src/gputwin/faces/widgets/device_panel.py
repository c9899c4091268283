"""The device an arm runs on: its GPU from NVML, or (without NVIDIA GPUs) the arm's process and the machine."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline

from ...reading.gpu import CpuSample, GpuSample
from ...core.state import ArmState
from ..formatting import gib, is_number
from .live_text import LiveText

SPARK_POINTS = 60  # the last minute at the sampler's 1 Hz


class SamplerLike(Protocol):
    """What the app reads from gputwin.reading.gpu.Sampler (tests pass an object with fixed samples)."""

    def latest_gpus(self) -> dict[int, GpuSample]: ...
    def latest_cpus(self) -> dict[int, CpuSample]: ...
    def gpu_history(self, index: int) -> list[GpuSample]: ...
    def cpu_history(self, pid: int) -> list[CpuSample]: ...
    def set_pids(self, pids: Iterable[int]) -> None: ...


def _fig(value: object, spec: str, unit: str) -> str:
    return f"{value:{spec}}{unit}" if is_number(value) else "–"


def gpu_lines(sample: GpuSample, pid: int | None) -> tuple[Text, Text]:
    """Two lines for a GpuSample: utilisation and temperature, then memory (the arm's own too) and power."""
    head = Text.assemble((f"GPU {sample.index}", "bold"), "  util ", (_fig(sample.util_pct, ".0f", "%"), "bold"),
                         f" · {_fig(sample.temp_c, '.0f', ' °C')}")
    own = sample.proc_mem.get(pid) if pid is not None else None
    memory = f"mem {gib(sample.mem_used)}/{gib(sample.mem_total)} GiB"
    if own is not None:
        memory += f" (arm {gib(own)} GiB)"
    power = _fig(sample.power_w, ".0f", "")
    if is_number(sample.power_limit_w):
        power += f"/{sample.power_limit_w:.0f}"
    body = Text(f"{memory} · {power} W")
    return head, body


def cpu_lines(sample: CpuSample) -> tuple[Text, Text]:
    """Two lines for a CpuSample: the arm's CPU % (100% = one core) and RSS, then the machine's."""
    head = Text.assemble(("CPU", "bold"), "  arm ", (_fig(sample.cpu_pct, ".0f", "%"), "bold"), " (100% = 1 core)")
    body = Text(f"arm RSS {gib(sample.rss)} GiB · machine {_fig(sample.machine_cpu_pct, '.0f', '%')} CPU, "
                f"RAM {gib(sample.machine_mem_used)}/{gib(sample.machine_mem_total)} GiB")
    return head, body


class DevicePanel(Vertical):
    """Two lines of live figures, each labelled with its unit, and a one-minute sparkline."""

    DEFAULT_CSS = """
    DevicePanel {
        height: auto;
    }
    DevicePanel > Horizontal {
        height: 1;
    }
    DevicePanel .device-head {
        width: auto;
        margin-right: 1;
    }
    DevicePanel .device-body {
        height: auto;
    }
    DevicePanel Sparkline {
        width: 1fr;
        min-width: 4;
    }
    """

    def __init__(self, *, classes: str | None = None) -> None:
        super().__init__(classes=classes)
        # Held rather than queried: readings may arrive while the panel is still mounting or going away.
        self._head = LiveText(classes="device-head")
        self._spark = Sparkline([], classes="device-spark")
        self._body = LiveText(classes="device-body")

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield self._head
            yield self._spark
        yield self._body

    def show_gpu(self, sample: GpuSample, history: Sequence[GpuSample], pid: int | None) -> None:
        head, body = gpu_lines(sample, pid)
        self._set(head, body, [s.util_pct for s in history if is_number(s.util_pct)])
        self._tip(f"{sample.name or 'GPU'}: utilisation over the last minute (NVML)")

    def show_cpu(self, sample: CpuSample, history: Sequence[CpuSample]) -> None:
        head, body = cpu_lines(sample)
        self._set(head, body, [s.cpu_pct for s in history if is_number(s.cpu_pct)])
        self._tip("the arm process's CPU % over the last minute (psutil)")

    def show_nothing(self, head: str, why: str) -> None:
        """No reading: say which device and why, instead of blank figures."""
        self._set(Text(head, style="bold"), Text(why, style="dim"), [])

    def _set(self, head: Text, body: Text, series: list[float]) -> None:
        """Called every second: the texts and the sparkline repaint only when their figures changed."""
        self._head.show(head)
        self._body.show(body)
        self._spark.data = series[-SPARK_POINTS:]
        self._spark.display = bool(series)  # an empty sparkline would draw a flat line that looks like 0%

    def _tip(self, tooltip: str) -> None:
        if self.tooltip != tooltip:
            self.tooltip = tooltip

    def show_for(self, arm: ArmState, sampler: SamplerLike, gpus: dict[int, GpuSample], cpus: dict[int, CpuSample]) -> None:
        """Pick the arm's reading from the sampler's latest: its GPU, or its process on CPU."""
        if arm.gpu_index is not None:
            sample = gpus.get(arm.gpu_index)
            if sample is not None:
                self.show_gpu(sample, sampler.gpu_history(arm.gpu_index), arm.pid)
            else:
                reason = getattr(getattr(sampler, "nvml", None), "reason", None)
                self.show_nothing(f"GPU {arm.gpu_index}", "no NVML reading here" + (f" ({reason})" if reason else ""))
        elif arm.pid is None or arm.ended:
            self.show_nothing("CPU", f"the arm's process is not running ({arm.status})")
        elif getattr(arm, "node", None) is not None:
            self.show_nothing("CPU", f"runs on the cluster node {arm.node}; its readings stay there")
        elif arm.pid in cpus:
            self.show_cpu(cpus[arm.pid], sampler.cpu_history(arm.pid))
        else:
            self.show_nothing("CPU", f"no reading of pid {arm.pid} yet")
