"""Keeping ``comparison.md`` and ``verdict.json`` in step with the verdict the UI shows.

The UI calls `keep_report` (in a worker thread) each time its verdict forms or changes. The files are
rewritten only when ``verdict.json`` does not already hold that verdict, so attaching to a finished
experiment, a second UI, or a headless monitor beside the UI leave a current report alone.
No Textual here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.paths import ExperimentPaths

# verdict.json's keys that describe the writing, not the verdict (report._write adds them)
WRITING_KEYS = ("experiment", "written_at", "validation_files")


@dataclass(frozen=True)
class ReportState:
    """Where the report is and whether this call wrote it."""

    comparison: Path
    verdict: Path
    wrote: bool
    at: float  # when it was written (verdict.json's written_at when it was current already)


def signature(verdict: Any) -> str:
    """The verdict as canonical JSON: equal for equal verdicts, whichever process computed them."""
    return json.dumps(json.loads(json.dumps(verdict.to_dict(), default=str)), sort_keys=True)


def on_disk(exp: ExperimentPaths) -> tuple[str, float] | None:
    """The signature of the verdict in verdict.json and when it was written; None without a usable report."""
    if not exp.comparison.is_file():
        return None
    try:
        data = json.loads(exp.verdict.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    written = data.get("written_at")
    stored = {k: v for k, v in data.items() if k not in WRITING_KEYS}
    return json.dumps(stored, sort_keys=True), float(written) if isinstance(written, (int, float)) else 0.0


def keep_report(exp: ExperimentPaths, verdict: Any, *, now: float | None = None) -> ReportState:
    """Write the report unless verdict.json already holds `verdict`."""
    current = on_disk(exp)
    if current is not None and current[0] == signature(verdict):
        return ReportState(exp.comparison, exp.verdict, wrote=False, at=current[1])
    from .report import write_report

    at = time.time() if now is None else now
    comparison, verdict_json = write_report(exp.root, now=at)
    return ReportState(comparison, verdict_json, wrote=True, at=at)
