"""`gputwin --help`, `gputwin check`, and the promise that light commands never import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gputwin.faces.cli import HANDLERS, build_parser, main
from gputwin.core.plan import steps_for

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in HANDLERS:
        assert command in out


def test_every_handler_exists() -> None:
    import importlib

    for command, target in HANDLERS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), command


def test_parser_rejects_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_start_does_not_import_torch() -> None:
    code = "import sys, gputwin.faces.cli, gputwin.faces.status, gputwin.core.profiles; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_steps_for_counts_the_last_partial_batch() -> None:
    assert steps_for(3516, 4, 1) == (879, 879)
    assert steps_for(3516, 4, 2) == (879, 1758)
    assert steps_for(10, 4, 1) == (3, 3)
    assert steps_for(10, 4, 1.5) == (3, 5)


def test_check_seed_profiles_lora_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", str(REPO / "profiles/conservative.toml"), str(REPO / "profiles/aggressive.toml"), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    plans = {a["profile"]["name"]: a["plan"] for a in data["arms"]}
    assert plans["conservative"]["trainable_params"] == 2_293_760
    assert plans["aggressive"]["trainable_params"] == 3_440_640
    assert plans["conservative"]["steps_per_epoch"] == 879
    assert plans["conservative"]["total_steps"] == 1758 and plans["aggressive"]["total_steps"] == 879
    assert plans["conservative"]["milestone_step"] == 879
    assert set(data["differing_keys"]) >= {"lora.r", "train.learning_rate"}


def test_check_table_marks_differing_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(REPO / "profiles/seed.toml")]) == 0
    out = capsys.readouterr().out
    assert "≠ lora.r" in out and "2,293,760" in out and "3,440,640" in out
    assert "  lora.dropout" in out


def test_check_milestone_after_last_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "profiles/aggressive.toml").read_text().replace("step = 879", "step = 900")
    text = text.replace('"../data/pii/', f'"{REPO}/data/pii/')
    profile = tmp_path / "late.toml"
    profile.write_text(text)
    assert main(["check", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "milestone.step" in err and "after the last step (879" in err and "hint:" in err


def test_check_unknown_target_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "profiles/demo-conservative.toml").read_text().replace('"query", "key", "value"', '"q_proj"')
    text = text.replace('"../data/demo/', f'"{REPO}/data/demo/')
    profile = tmp_path / "bad-targets.toml"
    profile.write_text(text)
    assert main(["check", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules" in err and "query" in err


def test_sample_counts_follow_the_data_file_when_it_changes(tmp_path: Path) -> None:
    """Arms that share a data file read it once; a changed file is read again."""
    from gputwin.core.plan import count_samples

    from tiny import make_samples, profile_for, write_data

    train, test = write_data(tmp_path, train=8, test=4)
    profile = profile_for(tmp_path, train, test)
    assert count_samples(profile) == (8, "")
    with train.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": make_samples(1, seed=7)[0].text, "entities": []}) + "\n")
        fh.write("not json\n")
    assert count_samples(profile) == (9, "1 bad lines skipped")
