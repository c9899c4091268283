"""The one error type a user can cause (the CLI prints it, no traceback, and exits non-zero), and the exit
status that tells scripts an arm crashed."""

from __future__ import annotations

EXIT_ARM_CRASHED = 3  # `gputwin status` and `--headless` exit with it, so cron jobs and scripts notice a crash


class UserError(Exception):
    """Bad input from the user: a path, an arm name, a command at the wrong time.

    str() is the whole message; put the file/key/line first and a hint last.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        self.message, self.hint = message, hint
        super().__init__(message + (f"\n  hint: {hint}" if hint else ""))
