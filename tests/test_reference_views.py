"""The reference row where people read the verdict: the verdict pane (Pilot), `gputwin status`, the report
and the headless lines, on the recorded seed experiments with a reference added as `gputwin run` leaves it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gputwin.faces import headless, report, status
from gputwin.faces.app import make_app
from gputwin.core.paths import ExperimentPaths
from gputwin.control.reference_run import REFERENCE_DIR, RESULT_FILE
from gputwin.reading.watcher import ExperimentWatcher
from test_app import CLOCKS, SIZE, FixedSampler, copy_fixture, loaded, screen_text, utc  # noqa: F401  (utc: fixture)

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "events"))
import make_fixtures  # noqa: E402

pytestmark = pytest.mark.usefixtures("utc")


def add_reference(exp: ExperimentPaths, *, f1_offset: float | None = None) -> dict[str, Any]:
    """The seed team's production adapter (precision 95.4%, recall 74.4%, F1 83.6%, near the seed's
    95.37 / 74.31 / 83.53), validated on the arms' 500 samples, recorded as `gputwin run` records it: in
    experiment.json and _reference/validation.json."""
    data = json.loads(exp.experiment_json.read_text())
    data["reference"] = {"model": "/models/pii-production", "name": "production", "base": None, "task": None,
                         "device": 0}
    data["rules"]["target_f1_reference_offset"] = f1_offset
    exp.experiment_json.write_text(json.dumps(data, indent=1))
    result = make_fixtures.milestone_results(879, {"production": 0.755}, {"production": 0.09})["production"]
    result["reference"] = {"name": "production", "key": "0" * 24, "command": "gputwin validate --model ..."}
    path = exp.root / REFERENCE_DIR / RESULT_FILE
    path.parent.mkdir()
    path.write_text(json.dumps(result))
    return result


def state_of(exp: ExperimentPaths, clock: float) -> Any:
    watcher = ExperimentWatcher(exp, clock=lambda: clock)
    watcher.poll()
    return watcher.state


async def test_the_verdict_pane_shows_the_reference_row_and_each_arm_against_it(tmp_path: Path) -> None:
    exp = copy_fixture("seed-verdict", tmp_path)
    add_reference(exp, f1_offset=0.015)
    app = make_app(exp, clock=lambda: CLOCKS["seed-verdict"], sampler=FixedSampler(CLOCKS["seed-verdict"]))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        text = screen_text(app)
        assert "verdict: scenario A" in text
        row = next(line for line in text.splitlines() if " production " in line and " ref " in line)
        assert "95.4% [" in row and "74.4% [" in row and "✗ recall, F1" in row  # it misses the final goal
        versus = next(line for line in text.splitlines() if "F1 against the reference" in line)
        assert "(97.5% intervals): conservative +0.2 [" in versus and "] ties production" in versus
        assert "aggressive +4.1 [" in versus and "] beats production" in versus
        assert "Targets relative to production: F1 >= " in " ".join(app.state.verdict.reasons)  # scrolled below


async def test_before_the_milestone_the_waiting_view_already_shows_the_reference(tmp_path: Path) -> None:
    exp = copy_fixture("seed-midrun", tmp_path)
    add_reference(exp)
    app = make_app(exp, clock=lambda: CLOCKS["seed-midrun"], sampler=FixedSampler(CLOCKS["seed-midrun"]))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        text = screen_text(app)
        assert "verdict: waiting" in text
        row = next(line for line in text.splitlines() if "production (reference)" in line)
        assert "validated on 500 samples: precision 95." in row and "recall 74." in row


def test_status_text_and_json_carry_the_reference(tmp_path: Path) -> None:
    exp = copy_fixture("seed-verdict", tmp_path)
    added = add_reference(exp)
    summary = status.summarize(state_of(exp, CLOCKS["seed-verdict"]), CLOCKS["seed-verdict"])
    assert summary["reference"]["f1"] == added["f1"] and summary["reference"]["n"] == 500
    versus = summary["verdict"]["reference"]["comparisons"]
    assert versus["aggressive"]["outcome"] == "beats"
    json.dumps(summary)  # --json prints it
    text = status.render(summary)
    assert "production [reference]  /models/pii-production" in text
    assert "validation on 500 samples: precision 95." in text
    assert "  aggressive beats production: F1 +" in text and "  conservative ties production: F1 +" in text


def test_the_report_has_a_reference_column_and_section(tmp_path: Path) -> None:
    exp = copy_fixture("seed-verdict", tmp_path)
    add_reference(exp, f1_offset=0.015)
    comparison, verdict_json = report.write_report(exp.root, now=CLOCKS["seed-verdict"])
    text = comparison.read_text()
    assert "## Reference" in text and "**production**: `/models/pii-production`" in text
    assert "Validated with `gputwin validate --model ...`" in text
    assert "- target_f1 = reference + 1.5 points: " in text
    header = next(line for line in text.splitlines() if line.startswith("| metric"))
    assert "production (reference)" in header and "aggressive - production" in header
    assert "aggressive - conservative" in header
    assert "aggressive beats production: ahead on F1 in" in text
    types = next(line for line in text.splitlines() if line.startswith("| type"))
    assert "production (reference) F1 (P / R)" in types
    saved = json.loads(verdict_json.read_text())
    assert saved["reference"]["targets"]["target_f1"]["offset"] == 0.015


def test_headless_prints_the_reference_beside_the_arms(tmp_path: Path) -> None:
    exp = copy_fixture("seed-verdict", tmp_path)
    add_reference(exp)
    verdict = state_of(exp, CLOCKS["seed-verdict"]).verdict
    lines = headless.verdict_lines(verdict)
    scores = [line for line in lines if "F1 " in line and "[" in line and not line.startswith("  - ")]
    assert [line.split()[0] for line in scores] == ["conservative", "aggressive", "production"]
    assert "  F1 +" in scores[1] and scores[1].endswith(": beats production")
    assert any(line.startswith("  - aggressive beats production") for line in lines)


def test_a_missing_reference_file_is_named_with_the_command_that_makes_it(tmp_path: Path) -> None:
    exp = copy_fixture("seed-verdict", tmp_path)
    add_reference(exp, f1_offset=0.015)
    (exp.root / REFERENCE_DIR / RESULT_FILE).unlink()
    verdict = state_of(exp, CLOCKS["seed-verdict"]).verdict
    assert verdict.scenario == "mismatch"
    assert "validation.json is missing; make it with `gputwin validate --model /models/pii-production" \
        in verdict.headline


def test_a_damaged_reference_file_is_named_and_the_arms_verdict_stands(tmp_path: Path) -> None:
    exp = copy_fixture("seed-verdict", tmp_path)
    add_reference(exp)
    path = exp.root / REFERENCE_DIR / RESULT_FILE
    path.write_text(json.dumps({"per_sample": [[1, 2]]}))
    verdict = state_of(exp, CLOCKS["seed-verdict"]).verdict
    assert verdict.scenario == "A" and verdict.reference["metrics"] is None
    assert f"its validation file {path} cannot be used (per-sample counts must be [tp, fp, fn] rows" \
        in verdict.reference["problem"]
