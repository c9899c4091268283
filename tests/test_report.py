"""The comparison report rendered from a recorded experiment folder (tests/fixtures/recorded_experiment)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from gputwin.core import events as ev
from gputwin.core.errors import UserError
from gputwin.faces.report import _width, cmd_report, table, verdict_for_experiment, write_report
from gputwin.core.paths import ExperimentPaths
from gputwin.reading.watcher import ExperimentWatcher

FIXTURE = Path(__file__).parent / "fixtures" / "recorded_experiment"
NOW = 1767230000.0


@pytest.fixture
def exp(tmp_path: Path) -> Path:
    folder = tmp_path / "pii-mini"
    shutil.copytree(FIXTURE, folder)
    return folder


def validation(folder: Path, arm: str) -> dict:
    return json.loads((folder / arm / "validation" / "step-000040.json").read_text(encoding="utf-8"))


def section(text: str, title: str) -> str:
    """The body of one '## title' section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_report_from_the_recorded_experiment(exp: Path):
    comparison, verdict_path = write_report(exp, now=NOW)
    assert (comparison, verdict_path) == (exp / "comparison.md", exp / "verdict.json")
    text = comparison.read_text(encoding="utf-8")
    base, challenger = validation(exp, "conservative"), validation(exp, "aggressive")

    assert text.startswith("# gputwin comparison: pii-mini")
    verdict = section(text, "Verdict")
    diff = (challenger["f1"] - base["f1"]) * 100
    assert "**A: aggressive is clearly better" in verdict and f"{diff:+.1f} points" in verdict
    assert "`gputwin stop conservative -x pii-mini`" not in verdict  # it was stopped already (by key)
    assert "conservative has already ended (stopped); nothing to stop." in verdict
    assert "`gputwin extend aggressive --epochs 1 -x pii-mini`" in verdict
    taken = verdict.split("### Actions taken")[1]  # both from actions.jsonl
    assert re.search(r"\| stop +\| conservative +\| +\| ui", taken)
    assert re.search(r"\| extend +\| aggressive +\| +1 \| cli", taken)

    metrics = section(text, "Milestone metrics")
    assert "on 50 held-out samples" in metrics
    for arm in (base, challenger):
        for key in ("precision", "recall", "f1"):
            assert f"{arm[key] * 100:.1f}% [" in metrics
        assert f"{arm['tp']} / {arm['fp']} / {arm['fn']}" in metrics
    assert f"{diff:+.1f} pts [" in metrics

    hyper = section(text, "Differing hyperparameters")
    assert re.search(r"\| lora\.r +\| 8 +\| 12 ", hyper) and "train.learning_rate" in hyper
    assert "train.batch_size" not in hyper

    per_type = section(text, "Per entity type")
    for etype, m in challenger["per_type"].items():
        assert re.search(rf"\| {etype} +\| +{m['support']} \|.*\| +{m['f1'] * 100:.1f}% ", per_type)

    training = section(text, "Training")
    steps = {arm: [e for e in ev.read_events(exp / arm / "events.jsonl").events if e.kind == "step"]
             for arm in ("conservative", "aggressive")}
    first = [f"{steps[a][0]['loss']:.4f}" for a in steps]
    assert re.search(rf"\| loss, first +\| +{first[0]} \| +{first[1]} \|", training)
    speed = sum(e["tokens_per_s"] for e in steps["conservative"]) / len(steps["conservative"])
    assert f"{speed:,.0f}" in training
    assert "60/80" in training and "40/40" in training

    found = section(text, "Disagreements")
    assert "### Found by aggressive, missed by conservative" in found
    assert "### Found by conservative, missed by aggressive" in found
    assert "Not yet at the milestone" not in text


def test_verdict_json_matches_the_validation_files(exp: Path):
    _, verdict_path = write_report(exp, now=NOW)
    data = json.loads(verdict_path.read_text(encoding="utf-8"))
    assert data["experiment"] == "pii-mini" and data["scenario"] == "A" and data["winner"] == "aggressive"
    for arm in ("conservative", "aggressive"):
        assert data["metrics"][arm]["f1"]["value"] == pytest.approx(validation(exp, arm)["f1"])
        assert data["validation_files"][arm] == str(exp / arm / "validation" / "step-000040.json")
    assert [a["describe"] for a in data["actions"]] == ["extend aggressive by 1 epoch"]


def test_verdict_for_experiment_from_a_folder_or_a_live_state(exp: Path):
    from_folder = verdict_for_experiment(exp, now=NOW)
    watcher = ExperimentWatcher(ExperimentPaths(exp), clock=lambda: NOW)
    watcher.poll()  # the watcher asks for the verdict itself once every arm has a validation
    assert watcher.state.verdict is not None
    assert watcher.state.verdict.to_dict() == from_folder.to_dict()
    assert verdict_for_experiment(watcher.state, now=NOW).to_dict() == from_folder.to_dict()


def _cut_events(path: Path, keep) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(line for line in lines if keep(json.loads(line))), encoding="utf-8")


def test_an_arm_short_of_its_milestone_is_waited_for(exp: Path):
    _cut_events(exp / "aggressive" / "events.jsonl", lambda e: e["kind"] in ("started", "step") and e.get("step", 0) <= 20)
    (exp / "aggressive" / "validation" / "step-000040.json").unlink()
    verdict = verdict_for_experiment(exp, now=NOW)
    assert verdict.scenario == "waiting" and verdict.headline.startswith("waiting for aggressive: step 20/40")
    write_report(exp, now=NOW)
    text = (exp / "comparison.md").read_text(encoding="utf-8")
    assert "**aggressive**: step 20/40" in section(text, "Not yet at the milestone")
    assert json.loads((exp / "verdict.json").read_text())["scenario"] == "waiting"


def test_a_finished_arm_without_its_validation_says_so(exp: Path):
    (exp / "aggressive" / "validation" / "step-000040.json").unlink()
    verdict = verdict_for_experiment(exp, now=NOW)
    assert verdict.waiting == {"aggressive": "finished at step 40 without a validation at step 40"}


def test_different_samples_cannot_be_compared(exp: Path):
    path = exp / "aggressive" / "validation" / "step-000040.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["indices"] = [i + 1 for i in data["indices"]]
    path.write_text(json.dumps(data), encoding="utf-8")
    write_report(exp, now=NOW)
    text = (exp / "comparison.md").read_text(encoding="utf-8")
    assert "**cannot compare: conservative and aggressive were validated on different samples" in text


def test_cmd_report_by_name_latest_and_unknown(exp: Path, monkeypatch, capsys):
    monkeypatch.setenv("GPUTWIN_LOGS", str(exp.parent))
    assert cmd_report(argparse.Namespace(name="pii-mini")) == 0
    out = capsys.readouterr().out
    assert f"wrote {exp / 'comparison.md'}" in out and "verdict: A: aggressive is clearly better" in out
    assert cmd_report(argparse.Namespace(name=None)) == 0
    assert cmd_report(argparse.Namespace(name=str(exp))) == 0
    with pytest.raises(UserError) as err:
        cmd_report(argparse.Namespace(name="nope"))
    assert "pii-mini" in str(err.value)
    with pytest.raises(UserError, match="no experiment.json"):
        write_report(exp.parent)


def test_tables_are_valid_markdown_and_aligned_with_chinese_text():
    lines = table(["type", "value"], [["PERSON", "张伟"], ["EMAIL", "a|b@x.com"]], "ll")
    assert len({_width(line) for line in lines}) == 1
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 3 for line in lines)
    assert lines[1] == "| ------ | ---------- |"  # the escaped pipe takes two columns


@pytest.mark.parametrize("content, why", [
    ("{not json", "cannot be used"),
    ('{"f1": 0.9}', "no per_sample list"),
    ('{"per_sample": []}', "no samples were scored"),
    ('{"per_sample": [[1, 2]]}', "tp, fp, fn"),
])
def test_a_broken_validation_file_is_named_not_fatal(exp: Path, content: str, why: str):
    path = exp / "aggressive" / "validation" / "step-000040.json"
    path.write_text(content, encoding="utf-8")
    verdict = verdict_for_experiment(exp, now=NOW)
    assert verdict.scenario == "waiting"
    assert str(path) in verdict.waiting["aggressive"] and why in verdict.waiting["aggressive"]
