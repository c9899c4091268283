from __future__ import annotations

import time

import pytest

from gputwin.core import events as ev
from gputwin.core.eta import StepTimer, clock_time, eta, human_duration, mean_step_seconds
from gputwin.core.state import ArmState, apply, fold

T0 = 1767603600.0  # 2026-01-05 09:00:00 UTC


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def event(kind: str, t: float, **fields: object) -> ev.Event:
    return ev.parse(ev.dumps(ev.make(kind, t=t, **fields)))


def run(steps: int, *, warm_s: float = 5.0, step_s: float = 1.0, warmup: int = 10) -> ArmState:
    """An arm whose first `warmup` steps take `warm_s` each and later ones `step_s`."""
    events = [event(ev.STARTED, T0, arm="a", pid=1, device="cpu", samples=4000, steps_per_epoch=1000,
                    total_steps=2000, milestone_step=1000)]
    t = T0
    for n in range(1, steps + 1):
        t += warm_s if n <= warmup else step_s
        events.append(event(ev.STEP, t, step=n, epoch=n / 1000, loss=1.0, lr=1e-4))
    return fold("a", events)


def test_warmup_steps_are_excluded() -> None:
    arm = run(50)
    assert arm.timer.mean == pytest.approx(1.0)
    assert arm.timer.counted_steps == 40  # steps 11..50: the time each took after the one before


def test_no_mean_during_warmup() -> None:
    assert run(10).timer.mean is None
    assert eta(run(10), 2000, T0 + 100) is None


def test_checkpoint_and_validation_pauses_are_excluded() -> None:
    arm = run(50)
    last = arm.last_step_t
    apply(arm, event(ev.CHECKPOINT, last + 3, step=50, path="checkpoints/step-000050"))
    apply(arm, event(ev.STEP, last + 10, step=51, epoch=0.051, loss=1.0, lr=1e-4))  # 10 s, 9 of them checkpoint
    apply(arm, event(ev.STEP, last + 11, step=52, epoch=0.052, loss=1.0, lr=1e-4))
    apply(arm, event(ev.MILESTONE, last + 11.5, step=52))
    apply(arm, event(ev.VALIDATION, last + 70, step=52, precision=0.9, recall=0.9, f1=0.9))
    apply(arm, event(ev.STEP, last + 72, step=53, epoch=0.053, loss=1.0, lr=1e-4))
    assert arm.timer.mean == pytest.approx(1.0)


def test_restart_never_bridges_the_gap() -> None:
    timer = StepTimer(warmup=2)
    for n in range(1, 11):
        timer.observe(n, float(n))
    timer.restart()
    for n in range(11, 21):  # resumed an hour later, two warm-up steps slow
        timer.observe(n, 3600.0 + (n - 10) * (10.0 if n <= 12 else 1.0))
    assert timer.mean == pytest.approx(1.0)


def test_mean_step_seconds_over_pairs() -> None:
    pairs = [(n, float(n) * 2) for n in range(1, 21)]
    assert mean_step_seconds(pairs, warmup=0) == pytest.approx(2.0)
    paused = pairs[:10] + [(n, float(n) * 2 + 100) for n in range(11, 21)]
    assert mean_step_seconds(paused, pauses_after=[10], warmup=0) == pytest.approx(2.0)
    assert mean_step_seconds(paused, warmup=0) != pytest.approx(2.0)
    assert mean_step_seconds([(1, 0.0)]) is None


def test_steps_logged_every_few_steps() -> None:
    pairs = [(n * 5, n * 5 * 0.5) for n in range(1, 40)]
    assert mean_step_seconds(pairs, warmup=2) == pytest.approx(0.5)


def test_eta_from_the_last_step() -> None:
    arm = run(50)
    now = arm.last_step_t + 0.25
    to_milestone = eta(arm, 1000, now)
    assert to_milestone is not None
    assert to_milestone.seconds == pytest.approx(950 - 0.25)
    assert to_milestone.human == "15m"
    assert to_milestone.clock == time.strftime("%H:%M", time.gmtime(now + 949.75))
    assert eta(arm, 2000, now).human == "32m"


def test_eta_of_a_stalled_arm_does_not_reach_zero() -> None:
    arm = run(50)
    late = eta(arm, 60, arm.last_step_t + 3600)
    assert late is not None and late.seconds == pytest.approx(9.0)


def test_eta_when_reached_or_not_running() -> None:
    arm = run(50)
    assert eta(arm, 50, arm.last_step_t).seconds == 0
    assert eta(arm, None, arm.last_step_t) is None
    apply(arm, event(ev.STOPPED, arm.last_step_t + 1, step=50))
    assert eta(arm, 2000, arm.last_step_t + 2) is None


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (44.6, "45s"), (65, "1m 05s"), (600, "10m"), (4320, "1h 12m"), (90000, "1d 1h"), (-5, "0s"),
])
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_clock_time() -> None:
    assert clock_time(T0 + 5 * 3600 + 32 * 60, T0) == "14:32"
    assert clock_time(T0 + 86400, T0) == "Tue 09:00"
    assert clock_time(T0 + 30 * 86400, T0) == "2026-02-04 09:00"
