"""`gputwin serve`: the address it listens on and tells browsers, its refusals, and the page in Debian's
headless chromium showing both arm panes and the verdict of a recorded experiment."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gputwin.faces import cli
from gputwin.core.paths import ExperimentPaths
from gputwin.faces.serve import app_command, public_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browser  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "events"
GPUTWIN = str(Path(sys.executable).with_name("gputwin"))
needs_chromium = pytest.mark.skipif(browser.CHROMIUM is None,
                                    reason="chromium is not installed (apt-get install chromium; .ci/run does)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_server_listens_on_this_machine_only_unless_told() -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.name, args.public_url) == ("127.0.0.1", 8000, None, None)
    assert public_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert public_url("::1", 9000) == "http://[::1]:9000"
    assert public_url("0.0.0.0", 8000) == f"http://{socket.gethostname()}:8000"  # a name browsers can reach
    assert public_url("0.0.0.0", 8000, "https://box.example/gputwin/") == "https://box.example/gputwin"


def test_each_browser_tab_runs_this_gputwin_on_the_experiment_folder(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "with space" / "pii-seed")
    command = app_command(exp)
    assert command.startswith(sys.executable) and " -m gputwin.faces.cli attach " in command
    assert command.endswith(f"'{exp.root}'")  # quoted for the shell textual-serve runs it in


@pytest.mark.parametrize("argv, expected", [
    (["serve", "nosuch"], "no experiment 'nosuch'"),
    (["serve", "seed-verdict", "--port", "70000"], "--port 70000 is not a TCP port"),
    (["serve", "seed-verdict", "--public-url", "box:8000"], "is not an http:// or https:// URL"),
    (["serve", "seed-verdict", "--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'"),
])
def test_bad_arguments_are_refused_before_serving(tmp_path: Path, logs: Path, capsys: pytest.CaptureFixture[str],
                                                  argv: list[str], expected: str) -> None:
    shutil.copytree(FIXTURES / "seed-verdict", logs / "seed-verdict")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "hint:" in err


def test_a_port_in_use_is_named_with_a_hint(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(FIXTURES / "seed-verdict", logs / "seed-verdict")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
@pytest.mark.e2e
@needs_chromium
def test_the_page_shows_both_arms_and_the_verdict_in_headless_chromium(tmp_path: Path, logs: Path) -> None:
    shutil.copytree(FIXTURES / "seed-verdict", logs / "seed-verdict")
    port = free_port()
    env = {**os.environ, "GPUTWIN_LOGS": str(logs), "TZ": "UTC"}
    server = subprocess.Popen([GPUTWIN, "serve", "seed-verdict", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        announced = server.stdout.readline()  # type: ignore[union-attr]
        assert f"Serving the UI of seed-verdict at http://127.0.0.1:{port}" in announced
        listening: list[tuple[str, int]] = []
        deadline = time.monotonic() + 30  # the message comes as the server starts, the socket right after
        while not listening and time.monotonic() < deadline:
            time.sleep(0.1)
            listening = [(c.laddr.ip, c.laddr.port) for c in psutil.Process(server.pid).net_connections()
                         if c.status == "LISTEN"]
        assert listening == [("127.0.0.1", port)]
        shot = tmp_path / "serve-seed-verdict.png"
        text = browser.screenshot(f"http://127.0.0.1:{port}/", shot,
                                  wanted=["1 conservative", "2 aggressive", "verdict: scenario A", "report "])
        # What the page's terminal received: both panes, the verdict with its figures, the report kept.
        for expected in ("1 conservative", "2 aggressive", "verdict: scenario A", "A: aggressive is clearly better",
                         "milestone validated at step 879: F1 87.7%", "recommended: stop conservative"):
            assert expected in text, expected
        assert png_size(shot)[0] == 1600
        assert (logs / "seed-verdict" / "verdict.json").is_file()  # the UI in the browser kept the report
        copy_to = os.environ.get("GPUTWIN_SCREENSHOTS")  # keep the picture to look at
        if copy_to:
            shutil.copy(shot, Path(copy_to) / shot.name)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the UI process it started for the page
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.1)
