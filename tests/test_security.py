"""Security: private experiment folders, strictly parsed control files, names that cannot leave the logs
folder, no shell, no remote code unless asked, no network port."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from gputwin.faces import commands
from gputwin.control import requests as control, launcher, supervise
from gputwin.core import paths
from gputwin.core.errors import UserError
from gputwin.core.paths import ArmPaths, ExperimentPaths
from gputwin.core.profiles import Experiment, ModelSpec, ProfileError, Rules, load_profile
from gputwin.reading.watcher import ExperimentWatcher
from tiny import make_arm, make_samples, profile_for, tiny_bert, write_data

SRC = Path(__file__).resolve().parents[1] / "src" / "gputwin"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("world")
    train, test = write_data(folder / "data")
    return SimpleNamespace(train=train, test=test, bert=tiny_bert(folder / "bert", make_samples(24)))




def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---------------------------------------------------------------- a real run: folders, files, ports


def _inet_connections(pids: set[int]) -> list[tuple[int, Any]]:
    found = []
    for pid in pids:
        try:
            found += [(pid, c) for c in psutil.Process(pid).net_connections(kind="inet")]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_a_real_run_opens_no_network_port_and_keeps_its_folders_private(world: SimpleNamespace, logs: Path) -> None:
    profile = profile_for(world.bert, world.train, world.test, task="tag", name="a", milestone_step=6)
    exp = launcher.start_experiment(Experiment("private", (profile,), Rules(baseline="a")), root=logs)
    arm = exp.arm("a")
    supervisor = int((arm.root / supervise.SUPERVISOR_FILE).read_text().split()[0])
    seen_pids: set[int] = set()
    connections = []
    samples = 0
    while supervise.read_exit(arm) is None:  # every process of the arm, sampled while it runs
        try:
            pids = {supervisor, *(p.pid for p in psutil.Process(supervisor).children(recursive=True))}
        except psutil.NoSuchProcess:
            break
        seen_pids |= pids
        connections += _inet_connections(pids)
        samples += 1
        time.sleep(0.02)
    assert supervise.read_exit(arm) == 0, arm.stderr.read_text()[-3000:]
    assert len(seen_pids) >= 2 and samples > 10  # the supervisor and the trainer were both looked at
    assert connections == [], "gputwin opened a network socket"
    assert not any(c.status == psutil.CONN_LISTEN for _, c in connections)

    # -- the experiment folder and every arm folder: owner only; the files in them: owner read/write only
    assert mode(exp.root) == 0o700 and mode(arm.root) == 0o700
    for path in (*exp.root.iterdir(), *arm.root.iterdir()):
        if path.is_dir():
            assert mode(path) == 0o700, path
        else:
            assert mode(path) == 0o600, path
    for checkpoint in arm.checkpoints.iterdir():
        assert mode(checkpoint) == 0o700, checkpoint
    request = control.write_request(arm.control, control.VALIDATE)
    assert mode(arm.control) == 0o700 and mode(request) == 0o600
    assert all(not path.name.endswith(".tmp") for path in arm.control.iterdir())  # written whole, then renamed


def test_control_files_and_their_folder_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        request = control.write_request(tmp_path / "control", control.STOP)
    finally:
        os.umask(old)
    assert mode(tmp_path / "control") == 0o700 and mode(request) == 0o600


# ---------------------------------------------------------------- control files: parsed strictly


def _request(folder: Path, name: str, content: bytes | str) -> Path:
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("content, why", [
    ('{"action": "stop", "command": "rm -rf ~"}', "unknown field(s) ['command']"),
    ('{"action": "validate", "path": "/etc/passwd"}', "unknown field(s) ['path']"),
    ('{"action": "validate", "out": "../../x"}', "unknown field(s) ['out']"),
    ('{"action": "../../stop"}', "unknown action '../../stop'"),
    ('{"action": "shell"}', "unknown action 'shell'"),
    ('{"action": "extend", "epochs": true}', "extend needs epochs as a whole number from 1 to 1000"),
    ('{"action": "extend", "epochs": "2"}', "extend needs epochs as a whole number from 1 to 1000"),
    ('{"action": "extend", "epochs": 1e9}', "extend needs epochs as a whole number from 1 to 1000"),
    ('{"action": "extend", "epochs": 1001}', "extend needs epochs as a whole number from 1 to 1000"),
    ('{"action": "stop", "by": "%s"}' % ("x" * 65), "'by' must be a short string"),
    ('{"action": "stop", "by": ["cli"]}', "'by' must be a short string"),
    ('["stop"]', "not a JSON object"),
    ("stop", "unreadable request"),
    (b"\xff\xfe{}", "unreadable request"),
    ('{"action": "stop"}' + " " * control.MAX_REQUEST_BYTES, f"larger than {control.MAX_REQUEST_BYTES} bytes"),
])
def test_control_requests_are_parsed_strictly(tmp_path: Path, content: str | bytes, why: str) -> None:
    _request(tmp_path, "0001-x.json", content)
    [(path, result)] = control.pending(tmp_path)
    assert isinstance(result, control.ControlError) and why in str(result)


def test_control_links_fifos_and_folders_are_rejected_without_being_followed(tmp_path: Path) -> None:
    outside = _request(tmp_path, "outside.json", '{"action": "stop"}')
    folder = tmp_path / "control"
    folder.mkdir()
    (folder / "0001-link.json").symlink_to(outside)
    (folder / "0002-dangling.json").symlink_to(tmp_path / "nowhere.json")
    os.mkfifo(folder / "0003-fifo.json")  # a read would block the trainer
    (folder / "0004-folder.json").mkdir()
    _request(folder, "0005-ok.json", '{"action": "stop", "by": "ui", "t": 1.5}')
    _request(folder, "not-a-request.json", '{"action": "stop"}')  # names must start with a digit
    _request(folder, ".0006-stop.tmp", '{"action": "stop"}')  # a request still being written
    results = control.pending(folder)
    assert [p.name for p, _ in results] == ["0001-link.json", "0002-dangling.json", "0003-fifo.json",
                                            "0004-folder.json", "0005-ok.json"]
    whys = [str(r) for _, r in results[:4]]
    assert "symbolic link" in whys[0] and "symbolic link" in whys[1]
    assert whys[2] == "not a plain file" and whys[3] == "not a plain file"
    assert results[4][1] == control.Request(control.STOP, 0, "ui", folder / "0005-ok.json")
    for path, _ in results:
        control.consume(path)
    assert outside.read_text() == '{"action": "stop"}'  # the link went, its target did not
    assert sorted(p.name for p in folder.iterdir()) == [".0006-stop.tmp", ".rejected-0004-folder.json",
                                                        "not-a-request.json"]


def test_write_request_refuses_what_the_trainer_would_reject(tmp_path: Path) -> None:
    for kwargs in ({"action": "shell"}, {"action": control.EXTEND, "epochs": 0},
                   {"action": control.STOP, "by": "x" * 65}):
        with pytest.raises(control.ControlError):
            control.write_request(tmp_path / "control", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "control").exists() or list((tmp_path / "control").iterdir()) == []


# ---------------------------------------------------------------- names


BAD_NAMES = ["../x", "..", ".", "/abs", "a/b", "a\\b", "", "-rf", ".hidden", "a b", "a\x00b", "x" * 65, "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_could_leave_the_logs_folder_are_refused(name: str, tmp_path: Path) -> None:
    assert not paths.valid_name(name)
    with pytest.raises(ValueError, match="invalid experiment name"):
        paths.experiment(name, tmp_path)
    with pytest.raises(ValueError, match="invalid arm name"):
        ExperimentPaths(tmp_path / "exp").arm(name)
    assert list(tmp_path.iterdir()) == []


def test_good_names_are_accepted() -> None:
    for name in ("a", "conservative", "demo-20260105-093015", "arm_1.v2", "A" * 64):
        assert paths.valid_name(name)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b"])
def test_profile_and_experiment_names_are_checked_where_they_are_read(tmp_path: Path, name: str) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text(f'name = "{name}"\n[model]\nbase = "org/model"\n[data]\ntrain = "t.jsonl"\ntest = "t.jsonl"\n')
    with pytest.raises(ProfileError, match="cannot be an arm name"):
        load_profile(profile, check_files=False)
    with pytest.raises(UserError, match="cannot be an experiment name"):
        commands._renamed(Experiment("ok", (), Rules(baseline="a")), name)


def test_arm_names_from_the_files_are_checked_before_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An experiment.json naming "../../etc" as an arm: reported, never read or written."""
    exp = ExperimentPaths(tmp_path / "logs" / "exp")
    exp.root.mkdir(parents=True)
    (tmp_path / "logs" / "secret").mkdir()
    (tmp_path / "logs" / "secret" / "events.jsonl").write_text("")
    exp.experiment_json.write_text(json.dumps({"name": "exp", "arm_names": ["../secret", "/etc", "ok"]}))
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    assert list(watcher.state.arms) == ["ok"]  # the others are refused
    assert sum("invalid arm name" in p for p in watcher.state.problems) == 2
    with pytest.raises(UserError, match="has no arm '../secret'"):
        launcher.resolve_arm(exp, "../secret")


# ---------------------------------------------------------------- no shell, no pickles, no remote code


def test_subprocesses_run_without_a_shell_and_nothing_is_evaluated() -> None:
    sources = {path: path.read_text(encoding="utf-8") for path in SRC.rglob("*.py")}
    assert len(sources) > 20
    forbidden = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.(getoutput|getstatusoutput)\(|"
                           r"(?<![\w.])(?<!def )(eval|exec)\(|pickle\.loads?\(")  # a method named eval is no eval
    offenders = [f"{path.relative_to(SRC)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
                 for path, text in sources.items() for m in forbidden.finditer(text)]
    assert offenders == []
    loads = [(path, m) for path, text in sources.items() for m in re.finditer(r"torch\.load\(([^)]*)\)", text)]
    assert loads and all("weights_only=True" in m.group(1) for _, m in loads)  # checkpoints never unpickle code
    spawns = [m.group(0) for text in sources.values() for m in re.finditer(r"subprocess\.Popen\(\s*\w+", text)]
    assert spawns, "the launcher and supervisor start processes from argument lists"


@pytest.fixture
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every transformers from_pretrained call's trust_remote_code (the real loaders still run)."""
    import transformers

    calls: list[tuple[str, Any]] = []
    for cls_name in ("AutoTokenizer", "AutoConfig", "AutoModelForTokenClassification", "AutoModelForCausalLM"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained.__func__

        def spy(klass: Any, *args: Any, __real: Any = real, __name: str = cls_name, **kwargs: Any) -> Any:
            calls.append((__name, kwargs.get("trust_remote_code", "NOT PASSED")))
            return __real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_from_pretrained_only_as_the_profile_says(
        world: SimpleNamespace, tmp_path: Path, from_pretrained_calls: list[tuple[str, Any]], trust: bool) -> None:
    from gputwin.validate.modeling import save_adapter
    from gputwin.train.setup import build_run
    from gputwin.validate.load import load_for_validation

    profile = profile_for(world.bert, world.train, world.test, task="tag", name="a")
    assert profile.model.trust_remote_code is False  # the default
    profile = replace(profile, model=replace(profile.model, trust_remote_code=trust))
    run = build_run(ArmPaths(Path(make_arm(tmp_path, profile))), profile)
    run.tokenizer_now()  # on a tokenised-data cache hit the tokenizer loads after the first step: load it now
    trainer_calls = list(from_pretrained_calls)
    assert {name for name, _ in trainer_calls} >= {"AutoTokenizer", "AutoModelForTokenClassification"}
    assert all(value is trust for _, value in trainer_calls), trainer_calls

    from_pretrained_calls.clear()
    adapter = save_adapter(run.model, tmp_path / "adapter", run.adapter_meta)
    load_for_validation(adapter, device="cpu")
    assert from_pretrained_calls and all(value is trust for _, value in from_pretrained_calls), from_pretrained_calls


def test_profiles_leave_remote_code_off_unless_they_say_true(tmp_path: Path) -> None:
    text = 'name = "a"\n[model]\nbase = "org/model"\n[data]\ntrain = "t.jsonl"\ntest = "t.jsonl"\n'
    (tmp_path / "off.toml").write_text(text)
    (tmp_path / "on.toml").write_text(text.replace('base = "org/model"', 'base = "org/model"\ntrust_remote_code = true'))
    assert load_profile(tmp_path / "off.toml", check_files=False).model.trust_remote_code is False
    assert load_profile(tmp_path / "on.toml", check_files=False).model.trust_remote_code is True
    assert ModelSpec(base="x").trust_remote_code is False
