"""The dashboard's once-a-second updates: what changed repaints, a change of size lays out, nothing else does.

Each widget runs in a small app under Pilot. Repaints and layouts are counted by wrapping the real
Widget.refresh, which still runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from rich.text import Text
from textual.app import App, ComposeResult
from textual.widget import Widget

from gputwin.core.events import make
from gputwin.core.state import ArmState, ExperimentState
from gputwin.faces.widgets.feed import ExperimentFeed
from gputwin.faces.widgets.live_text import LiveText, text_shape
from gputwin.faces.widgets.progress import StepProgress
from gputwin.faces.widgets.verdict_pane import VerdictPane, waiting_view
from gputwin.reading.gpu import GpuSample
from test_app import CLOCKS, GIB, append_events, copy_fixture, fixture_app, loaded, screen_text, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class OneWidget(App[None]):
    """One widget, 30 columns wide."""

    CSS = "Screen > LiveText, Screen > StepProgress { width: 30; height: auto; }"

    def __init__(self, widget: Widget) -> None:
        super().__init__()
        self.widget = widget

    def compose(self) -> ComposeResult:
        yield self.widget


@pytest.fixture
def refreshes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Widget, bool]]]:
    """(widget, layout) for every refresh asked for while the test runs."""
    calls: list[tuple[Widget, bool]] = []
    refresh = Widget.refresh

    def counted(self: Widget, *regions: Any, **kwargs: Any) -> Widget:
        calls.append((self, bool(kwargs.get("layout"))))
        return refresh(self, *regions, **kwargs)

    monkeypatch.setattr(Widget, "refresh", counted)
    yield calls


def test_texts_of_equal_words_and_spaces_have_one_shape() -> None:
    assert text_shape(Text("loss 0.2345 · lr 1.00e-04")) == text_shape(Text("loss 0.9999 · lr 9.50e-05"))
    assert text_shape(Text("999/1,000 steps")) != text_shape(Text("1,000/1,000 steps"))  # a longer word
    assert text_shape(Text("ab cd")) != text_shape(Text("abc d"))  # same length, another place to wrap
    assert text_shape(Text("in 9m")) != text_shape(Text("in 9m", no_wrap=True))
    assert text_shape(Text("日 F1")) == text_shape(Text("xx F1")) != text_shape(Text("x F1"))  # cells, not letters


async def test_live_text_repaints_a_change_and_lays_out_only_when_its_size_can_change(
        refreshes: list[tuple[Widget, bool]]) -> None:
    text = LiveText("loss 0.2345")
    app = OneWidget(text)
    async with app.run_test(size=(40, 10)) as pilot:
        await pilot.pause()
        refreshes.clear()
        text.show(Text("loss 0.2345"))
        assert [r for r in refreshes if r[0] is text] == []  # the same text: nothing to do
        text.show("loss 0.9876")
        assert [r for r in refreshes if r[0] is text] == [(text, False)]  # digits changed: repaint only
        await pilot.pause()
        assert text.size.height == 1 and "loss 0.9876" in screen_text(app)  # type: ignore[arg-type]
        refreshes.clear()
        text.show("a loss that no longer fits on one line of thirty")
        assert (text, True) in refreshes
        await pilot.pause()
        assert text.size.height == 2
        text.show("loss 0.1")
        await pilot.pause()
        assert text.size.height == 1


async def test_step_progress_lays_out_only_when_its_eta_moves_to_a_line_of_its_own(
        refreshes: list[tuple[Widget, bool]]) -> None:
    bar = StepProgress("end")
    async with OneWidget(bar).run_test(size=(60, 10)) as pilot:
        bar.show(1, 100, "")
        await pilot.pause()
        assert bar.size.height == 1
        refreshes.clear()
        bar.show(2, 100, "")
        assert (bar, True) not in refreshes and (bar, False) in refreshes
        bar.show(3, 100, "ETA 14:52 (in 20m 03s)")  # no room beside the bar in 30 columns
        assert (bar, True) in refreshes
        await pilot.pause()
        assert bar.size.height == 2
        bar.show(4, 100, "")
        await pilot.pause()
        assert bar.size.height == 1


def _waiting_state(step: int) -> ExperimentState:
    state = ExperimentState(name="x", root=Path("x"))
    for name in ("conservative", "aggressive"):
        state.arms[name] = ArmState(name, status="training", step=step, milestone_step=879)
    return state


def test_the_waiting_view_lists_every_text_it_shows() -> None:
    _, parts = waiting_view(_waiting_state(167), now=0.0)
    plain = [p.plain for p in parts]
    assert plain[0] == "waiting for the milestone validation of conservative, aggressive"
    assert plain[1:3] == ["conservative", "aggressive"]
    assert all("at step 167 of 879" in p for p in plain[3:]) and len(plain) == 5


async def test_the_verdict_pane_shows_new_figures_and_repaints_nothing_when_they_are_the_same(
        refreshes: list[tuple[Widget, bool]]) -> None:
    pane = VerdictPane()
    app = OneWidget(pane)
    async with app.run_test(size=(80, 10)) as pilot:
        pane.show_state(_waiting_state(167), now=0.0)
        await pilot.pause()
        refreshes.clear()
        pane.show_state(_waiting_state(167), now=0.0)
        assert refreshes == []
        pane.show_state(_waiting_state(168), now=0.0)
        await pilot.pause()
        assert "aggressive    at step 168 of 879" in screen_text(app)  # type: ignore[arg-type]


async def test_a_state_update_that_arrives_while_the_app_closes_is_harmless() -> None:
    """The watcher thread may post once more while the screen is being taken down."""
    pane = VerdictPane()
    app = OneWidget(pane)
    async with app.run_test(size=(80, 10)) as pilot:
        await pane.remove_children()
        await pilot.pause()
        pane.show_state(_waiting_state(168), now=0.0)


def test_a_snapshot_is_a_copy_the_watcher_no_longer_changes(tmp_path: Path) -> None:
    exp = copy_fixture("seed-midrun", tmp_path)
    feed = ExperimentFeed(exp, clock=lambda: CLOCKS["seed-midrun"])
    feed.poll()
    state, _ = feed.snapshot()
    watched = feed.watcher.state.arms["aggressive"]
    copied = state.arms["aggressive"]
    assert copied is not watched and copied.step == watched.step == 233
    assert copied.loss_history.steps == watched.loss_history.steps and copied.hparams == watched.hparams
    append_events(exp, "aggressive", make("step", t=CLOCKS["seed-midrun"], step=234, epoch=0.2662, loss=0.3, lr=1e-4))
    feed.poll()
    assert watched.step == 234 and copied.step == 233
    assert copied.loss_history.steps[-1] < 234


def test_news_changes_for_a_stop_or_a_validation_and_not_for_a_step(tmp_path: Path) -> None:
    """What the UI shows at once rather than at its next timed update."""
    exp = copy_fixture("seed-midrun", tmp_path)
    feed = ExperimentFeed(exp, clock=lambda: CLOCKS["seed-midrun"])
    feed.poll()
    before = feed.news()
    t = CLOCKS["seed-midrun"]
    append_events(exp, "aggressive", make("step", t=t, step=234, epoch=0.2662, loss=0.3, lr=1e-4))
    feed.poll()
    assert feed.news() == before
    append_events(exp, "aggressive", make("validation", t=t, step=234, precision=0.5, recall=0.5, f1=0.5))
    feed.poll()
    after_validation = feed.news()
    assert after_validation != before
    append_events(exp, "conservative", make("stopped", t=t, step=300))
    feed.poll()
    assert feed.news() != after_validation


async def test_device_panels_follow_the_sampler_when_no_state_update_comes(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)  # a recording that no longer grows: one state update only
    async with app.run_test(size=(160, 48)) as pilot:
        await loaded(pilot)
        assert "util 94%" in screen_text(app)
        gpu0 = app.sampler.gpus[0]  # type: ignore[union-attr]
        gpu0.append(GpuSample(0, "NVIDIA GeForce RTX 3090", 57.0, 20 * GIB, 24 * GIB, 280.0, 350.0, 70.0,
                              gpu0[-1].t + 1, {48210: 18 * GIB}))
        await wait_until(pilot, lambda: "util 57%" in screen_text(app), "the new GPU reading", tries=100)
        assert app.updates == 1


def test_the_verdict_gives_up_rows_only_where_the_panes_need_them_for_their_loss_trend() -> None:
    from gputwin.faces.widgets.layout import grid_shape, verdict_max_rows

    assert grid_shape(2, 160) == (2, 1) and grid_shape(2, 100) == (2, 1) and grid_shape(2, 80) == (1, 2)
    assert grid_shape(3, 160) == (3, 1) and grid_shape(4, 100) == (2, 2)
    assert verdict_max_rows(48, 1, log_shown=False) == 18  # 40% of the rows under the key bar
    assert verdict_max_rows(30, 1, log_shown=False) == 11
    assert verdict_max_rows(24, 2, log_shown=False) == 8  # 80x24: two stacked panes keep 7 rows each
    assert verdict_max_rows(24, 2, log_shown=True) == 5  # the log open too: the verdict keeps its minimum
    assert verdict_max_rows(48, 1, log_shown=True) == 11  # 25% beside the log
