"""Textual screenshots (SVG) of the UI attached to an experiment, as a user at that terminal size sees it.

  python bench/screens.py LOGS/EXPERIMENT OUT_DIR [--sizes 160x48,100x30] [--tag live] [--wait 3]
      one SVG a size: OUT_DIR/TAG-WIDTHxHEIGHT.svg, after the UI has read the files and sampled the GPU
  python bench/screens.py LOGS/EXPERIMENT OUT_DIR --when-verdict --limit 600
      waits until the experiment's verdict has formed first (for a live run)
Used for docs/screens/ (the GPU machine's screens come from a live experiment there).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gputwin.faces.app import make_app  # noqa: E402
from gputwin.core.paths import ExperimentPaths  # noqa: E402
from gputwin.faces.report import verdict_for_experiment  # noqa: E402


async def shoot(exp: ExperimentPaths, out: Path, size: tuple[int, int], tag: str, wait: float) -> Path:
    app = make_app(exp)
    name = f"{tag}-{size[0]}x{size[1]}.svg"
    async with app.run_test(size=size) as pilot:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:  # the UI's file reads and the GPU sampler's first seconds
            await pilot.pause(0.25)
        app.save_screenshot(filename=name, path=str(out))
    return out / name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sizes", default="160x48,100x30")
    parser.add_argument("--tag", default="live")
    parser.add_argument("--wait", type=float, default=3.0, help="seconds the UI runs before the screenshot")
    parser.add_argument("--when-verdict", action="store_true", help="wait for the verdict to form first")
    parser.add_argument("--limit", type=float, default=600, help="seconds to wait for the experiment (or its verdict)")
    args = parser.parse_args()
    exp = ExperimentPaths(args.experiment.resolve())
    started = time.time()
    while not exp.experiment_json.is_file() or (args.when_verdict and not _decided(exp)):
        if time.time() - started > args.limit:
            print(f"screens: nothing to show after {args.limit:.0f} s", file=sys.stderr)
            return 1
        time.sleep(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        width, height = (int(x) for x in size.split("x"))
        print(asyncio.run(shoot(exp, args.out, (width, height), args.tag, args.wait)))
    return 0


def _decided(exp: ExperimentPaths) -> bool:
    try:
        verdict = verdict_for_experiment(exp)
    except Exception:  # noqa: BLE001 - files still being written: try again
        return False
    return verdict is not None and verdict.scenario != "waiting"


if __name__ == "__main__":
    sys.exit(main())
