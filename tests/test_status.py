from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from gputwin.faces import cli
from gputwin.core import events as ev
from gputwin.core.errors import UserError
from gputwin.faces.status import cmd_status

FIXTURES = Path(__file__).parent / "fixtures" / "events"


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def last_t(folder: str) -> float:
    return max(e.t for log in (FIXTURES / folder).glob("*/events.jsonl") for e in ev.read_events(log).events)


def status(folder: str | None, *, as_json: bool = False, now: float | None = None) -> tuple[int, str]:
    args = argparse.Namespace(name=None if folder is None else str(FIXTURES / folder), json=as_json)
    out = io.StringIO()
    with redirect_stdout(out):
        code = cmd_status(args, clock=lambda: now if now is not None else last_t(folder) + 1)
    return code, out.getvalue()


def test_text_midrun() -> None:
    code, text = status("seed-midrun")
    assert code == 0
    assert "pii-seed  (2 arms)" in text
    assert "conservative [baseline]  TRAINING  cuda:0 NVIDIA GeForce RTX 3090  pid 48210" in text
    assert "step 400/1758 (22.8%)" in text and "step 233/879 (26.5%)" in text
    assert "milestone 879: 45.5%  ETA 09:09 (4m 4" in text  # 479 steps at 0.6 s after the last step
    assert "end 1758: ETA 09:18 (13m)" in text
    assert "loss 0.3722 (smoothed 0.4595)" in text and "tokens/s" in text
    assert text.rstrip().endswith("verdict: not yet (waiting for validation of conservative, aggressive)")


def test_json_midrun_matches_text() -> None:
    code, out = status("seed-midrun", as_json=True)
    summary = json.loads(out)
    assert code == 0 and summary["experiment"] == "pii-seed" and summary["baseline"] == "conservative"
    a, b = summary["arms"]
    assert (a["name"], a["status"], a["step"], a["total_steps"], a["milestone_step"]) == (
        "conservative", "training", 400, 1758, 879)
    assert a["eta_milestone"]["clock"] == "09:09" and a["eta_end"]["human"] == "13m"
    assert b["eta_milestone"] == b["eta_end"]  # aggressive's milestone is its end
    assert a["loss"] == 0.3722 and a["last_validation"] is None and a["failure"] is None


def test_stalled_arm_is_explained() -> None:
    code, text = status("seed-midrun", now=last_t("seed-midrun") + 3600)
    assert code == 0 and "STALLED" in text and "stalled: no step for 1h 0" in text


def test_verdict_fixture_shows_validations() -> None:
    code, out = status("seed-verdict", as_json=True)
    summary = json.loads(out)
    a, b = summary["arms"]
    assert code == 0 and b["status"] == "finished" and b["eta_end"] is None
    assert a["last_validation"]["step"] == b["last_validation"]["step"] == 879
    assert b["last_validation"]["f1"] > a["last_validation"]["f1"]
    verdict = summary["verdict"]
    assert verdict["scenario"] == "A" and verdict["winner"] == "aggressive"
    _, text = status("seed-verdict")
    assert "validation at step 879 on 500 samples: precision 91.5%  recall 84.2%  F1 87.7%" in text
    assert "milestone 879: reached, validated" in text
    assert "verdict: A: aggressive is clearly better" in text


def test_crashed_fixture_exit_code_and_details() -> None:
    code, text = status("crashed")
    assert code == 3
    assert "conservative [baseline]  CRASHED" in text
    assert "crashed: OutOfMemoryError: CUDA out of memory" in text
    assert "hint: lower train.batch_size" in text
    assert "killed by signal 9 (SIGKILL)" in text and "exit status -9" in text
    assert "    | torch.OutOfMemoryError" in text
    assert "milestone 879: 16.5%  not reached" in text
    assert "1 unreadable event line(s); first: line 147: incomplete last line" in text
    code, out = status("crashed", as_json=True)
    arms = {a["name"]: a for a in json.loads(out)["arms"]}
    assert code == 3 and arms["aggressive"]["exit_code"] == -9 and arms["conservative"]["stderr_tail"]


def test_no_experiment_is_a_user_error_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTWIN_LOGS", str(tmp_path))
    with pytest.raises(UserError) as info:
        status(None, now=0.0)
    assert "gputwin demo" in info.value.hint and "gputwin run profiles/seed.toml" in info.value.hint


def test_unknown_name_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTWIN_LOGS", str(tmp_path))
    with pytest.raises(UserError):
        cmd_status(argparse.Namespace(name="no-such-run", json=False))


def test_cli_picks_the_most_recent_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(FIXTURES / "crashed", tmp_path / "crashed")
    monkeypatch.setenv("GPUTWIN_LOGS", str(tmp_path))
    assert cli.main(["status", "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["folder"] == str(tmp_path / "crashed")
    assert cli.main(["status", "crashed"]) == 3
    assert "OutOfMemoryError" in capsys.readouterr().out


def test_status_does_not_import_torch_or_textual() -> None:
    code = ("import sys; from gputwin.faces.cli import main; main(['status', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'textual', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "seed-midrun")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")
