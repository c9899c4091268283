"""Debian's headless chromium, driven over the DevTools protocol, for tests that look at a page as a
person would: open it, wait for what a script on it has done, read the page, take a screenshot.

The DevTools client is aiohttp's websocket client (aiohttp comes with textual-serve). The page's own
websocket traffic is recorded by a script added before any of the page's scripts run, so a test can
read what a textual-serve terminal received as text, besides looking at the screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]
START_S = 30.0

# Recorded in the page: every binary websocket message, decoded as UTF-8 (a textual-serve terminal's output).
RECORD_SOCKETS = """
window.__received = [];
const Original = window.WebSocket;
window.WebSocket = function (...args) {
  const socket = new Original(...args);
  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      const decode = (buffer) => window.__received.push(new TextDecoder().decode(buffer));
      if (event.data instanceof ArrayBuffer) decode(event.data);
      else event.data.arrayBuffer().then(decode);
    }
  });
  return socket;
};
window.WebSocket.prototype = Original.prototype;
Object.assign(window.WebSocket, Original);
"""
ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[@-Z\\-_]")


class Chromium:
    """One headless chromium with a fresh profile folder; use as a context manager."""

    def __init__(self, width: int = 1600, height: int = 1000) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed")
        self.profile = Path(tempfile.mkdtemp(prefix="gputwin-chromium-"))
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = self._devtools_port()

    def _devtools_port(self) -> int:
        """Chromium writes the port it chose into the profile folder."""
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited at start (status {self.process.returncode})")
            if port_file.is_file() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"chromium did not open its DevTools port within {START_S:.0f} s")

    def page_socket(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as response:
            targets = json.load(response)
        return next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """The DevTools session of one page: commands by name, answers matched by id."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.next_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        wanted = self.next_id
        await self.socket.send_json({"id": wanted, "method": method, "params": params})
        while True:
            message = await self.socket.receive_json(timeout=60)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def received_text(self) -> str:
        """What the page's websockets received, escape sequences removed."""
        chunks = await self.evaluate("window.__received ? window.__received.join('') : ''")
        return ANSI.sub("", chunks or "")


async def _shoot(browser: Chromium, url: str, out: Path, wanted: list[str], limit_s: float) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(browser.page_socket(), max_msg_size=0) as socket:
            page = Page(socket)
            await page.send("Page.enable")
            await page.send("Page.addScriptToEvaluateOnNewDocument", source=RECORD_SOCKETS)
            await page.send("Page.navigate", url=url)
            deadline = time.monotonic() + limit_s
            text = ""
            while time.monotonic() < deadline:
                text = await page.received_text()
                started = await page.evaluate("document.body && document.body.classList.contains('-first-byte')")
                if started and all(w in text for w in wanted):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # the terminal paints what it received on its next frames
            shot = await page.send("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
            return await page.received_text()


def screenshot(url: str, out: Path, *, wanted: list[str], width: int = 1600, height: int = 1000,
               limit_s: float = 60.0) -> str:
    """Open `url`, wait until the page's websockets brought every string in `wanted` (or `limit_s` passed),
    save a PNG screenshot to `out`; returns the text the page received."""
    with Chromium(width, height) as browser:
        return asyncio.run(_shoot(browser, url, out, wanted, limit_s))
