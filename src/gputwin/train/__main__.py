"""`python -m gputwin.train ARM_DIR`: the trainer process of one arm (the launcher starts it detached)."""

from __future__ import annotations

import argparse
import sys
import time

import psutil

from .loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gputwin.train",
                                     description="Train one gputwin arm; events go to ARM_DIR/events.jsonl.")
    parser.add_argument("arm_dir", help="the arm folder holding profile.json (made by `gputwin run`)")
    args = parser.parse_args(argv)
    # process start to here: Python, torch, transformers and the rest imported (reported in `started`)
    imports_seconds = round(time.time() - psutil.Process().create_time(), 3)
    return train(args.arm_dir, imports_seconds=imports_seconds)


if __name__ == "__main__":
    sys.exit(main())
