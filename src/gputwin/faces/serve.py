"""`gputwin serve [NAME]`: the same UI in a web browser, through textual-serve.

Each browser tab that opens the page starts its own `gputwin attach` process on this machine, wired to
the page by a websocket; the UI reads the experiment's files as it does in a terminal, so a tab closed
or a server stopped costs training nothing. The server listens on 127.0.0.1 unless told otherwise:
whoever reaches the page can stop and extend arms, and the page has no login. From a laptop the usual
way in is an SSH tunnel (`ssh -L 8000:localhost:8000 gpu-box`).
"""

from __future__ import annotations

import argparse
import errno
import shlex
import socket
import sys
from typing import Any

from ..core.errors import UserError
from ..core.paths import ExperimentPaths

WILDCARDS = ("0.0.0.0", "::", "")  # listen on every address: browsers need a real name to reach it


def app_command(exp: ExperimentPaths) -> str:
    """The shell command textual-serve runs for each browser tab: this Python, this gputwin, this experiment."""
    return shlex.join([sys.executable, "-m", "gputwin.faces.cli", "attach", str(exp.root)])


def public_url(host: str, port: int, given: str | None = None) -> str:
    """The address the page tells the browser to open its websocket at."""
    if given:
        if not given.startswith(("http://", "https://")):
            raise UserError(f"--public-url {given!r} is not an http:// or https:// URL",
                            "e.g. --public-url http://gpu-box.example:8000")
        return given.rstrip("/")
    name = socket.gethostname() if host in WILDCARDS else host
    if ":" in name:  # an IPv6 address
        name = f"[{name}]"
    return f"http://{name}:{port}"


def check_address(host: str, port: int) -> None:
    """Fail before anything is announced when the address cannot be listened on (aiohttp would say so
    only after its start-up message)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r}: {exc.strerror}", "give an address of this machine, e.g. 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does: a closed port's TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}",
                            "pick another --port (or --host); `ss -ltnp` shows what holds the port") from None


def _server(exp: ExperimentPaths, host: str, port: int, url: str) -> Any:
    try:
        from textual_serve.server import Server
    except ImportError:
        raise UserError("textual-serve is not installed, and `gputwin serve` needs it",
                        "pip install 'textual-serve>=1.1' (gputwin's install brings it)") from None

    class GputwinServer(Server):  # type: ignore[misc]
        """textual-serve's server, announcing itself in gputwin's words."""

        async def on_startup(self, app: Any) -> None:
            print(f"Serving the UI of {exp.name} at {url}  (Ctrl-C stops the server; training goes on)", flush=True)
            if host not in ("127.0.0.1", "localhost", "::1"):
                print(f"Listening on {host}: anyone who can reach port {port} can stop and extend the arms.",
                      flush=True)

    return GputwinServer(app_command(exp), host=host, port=port, title=f"gputwin · {exp.name}", public_url=url)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..core.paths import resolve_experiment

    exp = resolve_experiment(args.name)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port", "choose one between 1024 and 65535, e.g. --port 8000")
    url = public_url(args.host, args.port, args.public_url)
    check_address(args.host, args.port)
    server = _server(exp, args.host, args.port, url)
    try:
        server.serve()
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}",
                            "pick another --port (or --host); `ss -ltnp` shows what holds the port") from None
        raise
    return 0
