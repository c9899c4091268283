"""End to end in a real terminal: the CPU demo under tmux to a verdict, then `e` and `s` on an arm,
`gputwin demo` again in a second terminal attaching to it, detach with `q`, and re-attach to the same history. This is what a user at 2 a.m. over SSH sees."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gputwin.core.paths import ArmPaths, ExperimentPaths
from gputwin.control.supervise import read_pid

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GPUTWIN = str(Path(sys.executable).with_name("gputwin"))
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


class Terminal:
    """One tmux session at a fixed size on its own tmux server (no user config, no other clients), read as text."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.tmux = ["tmux", "-L", name, "-f", "/dev/null"]
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        subprocess.run([*self.tmux, "new-session", "-d", "-s", name, "-x", "160", "-y", "48",
                        # COLUMNS/LINES from the test's own environment would override the terminal's size
                        f"env -u COLUMNS -u LINES {exports} {' '.join(command)}"], check=True)
        subprocess.run([*self.tmux, "set-option", "-t", name, "remain-on-exit", "on"], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def keys(self, *keys: str) -> None:
        for key in keys:
            subprocess.run([*self.tmux, "send-keys", "-t", self.name, key], check=True)
            time.sleep(0.3)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(1.0)
        raise AssertionError(f"{pattern!r} did not appear within {timeout:.0f} s; screen:\n{screen}")

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def _stop_all(root: Path) -> None:
    for pid_file in root.glob("*/*/pid"):
        found = read_pid(ArmPaths(pid_file.parent))
        if found is not None:
            try:
                os.kill(found[0], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@needs_tmux
def test_demo_in_tmux_reaches_a_verdict_then_extend_stop_detach_and_reattach(tmp_path: Path) -> None:
    env = {"GPUTWIN_LOGS": str(tmp_path / "logs"), "TERM": "xterm-256color"}
    name = f"gputwin-e2e-{os.getpid()}"
    term = Terminal(name, [GPUTWIN, "demo"], env)
    again = None
    try:
        # Both arms train, validate at step 200 and the verdict pane fills in.
        # (the first run validates the demo's reference before the arms start: allow for it on a busy machine)
        term.wait_for(r"demo-conservative.*demo-aggressive", 120)
        term.wait_for(r"verdict: scenario [ABC]", 420)
        # The aggressive arm (1 epoch) finished at 200 steps, the conservative one (2 epochs) trains on to 400;
        # both have their F1 at step 200 (a capture may catch a half-drawn frame, and a notification may
        # cover a corner for a few seconds: wait rather than look once).
        term.wait_for(r"200/200 steps", 60)
        term.wait_for(r"/400 steps", 60)
        term.wait_for(r"CPU · finished", 60)
        term.wait_for(r"(?s)(validated at step 200: F1 \d+\.\d%.*){2}", 60)
        [exp_dir] = [p for p in (tmp_path / "logs").iterdir() if p.name.startswith("demo-")]

        # Extend the finished aggressive arm by one epoch: the modal shows the new end step and the new LR
        # cycle it will train with, then it trains on.
        term.keys("2", "e")
        modal = term.wait_for(r"a new cycle", 20)
        assert "demo-aggressive" in modal and "400" in modal
        term.keys("y")
        # it trains again once its trainer is back (the conservative pane shows /400 too: read its log)
        events_log = ExperimentPaths(exp_dir).arm("demo-aggressive").events
        deadline = time.monotonic() + 120
        while '"kind":"step","step":201' not in events_log.read_text():
            assert time.monotonic() < deadline, "the extended arm did not train on within 120 s"
            time.sleep(0.5)

        # `gputwin demo` typed again while the demo trains: it attaches and says so; nothing new starts.
        second = Terminal(name + "-second", [GPUTWIN, "demo"], env)
        try:
            screen = second.wait_for(rf"{exp_dir.name} · attached \(it was running\)", 30)
            assert "demo-conservative" in screen and "demo-aggressive" in screen
            screen = second.wait_for(r"Attached to a running experiment", 10)  # the notification's title
            assert "--new" in screen
            second.keys("q")
            second.wait_for(r"Detached\. Training continues", 20)
        finally:
            second.close()
        assert [p.name for p in (tmp_path / "logs").iterdir() if p.name.startswith("demo-")] == [exp_dir.name]

        # Stop it again: it checkpoints and ends as stopped.
        term.keys("s")
        term.wait_for(r"(?i)stop demo-aggressive", 20)
        term.keys("y")
        term.wait_for(r"stopped", 120)

        # Detach: the UI exits and says what goes on (training continues, or every arm has ended).
        term.keys("q")
        term.wait_for(r"Detached\. Training continues|All arms of .* have ended", 20)

        again = Terminal(name + "-again", [GPUTWIN, "attach", exp_dir.name], env)
        screen = again.wait_for(r"verdict: scenario [ABC]", 30)
        assert "demo-conservative" in screen and "demo-aggressive" in screen
        assert "stopped" in screen
        status = subprocess.run([GPUTWIN, "status", exp_dir.name], capture_output=True, text=True,
                                env={**os.environ, **env})
        assert status.returncode == 0, status.stderr
        assert re.search(r"demo-aggressive\s+STOPPED", status.stdout), status.stdout
        events = (ExperimentPaths(exp_dir).arm("demo-aggressive").events).read_text()
        assert '"kind":"extended"' in events and '"new_cycle":true' in events and '"kind":"stopped"' in events
    finally:
        term.close()
        if again is not None:
            again.close()
        _stop_all(tmp_path / "logs")

