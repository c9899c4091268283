"""Screenshots of the UI on the recorded experiments, compared with the accepted ones in __snapshots__/.

Run with --snapshot-update after a deliberate change to the look, and read the new SVGs before
committing them. Clock, time zone, GPU readings and paths are fixed so the screens never drift.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gputwin.faces.app import make_app
from gputwin.core.paths import ExperimentPaths
from test_app import CLOCKS, FixedSampler, copy_fixture, loaded, utc  # noqa: F401  (utc: the fixture)

pytestmark = pytest.mark.usefixtures("utc")

SIZES = {"160x48": (160, 48), "100x30": (100, 30), "80x24": (80, 24)}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fixture", ["seed-midrun", "seed-verdict", "crashed"])
def test_dashboard(snap_compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, size: str) -> None:
    copy_fixture(fixture, tmp_path)
    monkeypatch.chdir(tmp_path)  # the screen names the experiment folder relative to here
    clock = CLOCKS[fixture]
    app = make_app(ExperimentPaths(tmp_path / fixture), clock=lambda: clock, sampler=FixedSampler(clock))
    assert snap_compare(app, terminal_size=SIZES[size], run_before=loaded)


def test_extend_dialog(snap_compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_fixture("seed-midrun", tmp_path)
    monkeypatch.chdir(tmp_path)
    clock = CLOCKS["seed-midrun"]
    app = make_app(ExperimentPaths(tmp_path / "seed-midrun"), clock=lambda: clock, sampler=FixedSampler(clock))

    async def open_dialog(pilot) -> None:  # type: ignore[no-untyped-def]
        await loaded(pilot)
        await pilot.press("e")

    assert snap_compare(app, terminal_size=SIZES["100x30"], run_before=open_dialog)
