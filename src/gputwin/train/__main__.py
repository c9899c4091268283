"""`python -m gputwin.train ARM_DIR`: the trainer process of one arm (the launcher starts it detached)."""

from __future__ import annotations

import argparse
import sys

from .loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gputwin.train",
                                     description="Train one gputwin arm; events go to ARM_DIR/events.jsonl.")
    parser.add_argument("arm_dir", help="the arm folder holding profile.json (made by `gputwin run`)")
    args = parser.parse_args(argv)
    return train(args.arm_dir)


if __name__ == "__main__":
    sys.exit(main())
