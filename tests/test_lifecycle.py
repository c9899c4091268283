"""The arm lifecycle's rules as pure functions of (fold, process, now): no files, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gputwin.core import events as ev
from gputwin.core import lifecycle as lc
from gputwin.core import state as st


def _fold(*events: tuple[str, dict]) -> st.ArmState:
    return st.fold("a", [ev.Event(kind, t=float(i), data=data) for i, (kind, data) in enumerate(events)])


STARTED = (ev.STARTED, {"pid": 100, "total_steps": 8, "milestone_step": 4})
STEP = (ev.STEP, {"step": 1, "epoch": 0.25, "loss": 1.0, "lr": 1e-3})


@pytest.mark.parametrize("events, process, expected", [
    ((), lc.Process(alive=False), lc.NOT_STARTED),
    ((), lc.Process(alive=False, recorded=True), lc.CRASHED),  # started, died before its first event
    ((STARTED, STEP), lc.Process(alive=True), lc.RUNNING),
    ((STARTED, STEP), lc.Process(alive=False, recorded=True), lc.CRASHED),
    ((STARTED, STEP, (ev.FINISHED, {"step": 8})), lc.Process(alive=False, recorded=True), lc.FINISHED),
    ((STARTED, STEP, (ev.STOPPED, {"step": 1})), lc.Process(alive=False, recorded=True), lc.STOPPED),
    ((STARTED, STEP, (ev.FAILED, {"error": "NonFiniteLoss", "message": "nan", "hint": "", "step": 1})),
     lc.Process(alive=False, recorded=True), lc.FAILED),
])
def test_between_lives_is_a_function_of_the_fold_and_the_process(events, process, expected) -> None:
    status = lc.between_lives(_fold(*events), process)
    assert status == expected and status in lc.BETWEEN_LIVES


def test_the_two_views_share_their_words() -> None:
    shared = set(lc.LIVE) & set(lc.BETWEEN_LIVES)
    assert shared == {lc.FINISHED, lc.STOPPED, lc.CRASHED}
    assert st.STATUSES == lc.LIVE and st.TRAINING is lc.TRAINING


def test_stalled_after_ten_mean_steps_or_a_minute() -> None:
    arm = _fold(STARTED, STEP)
    last = arm.last_step_t
    assert last is not None
    assert not lc.stalled(arm, last + lc.STALL_MIN_S - 1)
    assert lc.stalled(arm, last + lc.STALL_MIN_S + 1)
    assert not lc.stalled(_fold(STARTED), 1e9)  # no step yet: starting, not stalled


@pytest.mark.parametrize("code, error, words", [
    (None, "gone", "no exit status was recorded"),
    (1, "exited", "exit status 1"),
    (-9, "killed", "killed by signal 9 (SIGKILL)"),
])
def test_a_crash_says_how_the_trainer_ended(code, error, words) -> None:
    failure = lc.crash_failure("a", code, Path("/x/a/stderr.log"))
    assert failure.error == error and words in failure.message
    assert "gputwin resume a" in failure.hint and "/x/a/stderr.log" in failure.hint
