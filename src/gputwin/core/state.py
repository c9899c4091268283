"""Run state: a fold of an arm's events into what the UI and `gputwin status` show.

Public API
    ArmState                  one arm: status, progress, latest metrics, loss history, validations, failure
    ExperimentState           the experiment: arms in order, rules, differing profile keys, verdict
    apply(state, event)       fold one event into an ArmState (updates it in place and returns it)
    fold(name, events)        a fresh ArmState with every event applied
    LossHistory               bounded, bucketed loss curve (raw and EMA-smoothed) for charts
    ValidationPoint, CheckpointPoint, Failure, Extension        what the lists hold
    STATUSES                  "queued" "starting" "training" "validating" "stopped" "finished" "crashed" "stalled"

``apply`` does no I/O and reads no clock: the same events always give the same state. It is O(1)
per event (a million events fold in about a second) because the state is updated in place and the
loss history is kept as a fixed number of buckets that double in width as the run grows.
"crashed" from a dead process and "stalled" need the files and a clock: gputwin.reading.watcher.ExperimentWatcher,
which reads the files and keeps an ExperimentState up to date, sets them.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from . import events as ev
from .eta import StepTimer
from .lifecycle import CRASHED, ENDED, FINISHED, LIVE, QUEUED, STALLED, STARTING, STOPPED, TRAINING, VALIDATING, Failure

if TYPE_CHECKING:
    from .profiles import Rules

STATUSES = LIVE  # the live view's words (gputwin.core.lifecycle holds the one vocabulary)

LOSS_EMA_BETA = 0.9  # smoothing of the loss curve (TensorBoard-style, bias-corrected)
HISTORY_POINTS = 512  # at most this many points per curve, whatever the run length
MAX_BAD_LINES = 50  # bad lines kept for display (all are counted)


@dataclass(frozen=True)
class ValidationPoint:
    """One validation result (entity-level, fractions 0..1)."""

    step: int
    precision: float
    recall: float
    f1: float
    path: str | None = None  # validation/step-NNNNNN.json with per-sample results, when written
    t: float = 0.0
    sample_size: int | None = None
    schedule: Mapping[str, Any] | None = None  # where the arm stood in its LR schedule (lr_fraction, decay_done)

    @property
    def lr_fraction(self) -> float | None:
        value = (self.schedule or {}).get("lr_fraction")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class ProbePoint:
    """A cooldown probe's result: the arm at `step` as if its schedule had ended there."""

    step: int
    steps: int  # cooldown steps trained on the side branch
    lr_from: float | None
    f1: float | None
    precision: float | None
    recall: float | None
    path: str | None
    seconds: float | None
    failed: str | None = None
    t: float = 0.0


@dataclass(frozen=True)
class CheckpointPoint:
    """The last checkpoint written: where a resume would start from."""

    step: int
    path: str
    t: float


@dataclass(frozen=True)
class Extension:
    """An ``extend`` that the trainer accepted: ``epochs`` more, new ``total_steps``."""

    step: int
    epochs: float
    total_steps: int
    t: float
    new_cycle: bool = False  # a new LR cycle (warmup to rules.extend_lr of the peak), not a stretched decay
    lr_curve: tuple[float, ...] = ()  # the LR from `step` to the new end, sampled


class LossHistory:
    """Loss curve with bounded length: ``steps``, ``raw`` and ``smoothed`` lists of equal length.

    Points are grouped in buckets of ``width`` consecutive step events (raw = bucket mean, smoothed =
    the EMA at the bucket's last step). When ``max_points`` buckets are full, neighbours are merged
    and the width doubles, so adding a point is O(1) amortised and memory stays fixed.
    ``rewind(step)`` forgets what came after a step, for a run resumed from an earlier checkpoint.
    """

    __slots__ = ("max_points", "beta", "width", "_steps", "_raw", "_smooth", "_ema_at", "_open_n", "_open_sum",
                 "_open_step", "_ema", "_ema_n", "count")

    def __init__(self, max_points: int = HISTORY_POINTS, beta: float = LOSS_EMA_BETA) -> None:
        if max_points < 2 or max_points % 2:
            raise ValueError("max_points must be an even number >= 2")
        self.max_points, self.beta, self.width = max_points, beta, 1
        self._steps: list[int] = []
        self._raw: list[float] = []
        self._smooth: list[float] = []
        self._ema_at: list[tuple[float, int]] = []  # EMA state at each closed bucket's end, for rewind
        self._open_n, self._open_sum, self._open_step = 0, 0.0, 0
        self._ema, self._ema_n = 0.0, 0
        self.count = 0  # points ever added

    def add(self, step: int, loss: float) -> None:
        self.count += 1
        if loss == loss and loss not in (math.inf, -math.inf):  # finite: NaN/inf do not poison the curve
            self._ema = self.beta * self._ema + (1.0 - self.beta) * loss
            self._ema_n += 1
            self._open_sum += loss
            self._open_n += 1
        self._open_step = step
        if self._open_n >= self.width:
            self._close()

    @property
    def smoothed_last(self) -> float | None:
        """The current bias-corrected EMA, or None before the first finite loss."""
        if not self._ema_n:
            return None
        return self._ema / (1.0 - self.beta**self._ema_n)

    def _close(self) -> None:
        self._steps.append(self._open_step)
        self._raw.append(self._open_sum / self._open_n)
        self._smooth.append(self.smoothed_last)  # type: ignore[arg-type]
        self._ema_at.append((self._ema, self._ema_n))
        self._open_n, self._open_sum = 0, 0.0
        if len(self._steps) >= self.max_points:
            self._steps = self._steps[1::2]
            self._raw = [(a + b) / 2 for a, b in zip(self._raw[::2], self._raw[1::2])]
            self._smooth = self._smooth[1::2]
            self._ema_at = self._ema_at[1::2]
            self.width *= 2

    def rewind(self, step: int) -> None:
        """Forget the points after `step`: a run resumed from that checkpoint logs them again.

        Closed buckets after `step` go; an open bucket reaching past it goes whole (at most width - 1
        points at or before `step` with it), and the EMA continues from the last bucket kept.
        """
        if self._open_n and self._open_step <= step:
            return  # nothing after `step`: the open bucket is the newest
        keep = bisect_right(self._steps, step)
        if keep == len(self._steps) and not self._open_n:
            return
        self._open_n, self._open_sum = 0, 0.0
        del self._steps[keep:], self._raw[keep:], self._smooth[keep:], self._ema_at[keep:]
        self._ema, self._ema_n = self._ema_at[-1] if self._ema_at else (0.0, 0)

    def _with_open(self, closed: list, open_value: Any) -> list:
        return closed + [open_value] if self._open_n else list(closed)

    @property
    def steps(self) -> list[int]:
        return self._with_open(self._steps, self._open_step)

    @property
    def raw(self) -> list[float]:
        return self._with_open(self._raw, self._open_sum / self._open_n if self._open_n else 0.0)

    @property
    def smoothed(self) -> list[float]:
        return self._with_open(self._smooth, self.smoothed_last)

    def __len__(self) -> int:
        return len(self._steps) + (1 if self._open_n else 0)


@dataclass(slots=True)
class ArmState:
    """Everything known about one arm. Times are unix seconds; fractions are 0..1."""

    name: str
    status: str = STARTING
    device: str | None = None  # as the trainer reported it: "cuda:1 NVIDIA H200", "cpu", ...
    gpu_index: int | None = None  # NVML index when on a GPU (for the GPU panel)
    pid: int | None = None
    shares_process_with: tuple[str, ...] = ()  # the arms co-trained in the same process (this life)
    samples: int | None = None  # training samples
    step: int = 0
    total_steps: int | None = None
    milestone_step: int | None = None
    steps_per_epoch: int | None = None
    epoch: float | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    # exact figures over every step event (finite values only), for the report: the history is bucketed
    first_loss: float | None = None
    last_loss: float | None = None
    min_loss: float | None = None
    min_loss_step: int | None = None
    speed_sum: float = 0.0  # sum of the step events' tokens_per_s ...
    speed_count: int = 0  # ... and how many there were
    started_t: float | None = None  # first ``started`` event
    last_t: float | None = None  # last event of any kind
    last_step_t: float | None = None  # last ``step`` event
    milestone_reached: bool = False
    loss_history: LossHistory = field(default_factory=LossHistory)
    timer: StepTimer = field(default_factory=StepTimer)  # mean step time for ETA and stall detection
    validations: list[ValidationPoint] = field(default_factory=list)
    probes: list[ProbePoint] = field(default_factory=list)
    lr_plan: dict[str, Any] | None = None  # the trainer's LR plan (started/extended events)
    last_checkpoint: CheckpointPoint | None = None
    failure: Failure | None = None
    extended: list[Extension] = field(default_factory=list)
    restarts: int = 0  # ``started`` events after the first (resumes, extensions after the end)
    hparams: dict[str, Any] = field(default_factory=dict)  # flattened profile ("train.learning_rate": 1e-4)
    exit_code: int | None = None  # from <arm>/exit, set by the watcher
    stderr_tail: list[str] = field(default_factory=list)  # last lines of <arm>/stderr.log, set by the watcher
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason), first MAX_BAD_LINES
    bad_line_count: int = 0
    events_seen: int = 0
    node: str | None = None  # on a Ray cluster: the node the arm runs on (``placed``)
    queue_place: int | None = None  # on a Ray cluster, while queued: 1 = next to be placed (``queued``)
    queue_length: int | None = None  # ... among this many gputwin arms waiting

    @property
    def smoothed_loss(self) -> float | None:
        return self.loss_history.smoothed_last

    @property
    def mean_step_s(self) -> float | None:
        return self.timer.mean

    @property
    def last_validation(self) -> ValidationPoint | None:
        return self.validations[-1] if self.validations else None

    def validation_at(self, step: int) -> ValidationPoint | None:
        for point in reversed(self.validations):
            if point.step == step:
                return point
        return None

    def probe_at(self, step: int) -> ProbePoint | None:
        for point in reversed(self.probes):
            if point.step == step:
                return point
        return None

    @property
    def ended(self) -> bool:
        """The trainer is gone (stopped, finished or crashed)."""
        return self.status in ENDED

    @property
    def progress(self) -> float | None:
        return min(1.0, self.step / self.total_steps) if self.total_steps else None

    @property
    def milestone_progress(self) -> float | None:
        return min(1.0, self.step / self.milestone_step) if self.milestone_step else None

    def add_bad_lines(self, bad: Iterable[tuple[int, str]]) -> None:
        for item in bad:
            self.bad_line_count += 1
            if len(self.bad_lines) < MAX_BAD_LINES:
                self.bad_lines.append(item)


@dataclass
class ExperimentState:
    """The experiment as a whole. ``verdict`` stays None until every arm has a validation."""

    name: str
    root: Path
    arms: dict[str, ArmState] = field(default_factory=dict)  # in the experiment file's order
    rules: Rules | None = None
    baseline: str | None = None
    differing_keys: list[str] = field(default_factory=list)  # dotted profile keys whose values differ
    replicate_of: dict[str, str] = field(default_factory=dict)  # replicate arm -> the arm it repeats (rules.replicates)
    verdict: Any = None  # gputwin.core.verdict.Verdict, from gputwin.faces.report.verdict_for_experiment
    reference: Any = None  # gputwin.core.reference.ReferenceResult when the experiment names a [reference]
    problems: list[str] = field(default_factory=list)  # e.g. experiment.json unreadable

    @property
    def any_crashed(self) -> bool:
        return any(a.status == CRASHED for a in self.arms.values())

    @property
    def all_ended(self) -> bool:
        return bool(self.arms) and all(a.ended for a in self.arms.values())


# ---------------------------------------------------------------- the fold


def event_number(value: Any) -> float | None:
    """Event numbers may be NaN/inf written as strings ("nan"); anything else unusable -> None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _gpu_index(device: Any) -> int | None:
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str) and device.startswith("cuda"):  # "cuda", "cuda:1", "cuda:1 NVIDIA H200"
        match = re.match(r"cuda(?::(\d+))?", device)
        return int(match.group(1) or 0) if match else None
    return None


def _on_step(s: ArmState, e: ev.Event) -> None:
    d = e.data
    step = d["step"]
    t = e.t
    s.step = step
    s.epoch = d["epoch"]
    loss = d["loss"]
    if type(loss) is not float:
        loss = event_number(loss)
    s.loss = loss
    s.lr = d["lr"]
    s.grad_norm = d.get("grad_norm")
    s.tokens_per_s = d.get("tokens_per_s")
    s.last_step_t = t
    if s.status != TRAINING and s.status not in ENDED:
        s.status = TRAINING
    s.timer.observe(step, t)
    if loss is not None:
        s.loss_history.add(step, loss)
        if math.isfinite(loss):
            if s.first_loss is None:
                s.first_loss = loss
            s.last_loss = loss
            if s.min_loss is None or loss < s.min_loss:
                s.min_loss, s.min_loss_step = loss, step
    speed = s.tokens_per_s
    if (type(speed) is float and math.isfinite(speed)) or type(speed) is int:
        s.speed_sum += speed
        s.speed_count += 1


def _on_started(s: ArmState, e: ev.Event) -> None:
    if s.started_t is None:
        s.started_t = e.t
    else:
        s.restarts += 1
        s.loss_history.rewind(_int(e.get("step")) or 0)  # steps after the checkpoint it starts from come again
    s.timer.restart()
    s.status, s.failure, s.exit_code = TRAINING, None, None
    s.pid = _int(e.get("pid"))
    partners = e.get("shares_process_with")
    s.shares_process_with = tuple(str(x) for x in partners) if isinstance(partners, list) else ()
    device = e.get("device")
    s.device = None if device is None else str(device)
    # The trainer sees only its own GPU (as cuda:0); the profile names the physical index NVML uses.
    physical = s.hparams.get("device")
    s.gpu_index = physical if isinstance(physical, int) and not isinstance(physical, bool) else _gpu_index(device)
    if s.node is not None:
        s.gpu_index = None  # a cluster node's GPU: this machine's NVML does not see it
    s.samples = _int(e.get("samples"))
    s.steps_per_epoch = _int(e.get("steps_per_epoch"))
    s.total_steps = _int(e.get("total_steps"))
    s.milestone_step = _int(e.get("milestone_step"))
    if isinstance(e.get("lr_plan"), dict):
        s.lr_plan = e["lr_plan"]
    if _int(e.get("step")):  # a restart that names where it starts
        s.step = int(e["step"])


def _on_resumed(s: ArmState, e: ev.Event) -> None:
    s.timer.restart()
    s.step = _int(e.get("step")) or s.step
    s.loss_history.rewind(s.step)
    s.status, s.failure, s.exit_code = TRAINING, None, None
    if _int(e.get("total_steps")):
        s.total_steps = int(e["total_steps"])


def _on_queued(s: ArmState, e: ev.Event) -> None:
    """A new life on a Ray cluster waits for its node; the place may be repeated as the queue moves."""
    s.status, s.failure, s.exit_code, s.node = QUEUED, None, None, None
    s.queue_place, s.queue_length = _int(e.get("place")), _int(e.get("of"))


def _on_placed(s: ArmState, e: ev.Event) -> None:
    s.status, s.failure, s.exit_code = STARTING, None, None
    s.node = str(e["node"])
    s.queue_place = s.queue_length = None


def _on_checkpoint(s: ArmState, e: ev.Event) -> None:
    s.last_checkpoint = CheckpointPoint(int(e["step"]), str(e["path"]), e.t)
    s.timer.pause()


def _on_milestone(s: ArmState, e: ev.Event) -> None:
    s.milestone_reached = True
    if s.status not in ENDED:
        s.status = VALIDATING
    s.timer.pause()


def _on_validation(s: ArmState, e: ev.Event) -> None:
    s.validations.append(ValidationPoint(
        step=int(e["step"]),
        precision=event_number(e["precision"]) or 0.0,
        recall=event_number(e["recall"]) or 0.0,
        f1=event_number(e["f1"]) or 0.0,
        path=e.get("path"),
        t=e.t,
        sample_size=_int(e.get("sample_size")),
        schedule=e.get("schedule") if isinstance(e.get("schedule"), dict) else None,
    ))
    probing = _int((s.validations[-1].schedule or {}).get("probe_steps"))
    if s.status == VALIDATING and not probing:  # a cooldown probe follows: still validating
        s.status = TRAINING
    s.timer.pause()


def _on_probe(s: ArmState, e: ev.Event) -> None:
    s.probes.append(ProbePoint(
        step=int(e["step"]), steps=int(e["steps"]), lr_from=event_number(e.get("lr_from")), f1=event_number(e.get("f1")),
        precision=event_number(e.get("precision")), recall=event_number(e.get("recall")), path=e.get("path"),
        seconds=event_number(e.get("seconds")), failed=e.get("failed"), t=e.t,
    ))
    if s.status == VALIDATING:
        s.status = TRAINING
    s.timer.pause()


def _on_extended(s: ArmState, e: ev.Event) -> None:
    total = int(e["total_steps"])
    rewound = _int(e.get("rewound_to"))
    if rewound is not None:  # a wsd arm went back to where its decay began: the steps after it come again
        s.step = rewound
        s.loss_history.rewind(rewound)
        s.timer.restart()
    curve = e.get("lr_curve")
    s.extended.append(Extension(int(e["step"]), event_number(e["epochs"]) or 0.0, total, e.t,
                                new_cycle=e.get("new_cycle") is True,
                                lr_curve=tuple(x for x in curve if isinstance(x, (int, float))) if isinstance(curve, list) else ()))
    s.total_steps = total
    if isinstance(e.get("lr_plan"), dict):
        s.lr_plan = e["lr_plan"]


def _on_end(status: str) -> Any:
    def handler(s: ArmState, e: ev.Event) -> None:
        s.status = status
        step = _int(e.get("step"))
        if step is not None:
            s.step = step
    return handler


def _on_failed(s: ArmState, e: ev.Event) -> None:
    s.status = CRASHED
    s.failure = Failure(str(e["error"]), str(e["message"]), str(e["hint"]), e.t)
    step = _int(e.get("step"))
    if step is not None:
        s.step = step


_HANDLERS = {
    ev.STEP: _on_step,
    ev.STARTED: _on_started,
    ev.RESUMED: _on_resumed,
    ev.CHECKPOINT: _on_checkpoint,
    ev.MILESTONE: _on_milestone,
    ev.VALIDATION: _on_validation,
    ev.EXTENDED: _on_extended,
    ev.STOPPED: _on_end(STOPPED),
    ev.FINISHED: _on_end(FINISHED),
    ev.FAILED: _on_failed,
    ev.PROBE: _on_probe,
    ev.QUEUED: _on_queued,
    ev.PLACED: _on_placed,
}


def apply(state: ArmState, event: ev.Event) -> ArmState:
    """Fold one event into ``state`` (in place) and return it. Unknown kinds are counted and skipped."""
    state.events_seen += 1
    state.last_t = event.t
    handler = _HANDLERS.get(event.kind)
    if handler is not None:
        handler(state, event)
    return state


def fold(name: str, events: Iterable[ev.Event], state: ArmState | None = None) -> ArmState:
    """Apply every event to a fresh ArmState (or to ``state``)."""
    state = state or ArmState(name)
    for event in events:
        apply(state, event)
    return state
